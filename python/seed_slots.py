"""An Esper-style seed slot, written against the eager blend definitions.

Like Esper's ``kasmina.slot``, this module binds the blend functions and ``GatedBlend`` by name
when it is imported (here from `kasmina_kernels.reference` and `kasmina_kernels.nn`'s eager
module, which stand in for Esper's own). The examples run it as written for the eager baseline
and then with ``kk.swap_in(seed_slots)`` to run the same model on the fused backends: a
`SeedSlot` looks its blend functions up in this module at every call (and ``GatedBlend`` when
it is built), so the swap reaches it.

The slot itself is `kasmina_kernels.bench.esper_models.SeedSlot` (one copy, shared with the
training-step benchmark), written the way Esper's ``SeedSlot.forward`` is:

- isolation: ``r = h if h.is_contiguous() else h.contiguous()``; ``r = r.detach()`` (for a
  channels_last CNN host, an NCHW copy without grad); the seed sees ``r`` and produces NCHW ``s``;
- ``"add"``: ``blend_with_isolation(h, s, alpha)`` (Esper's ADD blend);
- ``"multiply"``: ``blend_multiply(h, s, alpha, seed_input=r)``;
- ``"gate"``: ``blend_gate(h, s, alpha, gated_blend.get_alpha_for_blend(r))``;
- ``"ste"``: ``ste_forward(h, s)`` (a seed in its TRAINING stage: the output is the host's).

``alpha`` is a cached 0-dim buffer without grad that ramps linearly from 0 to 1 over
``ramp_steps`` training steps (`advance_slots`).
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
