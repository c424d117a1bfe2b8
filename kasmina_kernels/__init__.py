"""kasmina-kernels: fused kernels for the blend operators of morphogenetic training.

    import kasmina_kernels as kk
    y = kk.blend_gate(h, s, alpha, gate)             # default backend ("auto")
    y = kk.blend_add(h, s, alpha, backend="native")  # a named backend
    with kk.use_backend("reference"):
        ...

Backends: "reference" (eager PyTorch), "native" (compiled C++/CUDA), "triton"; "auto" picks
the fastest available for the tensor's device and `kk.resolve_backend(t)` says which.
"""

from . import reference
from .backends import (
    BACKEND_NAMES,
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    current_backend,
    resolve_backend,
    use_backend,
)
from .ops import (
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

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "available_backends",
    "current_backend",
    "resolve_backend",
    "use_backend",
    "reference",
    "blend_add",
    "blend_gate",
    "blend_multiply",
    "blend_with_isolation",
    "gate_effective_alpha",
    "gate_network",
    "gated_pool",
    "multiply_valve_multiplier",
    "ste_forward",
]
