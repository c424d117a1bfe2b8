"""End-to-end example: a small channels_last CNN host with four Esper-style seed slots (ADD,
MULTIPLY, GATE and a seed still training behind the straight-through estimator), seeds fed
the detached host features (isolation), trained with SGD on a synthetic classification task.

It trains once as written (eager blend functions) and once per backend with the drop-ins
swapped in, from the same weights and batches, and prints per backend the final loss, the
largest relative loss difference and parameter difference from the eager run, the time per
training step and the kernels per training step (torch.profiler).

    python python/esper_cnn.py                         # CPU, float32, every CPU backend
    python python/esper_cnn.py --steps 50 --backends native
    python python/esper_cnn.py --device cuda           # CUDA, bf16 autocast
    TRITON_INTERPRET=1 python python/esper_cnn.py --steps 3 --backends triton   # slow

`build_model` and `make_batches` are importable (the DDP example trains this model).
"""

from __future__ import annotations

import torch
from torch import nn

from seed_slots import SeedSlot

IMAGE_SIZE = 16
CLASSES = 10


class ResidualConvSeed(nn.Module):
    """A seed as Esper grows them: the identity plus a small convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(torch.relu(x))


class CNNHost(nn.Module):
    def __init__(self, width: int = 16, ramp_steps: int = 10):
        super().__init__()
        wide = 2 * width
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.slot_add = SeedSlot(width, ResidualConvSeed(width), "add", ramp_steps=ramp_steps)
        self.down = nn.Conv2d(width, wide, 3, stride=2, padding=1)
        self.slot_multiply = SeedSlot(wide, ResidualConvSeed(wide), "multiply", ramp_steps=ramp_steps)
        self.mid = nn.Conv2d(wide, wide, 3, padding=1)
        self.slot_gate = SeedSlot(wide, ResidualConvSeed(wide), "gate", ramp_steps=ramp_steps)
        self.slot_ste = SeedSlot(wide, ResidualConvSeed(wide), "ste", ramp_steps=ramp_steps)
        self.head = nn.Linear(wide, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.slot_add(torch.relu(self.stem(x)))
        x = self.slot_multiply(torch.relu(self.down(x)))
        x = self.slot_ste(self.slot_gate(torch.relu(self.mid(x))))
        return self.head(x.mean(dim=(2, 3)))


def build_model(seed: int = 0, width: int = 16) -> CNNHost:
    """The host with its slots, initialized from `seed`, in channels_last (on CPU)."""
    torch.manual_seed(seed)
    return CNNHost(width).to(memory_format=torch.channels_last)


def make_batches(steps: int, batch_size: int = 16, *, device="cpu", seed: int = 1):
    """`steps` batches of (channels_last images (B,3,16,16), labels): each image is noise plus
    a per-sample colour offset, labelled by a fixed random linear teacher of that offset, so
    the task is learnable; the same for every call with the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3, CLASSES, generator=gen)
    batches = []
    for _ in range(steps):
        offsets = torch.randn(batch_size, 3, 1, 1, generator=gen)
        images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) + offsets
        labels = (offsets.flatten(1) @ teacher).argmax(dim=1)
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        batches.append((images, labels.to(device)))
    return batches


if __name__ == "__main__":
    import example_harness

    example_harness.main(__doc__, build_model, make_batches, default_steps=30)
