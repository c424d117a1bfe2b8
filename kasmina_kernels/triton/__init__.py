"""The triton backend: fused Triton kernels, forward and backward, for every operator.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
slow, for tests). Exposes the same functions, with the same signatures, as
`kasmina_kernels.native`. Files: `_common.py` (shared loads, stores, rounding and iteration
helpers), `lerp.py` (ADD, GATE, isolation), `multiply.py` (MULTIPLY, the valve),
`elementwise.py` (the kernels those and STE share), `gate.py` (the effective alpha, gated
pooling, the gate network) and `glue.py` (torch.library registration, autograd and the public
functions).
"""

from __future__ import annotations

from .glue import (
    blend_add,
    blend_gate,
    blend_multiply,
    blend_with_isolation,
    gate_effective_alpha,
    gate_network,
    gated_pool,
    multiply_valve_multiplier,
    ste_forward,
)

__all__ = [
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
