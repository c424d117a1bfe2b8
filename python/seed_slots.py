"""The names an Esper-style seed slot calls its blends by, bound to the eager definitions.

Like Esper's ``kasmina.slot``, this module binds the blend functions and ``GatedBlend`` by name
when it is imported (here from `kasmina_kernels.reference` and `kasmina_kernels.nn`'s eager
module, which stand in for Esper's own). The examples run their models as written for the
eager baseline and then with ``kk.swap_in(seed_slots)`` to run the same models on the fused
backends: a slot (`kasmina_kernels.bench.esper_models.SeedSlot`, shared with the training-step
benchmark) built with ``blends=seed_slots.this_module()`` looks its blend functions up in this
module at every call (and ``GatedBlend`` when it is built), so the swap reaches it.
"""

from __future__ import annotations

import sys

from kasmina_kernels.nn import EagerGatedBlend as GatedBlend  # noqa: F401  (swapped by name)
from kasmina_kernels.reference import (  # noqa: F401  (swapped by name)
    blend_gate,
    blend_multiply,
    blend_with_isolation,
    ste_forward,
)


def this_module():
    """The namespace a slot reads its blends from: this module, swapped or not."""
    return sys.modules[__name__]
