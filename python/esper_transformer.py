"""End-to-end example (docs/examples.md): a small transformer host on (B, T, C) tokens with one
Esper-style GATE slot, trained as written and then per backend with the drop-ins swapped in;
prints the same per-backend table as esper_cnn.py.

    python python/esper_transformer.py                   # CPU, float32
    python python/esper_transformer.py --device cuda     # CUDA, bf16 autocast
"""

from __future__ import annotations

import torch

import seed_slots
from kasmina_kernels.bench import esper_models  # the models the training-step benchmark times

FEATURES, CLASSES = 8, 5


def build_model(seed: int = 0, width: int = 32) -> esper_models.TransformerHost:
    """One encoder layer and a GATE slot (blends looked up in `seed_slots`), from `seed`."""
    torch.manual_seed(seed)
    return esper_models.TransformerHost(FEATURES, width, 4, CLASSES, blends=seed_slots)


def make_batches(steps: int, batch_size: int = 16, *, device="cpu", seed: int = 1):
    """`steps` batches of ((B, 12, F) sequences, labels) labelled by a fixed random teacher."""
    return esper_models.token_batches(steps, batch_size, tokens=12, features=FEATURES, classes=CLASSES,
                                      device=device, seed=seed)


if __name__ == "__main__":
    import example_harness

    example_harness.main(__doc__, build_model, make_batches, default_steps=30)
