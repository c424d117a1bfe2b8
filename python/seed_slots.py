"""The names an Esper-style seed slot calls its blends by, bound to the eager definitions when
imported, as Esper's ``kasmina.slot`` binds its own (docs/examples.md). The examples' slots
look their blends up here at every call, so ``kk.swap_in(seed_slots)`` reaches them.
"""

from __future__ import annotations

from kasmina_kernels.nn import EagerGatedBlend as GatedBlend  # noqa: F401  (swapped by name)
from kasmina_kernels.reference import (  # noqa: F401  (swapped by name)
    blend_gate,
    blend_multiply,
    blend_with_isolation,
    ste_forward,
)

