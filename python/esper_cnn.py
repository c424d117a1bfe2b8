"""End-to-end example: a small channels_last CNN host with four Esper-style seed slots (ADD,
MULTIPLY, GATE and a seed still training behind the straight-through estimator), written the
way Esper's SeedSlot.forward is: each seed fed r = the host's features as a contiguous NCHW
copy, detached (isolation), producing NCHW features beside the channels_last host; a cached
0-dim alpha without grad; GATE's gate from a GatedBlend over r. Trained with SGD on a
synthetic classification task.

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

from kasmina_kernels.bench import esper_models

import seed_slots

IMAGE_SIZE = 16
CLASSES = 10
# the model and the data are kasmina_kernels.bench.esper_models' (shared with the
# training-step benchmark); the slots read their blends from seed_slots
CNNHost = esper_models.CNNHost


def build_model(seed: int = 0, width: int = 16) -> CNNHost:
    """The host with its slots, initialized from `seed` (on CPU): host convolutions and
    features channels_last, seeds NCHW, blends looked up in `seed_slots`."""
    torch.manual_seed(seed)
    return CNNHost(width, CLASSES, blends=seed_slots.this_module())


def make_batches(steps: int, batch_size: int = 16, *, device="cpu", seed: int = 1):
    """`steps` batches of (channels_last images (B,3,16,16), labels): `esper_models.image_batches`."""
    return esper_models.image_batches(steps, batch_size, image_size=IMAGE_SIZE, classes=CLASSES,
                                      device=device, seed=seed)


if __name__ == "__main__":
    import example_harness

    example_harness.main(__doc__, build_model, make_batches, default_steps=30)
