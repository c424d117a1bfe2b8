"""The triton backend: fused Triton kernels, forward and backward, for every operator.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
slow, for tests). Exposes the same functions, with the same signatures, as
`kasmina_kernels.native`. Files: `_common.py` (shared loads, stores, rounding and iteration
helpers), `lerp.py` (ADD, GATE, isolation), `multiply.py` (MULTIPLY, the valve),
`elementwise.py` (the kernels those, STE and the effective alpha share), `gate.py` (gated
pooling, the gate network) and `glue.py` (torch.library registration, autograd and the public
functions).
"""

from __future__ import annotations

from ..optable import NAMES
from . import glue

__all__ = list(NAMES)
globals().update({name: getattr(glue, name) for name in NAMES})
