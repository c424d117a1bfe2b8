"""Esper-style hosts with seed slots that call the blends the way Esper's `SeedSlot.forward`
does (docs/semantics.md#espers-calls), for the training-step benchmark (bench/step.py) and the
examples in python/. A slot looks its blends up by name at every call on its `blends`
namespace: `EAGER_BLENDS`, `DROP_INS`, or a module such as the examples' ``seed_slots`` whose
names `kasmina_kernels.swap_in` replaces. Each blend runs inside a
``torch.profiler.record_function(BLEND_RANGE)`` range, so a profile can tell its share of a step.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from .. import reference, swap
from ..nn import EagerGatedBlend

OPERATORS = ("add", "multiply", "gate", "ste")
BLEND_RANGE = "kasmina.blend"
EAGER_BLENDS = SimpleNamespace(
    blend_with_isolation=reference.blend_with_isolation, blend_multiply=reference.blend_multiply,
    blend_gate=reference.blend_gate, ste_forward=reference.ste_forward, GatedBlend=EagerGatedBlend)
DROP_INS = SimpleNamespace(**{name: swap.DROP_INS[name] for name in vars(EAGER_BLENDS)})


class SeedSlot(nn.Module):
    def __init__(self, channels: int, seed: nn.Module, operator: str, *, topology: str = "cnn",
                 ramp_steps: int = 10, blends=None):
        super().__init__()
        if operator not in OPERATORS:
            raise ValueError(f"unknown operator {operator!r}: expected one of {', '.join(OPERATORS)}")
        self.operator, self.ramp_steps, self.seed = operator, ramp_steps, seed
        self.blends = EAGER_BLENDS if blends is None else blends
        self.register_buffer("alpha", torch.zeros(()))
        self.gated_blend = (self.blends.GatedBlend(channels, topology=topology, total_steps=ramp_steps)
                            if operator == "gate" else None)

    def advance(self, step: int) -> None:
        """Set alpha for training step `step` (0-based): ``min(1, (step + 1) / ramp_steps)``."""
        self.alpha.fill_(min(1.0, (step + 1) / self.ramp_steps))
        if self.gated_blend is not None:
            self.gated_blend.step(min(step + 1, self.ramp_steps))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = (h if h.is_contiguous() else h.contiguous()).detach()  # Esper's gradient isolation
        s = self.seed(r)
        b = self.blends
        with torch.profiler.record_function(BLEND_RANGE):
            if self.operator == "add":
                return b.blend_with_isolation(h, s, self.alpha)
            if self.operator == "multiply":
                return b.blend_multiply(h, s, self.alpha, seed_input=r)
            if self.operator == "gate":
                return b.blend_gate(h, s, self.alpha, self.gated_blend.get_alpha_for_blend(r))
            return b.ste_forward(h, s)


def advance_slots(model: nn.Module, step: int) -> None:
    """Advance every SeedSlot in `model` to training step `step`."""
    for slot in (m for m in model.modules() if isinstance(m, SeedSlot)):
        slot.advance(step)


def set_alphas(model: nn.Module, value: float) -> None:
    for slot in (m for m in model.modules() if isinstance(m, SeedSlot)):
        slot.alpha.fill_(value)


class Residual(nn.Module):
    """A seed as Esper grows them: the identity plus a small network."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CNNHost(nn.Module):
    """stem conv (3 -> width) + ADD slot, stride-2 conv (-> 2*width) + MULTIPLY slot, conv +
    GATE slot + a slot in the STE stage, mean pool, linear head. The host's convolutions are
    channels_last (so are its features); the seeds' stay contiguous, so they see and produce
    NCHW features as Esper's do. Feed it channels_last images."""

    def __init__(self, width: int = 16, classes: int = 10, *, ramp_steps: int = 10, blends=None):
        super().__init__()
        wide = 2 * width

        def slot(c, op):
            seed = Residual(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
            return SeedSlot(c, seed, op, ramp_steps=ramp_steps, blends=blends)

        self.stem = nn.Conv2d(3, width, 3, padding=1).to(memory_format=torch.channels_last)
        self.slot_add = slot(width, "add")
        self.down = nn.Conv2d(width, wide, 3, stride=2, padding=1).to(memory_format=torch.channels_last)
        self.slot_multiply = slot(wide, "multiply")
        self.mid = nn.Conv2d(wide, wide, 3, padding=1).to(memory_format=torch.channels_last)
        self.slot_gate = slot(wide, "gate")
        self.slot_ste = slot(wide, "ste")
        self.head = nn.Linear(wide, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.slot_add(torch.relu(self.stem(x)))
        x = self.slot_multiply(torch.relu(self.down(x)))
        x = self.slot_ste(self.slot_gate(torch.relu(self.mid(x))))
        return self.head(x.mean(dim=(2, 3)))


def image_batches(steps: int, batch_size: int, *, image_size: int = 16, classes: int = 10,
                  device="cpu", seed: int = 1):
    """`steps` batches of (channels_last images (B,3,S,S), labels): each image is noise plus a
    per-sample colour offset, labelled by a fixed random linear teacher of that offset, so the
    task is learnable; the same for every call with the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3, classes, generator=gen)
    batches = []
    for _ in range(steps):
        offsets = torch.randn(batch_size, 3, 1, 1, generator=gen)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=gen) + offsets
        labels = (offsets.flatten(1) @ teacher).argmax(dim=1)
        batches.append((images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)))
    return batches


def mlp_seed(channels: int) -> Residual:
    """A residual MLP seed on (B, T, C)."""
    return Residual(nn.Linear(channels, 2 * channels), nn.ReLU(), nn.Linear(2 * channels, channels))


class EncoderLayer(nn.Module):
    """Post-norm self-attention and MLP on (B, T, C)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1, self.mlp, self.norm2 = nn.LayerNorm(width), mlp_seed(width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, x, x, need_weights=False)[0])
        return self.norm2(self.mlp(x))


class TransformerHost(nn.Module):
    """Linear embedding, `layers` encoder layers, a GATE slot (GatedBlend topology
    "transformer"), mean over tokens, linear head. Every feature is contiguous (B, T, C)."""

    def __init__(self, features: int, width: int = 32, heads: int = 4, classes: int = 5, *,
                 layers: int = 1, ramp_steps: int = 10, blends=None):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.layers = nn.Sequential(*(EncoderLayer(width, heads) for _ in range(layers)))
        self.slot_gate = SeedSlot(width, mlp_seed(width), "gate", topology="transformer",
                                  ramp_steps=ramp_steps, blends=blends)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.slot_gate(self.layers(self.embed(x))).mean(dim=1))


def token_batches(steps: int, batch_size: int, *, tokens: int, features: int, classes: int = 5,
                  device="cpu", seed: int = 1):
    """`steps` batches of ((B, T, F) sequences, labels) labelled by a fixed random teacher."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(features, classes, generator=gen)
    xs = [torch.randn(batch_size, tokens, features, generator=gen) for _ in range(steps)]
    return [(x.to(device), (x.mean(dim=1) @ teacher).argmax(dim=1).to(device)) for x in xs]
