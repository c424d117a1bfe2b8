"""kasmina-kernels: fused kernels for the blend operators of morphogenetic training.

    import kasmina_kernels as kk
    y = kk.blend_gate(h, s, alpha, gate)             # default backend ("auto")
    y = kk.blend_add(h, s, alpha, backend="native")  # a named backend
    with kk.use_backend("reference"):
        ...

Drop-ins for Esper: `kasmina_kernels.blend_ops`, `kasmina_kernels.isolation` (Esper's function
signatures), `kasmina_kernels.nn.GatedBlend`, and `kk.swap_in(...)` to put them in place of
the eager functions in modules that already imported those, and `kk.esper.install()` to put
them into every Esper namespace for the life of the process.

Backends: "reference" (eager PyTorch), "native" (compiled C++/CUDA), "triton"; "auto" picks
the fastest available for the tensor's device and `kk.resolve_backend(t)` says which.
"""

from . import reference
from .backends import (BACKEND_NAMES, BACKENDS, BackendUnavailableError, available_backends, current_backend,
                       keep_residuals, resolve_backend, use_backend)
from . import blend_ops, isolation, nn
from .nn import GatedBlend
from .swap import SwapHandle, swap_in
from . import esper  # noqa: E402  (kk.esper.install(): the drop-ins into Esper, process-wide)
from . import ops
from .ops import *  # noqa: F401,F403  (the public ops: `optable.NAMES`)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BACKEND_NAMES", "BackendUnavailableError", "available_backends", "current_backend",
    "keep_residuals", "resolve_backend", "use_backend",
    "reference", "blend_ops", "isolation", "nn", "GatedBlend", "SwapHandle", "swap_in", "esper",
    *ops.__all__,
]
