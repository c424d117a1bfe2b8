"""An Esper-style seed slot, written against the eager blend definitions.

Like Esper's ``kasmina.slot``, this module binds the blend functions and ``GatedBlend`` by name
when it is imported (here from `kasmina_kernels.reference` and `kasmina_kernels.nn`'s eager
module, which stand in for Esper's own). The examples run it as written for the eager baseline
and then with ``kk.swap_in(seed_slots)`` to run the same model on the fused backends: a
`SeedSlot` looks its blend functions up in this module at every call (and ``GatedBlend`` when
it is built), so the swap reaches it. The slot itself is
`kasmina_kernels.bench.esper_models.SeedSlot` (one copy, shared with the training-step
benchmark; its module doc says how it calls the blends).
"""

from __future__ import annotations

import sys

from kasmina_kernels.bench import esper_models
from kasmina_kernels.nn import EagerGatedBlend as GatedBlend  # noqa: F401  (swapped by name)
from kasmina_kernels.reference import (  # noqa: F401  (swapped by name)
    blend_gate,
    blend_multiply,
    blend_with_isolation,
    ste_forward,
)

OPERATORS = esper_models.OPERATORS
advance_slots = esper_models.advance_slots


def this_module():
    """The namespace a slot reads its blends from: this module, swapped or not."""
    return sys.modules[__name__]


class SeedSlot(esper_models.SeedSlot):
    """`esper_models.SeedSlot` reading its blend functions from this module."""

    def __init__(self, channels, seed, operator, *, topology="cnn", ramp_steps=10, isolate=True):
        super().__init__(channels, seed, operator, topology=topology, ramp_steps=ramp_steps,
                         isolate=isolate, blends=this_module())
