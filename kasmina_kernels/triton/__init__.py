"""The triton backend: fused Triton kernels, forward and backward, for every operator.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
slow, for tests). Exposes the same functions, with the same signatures, as
`kasmina_kernels.native`. Each op is also registered with torch.library as
``torch.ops.kasmina.triton_<name>`` (fake kernel and autograd included), which is what
torch.compile and other tracers see; plain eager calls skip the dispatcher round trip.
"""

from __future__ import annotations

from ._common import INTERPRET
from .blend import (
    blend_add,
    blend_gate,
    blend_multiply,
    blend_with_isolation,
    gate_effective_alpha,
    multiply_valve_multiplier,
    ste_forward,
)
from .pool import gate_network, gated_pool

__all__ = [
    "INTERPRET",
    "blend_add",
    "blend_with_isolation",
    "blend_gate",
    "blend_multiply",
    "ste_forward",
    "multiply_valve_multiplier",
    "gate_effective_alpha",
    "gated_pool",
    "gate_network",
]
