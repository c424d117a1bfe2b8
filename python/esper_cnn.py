"""End-to-end example (docs/examples.md): a small channels_last CNN host with four Esper-style
seed slots (ADD, MULTIPLY, GATE, and a seed training behind the straight-through estimator),
trained with SGD on a synthetic task as written (eager blends) and once per backend with the
drop-ins swapped in; prints per backend the loss and parameter differences from the eager run,
ms per step and kernels per step.

    python python/esper_cnn.py                         # CPU, float32, every CPU backend
    python python/esper_cnn.py --steps 50 --backends native
    python python/esper_cnn.py --device cuda           # CUDA, bf16 autocast
    TRITON_INTERPRET=1 python python/esper_cnn.py --steps 3 --backends triton   # slow

`build_model` and `make_batches` are importable (the DDP example trains this model).
"""

from __future__ import annotations

import torch

import seed_slots
from kasmina_kernels.bench import esper_models  # the models the training-step benchmark times

CLASSES = 10


def build_model(seed: int = 0, width: int = 16) -> esper_models.CNNHost:
    """The host with its slots, initialized from `seed` (on CPU): host convolutions and
    features channels_last, seeds NCHW, blends looked up in `seed_slots`."""
    torch.manual_seed(seed)
    return esper_models.CNNHost(width, CLASSES, blends=seed_slots)


def make_batches(steps: int, batch_size: int = 16, *, device="cpu", seed: int = 1):
    """`steps` batches of (channels_last images (B,3,16,16), labels)."""
    return esper_models.image_batches(steps, batch_size, image_size=16, classes=CLASSES, device=device, seed=seed)


if __name__ == "__main__":
    import example_harness

    example_harness.main(__doc__, build_model, make_batches, default_steps=30)
