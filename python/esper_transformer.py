"""End-to-end example: a small transformer host on (B, T, C) tokens with one Esper-style GATE
seed slot (learned per-sample gate from `GatedBlend(topology="transformer")`), the seed fed the
detached host features, trained with SGD on a synthetic sequence classification task.

Trains as written (eager blend functions), then once per backend with the drop-ins swapped
in, from the same weights and batches; prints the same per-backend table as esper_cnn.py.

    python python/esper_transformer.py                   # CPU, float32
    python python/esper_transformer.py --device cuda     # CUDA, bf16 autocast
"""

from __future__ import annotations

import torch
from torch import nn

from seed_slots import SeedSlot

TOKENS = 12
FEATURES = 8
CLASSES = 5


class MLPSeed(nn.Module):
    """A residual MLP seed on (B, T, C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.up = nn.Linear(channels, 2 * channels)
        self.down = nn.Linear(2 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class TransformerHost(nn.Module):
    def __init__(self, width: int = 32, heads: int = 4, ramp_steps: int = 10):
        super().__init__()
        self.embed = nn.Linear(FEATURES, width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.mlp = MLPSeed(width)
        self.norm2 = nn.LayerNorm(width)
        self.slot_gate = SeedSlot(width, MLPSeed(width), "gate", topology="transformer", ramp_steps=ramp_steps)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        attended, _ = self.attention(x, x, x, need_weights=False)
        x = self.norm1(x + attended)
        x = self.norm2(self.mlp(x))
        x = self.slot_gate(x)
        return self.head(x.mean(dim=1))


def build_model(seed: int = 0, width: int = 32) -> TransformerHost:
    torch.manual_seed(seed)
    return TransformerHost(width)


def make_batches(steps: int, batch_size: int = 16, *, device="cpu", seed: int = 1):
    """`steps` batches of ((B, T, F) sequences, labels) labelled by a fixed random teacher."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(FEATURES, CLASSES, generator=gen)
    batches = []
    for _ in range(steps):
        tokens = torch.randn(batch_size, TOKENS, FEATURES, generator=gen)
        labels = (tokens.mean(dim=1) @ teacher).argmax(dim=1)
        batches.append((tokens.to(device), labels.to(device)))
    return batches


if __name__ == "__main__":
    import example_harness

    example_harness.main(__doc__, build_model, make_batches, default_steps=30)
