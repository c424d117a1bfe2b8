"""Backend selection: which implementation runs an op, and why.

Order of precedence for the default: the innermost `use_backend(...)` block, then the
`KASMINA_KERNELS_BACKEND` environment variable (read at each call), then ``"auto"``.
``"auto"`` picks per device; `resolve_backend(tensor)` reports the pick. While torch.compile
traces a call, ``"auto"`` is ``"reference"`` (`COMPILE_AUTO`). Naming a backend that cannot
run on the tensor's device raises `BackendUnavailableError` saying why; nothing falls back to
another backend behind the caller's back.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import threading
from types import ModuleType

import torch

BACKENDS = ("reference", "triton", "native")
BACKEND_NAMES = BACKENDS + ("auto",)
ENV_VAR = "KASMINA_KERNELS_BACKEND"

class BackendUnavailableError(RuntimeError):
    """A named backend cannot run here; the message says why and how to get it."""


# ---------------------------------------------------------------------------- availability
_status_cache: dict[tuple[str, str], str | None] = {}
_modules: dict[str, ModuleType] = {"reference": importlib.import_module("kasmina_kernels.reference")}
_native_error: str | None = None
try:
    _modules["native"] = importlib.import_module("kasmina_kernels.native")
except ImportError as exc:  # the compiled extension is missing or broken
    _native_error = str(exc)


def _why_unavailable(name: str, device_type: str) -> str | None:
    """None when `name` can run on `device_type`, else the reason and the remedy."""
    if name == "reference":
        return None
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKEND_NAMES)}")
    if name == "native":
        if "native" not in _modules:
            return (f"the compiled extension kasmina_kernels._C did not load ({_native_error}); "
                    "build it with `pip install --no-build-isolation -e .` after installing torch")
        if device_type == "cuda" and not _modules["native"].build_info()["with_cuda"]:
            return ("kasmina_kernels._C was built without CUDA kernels; rebuild on a machine "
                    "with a CUDA toolkit and a CUDA build of torch "
                    "(KASMINA_KERNELS_CUDA=1 pip install --no-build-isolation -e .)")
    elif device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton kernels run on CPU tensors only under its interpreter: "
                "set TRITON_INTERPRET=1 before importing triton (slow; meant for tests)")
    if device_type not in ("cpu", "cuda"):
        return f"the {name} backend has no kernels for device type {device_type!r}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    if name == "triton":
        if "native" not in _modules:
            return (f"the triton backend's ops take their autograd from the compiled extension "
                    f"kasmina_kernels._C, which did not load ({_native_error}); build it with "
                    "`pip install --no-build-isolation -e .` after installing torch")
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return (f"Triton is not installed ({exc}); install it with `pip install triton` "
                    "(it ships with CUDA builds of torch)")
        try:
            _modules["triton"] = importlib.import_module("kasmina_kernels.triton")
        except ImportError as exc:
            return f"the triton backend module did not import: {exc}"
    return None


def backend_status(name: str, device_type: str = "cpu") -> str | None:
    """Why `name` cannot run on `device_type` (None when it can). Cached per process."""
    key = (name, device_type)
    if key not in _status_cache:
        _status_cache[key] = _why_unavailable(name, device_type)
    return _status_cache[key]


def backend_module(name: str) -> ModuleType:
    """The module implementing an available backend (resolve the name first)."""
    return _modules[name]


def device_types() -> list[str]:
    """The device types this machine has."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run on `device` (default: on any device this machine has)."""
    types = device_types() if device is None else [torch.device(device).type]
    return [b for b in BACKENDS if any(backend_status(b, t) is None for t in types)]


# ---------------------------------------------------------------------------- default
_local = threading.local()
# One entry per `use_backend` block open in any thread (list.append/pop are atomic under the
# GIL, a counter's += is not). Empty means no thread has a block open, so an op call can skip
# the thread-local lookup.
_open_blocks: list[str] = []


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKEND_NAMES)}")
    return name


# os.environ.get encodes the key on each call; the mapping it wraps is read directly when this
# Python has one, so the variable is still read per call, cheaply.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None
_ENV_FAST = _ENVIRON_DATA is not None and _ENV_KEY is not None


def _env_default() -> str | None:
    if _ENV_FAST and not torch.compiler.is_compiling():
        raw = _ENVIRON_DATA.get(_ENV_KEY)
        return None if raw is None else os.environ.decodevalue(raw)
    return os.environ.get(ENV_VAR)


def current_backend() -> str:
    """The backend name used when an op gets ``backend=None`` (may be ``"auto"``)."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = _env_default()
    if env:
        return _check_name(env.strip().lower())
    return "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Run the block with `name` as the default backend (per thread; blocks nest)."""
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:  # (torch 2.11's dynamo cannot trace __dict__.setdefault here)
        stack = _local.stack = []
    stack.append(name)
    _open_blocks.append(name)
    try:
        yield name
    finally:
        _open_blocks.pop()
        stack.pop()


@contextlib.contextmanager
def keep_residuals(enabled: bool = True):
    """Run the block with the native backend's forwards keeping what their backward would
    otherwise recompute (process-wide, restored on exit). Today: MULTIPLY's tanh of s - r (as
    1 - |tanh| with its sign) on CPU for float32 hosts, read by the backward when alpha wants
    no gradient. It trades one feature-sized tensor of activation memory per call for a
    backward that neither evaluates tanh nor reads s and r. Off by default: a fused op then saves only its inputs.
    torch.compile bakes the setting in at trace time. No effect without the native backend."""
    native = _modules.get("native")
    previous = native._C.set_keep_residuals(bool(enabled)) if native else False
    try:
        yield
    finally:
        if native:
            native._C.set_keep_residuals(previous)


# ---------------------------------------------------------------------------- resolution
# What "auto" picks per device type, best first: the first available one wins.
_AUTO_PREFERENCE = {"cpu": ("native", "reference"), "cuda": ("native", "triton", "reference")}
_auto_cache: dict[str, str] = {}


def _auto(device_type: str) -> str:
    pick = _auto_cache.get(device_type)
    if pick is None:
        pick = next((n for n in _AUTO_PREFERENCE.get(device_type, ())
                     if backend_status(n, device_type) is None), "reference")
        _auto_cache[device_type] = pick
    return pick


_is_compiling = torch.compiler.is_compiling

#: What "auto" picks while torch.compile traces an op: the reference math, which Inductor
#: fuses with the ops around the blend and partitions into the compiled backward (an opaque
#: torch.ops.kasmina op can be neither fused nor looked into). Naming a backend keeps the
#: opaque op under compile; eager calls run the fused kernels.
COMPILE_AUTO = "reference"


def native_by_default(tensor: torch.Tensor) -> bool:
    """True when an op on `tensor` with ``backend=None`` runs on the native backend and the
    call may go straight to ``torch.ops.kasmina`` (the ops' eager fast path): no `use_backend`
    block open in any thread, the environment variable unset, "auto" picking native for the
    tensor's device, not tracing. False whenever unsure: the caller then resolves as usual."""
    if _open_blocks or _is_compiling() or not _ENV_FAST or _ENV_KEY in _ENVIRON_DATA:
        return False
    if tensor.is_cpu:
        return _auto_native_cpu
    if tensor.is_cuda:
        return _auto_native_cuda
    return False


def resolve_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    """The concrete backend an op on `tensor` runs with, given `backend` (None = default).

    Raises ValueError for an unknown name and BackendUnavailableError when the named backend
    cannot run on the tensor's device.
    """
    name = current_backend() if backend is None else backend
    device_type = tensor.device.type
    if name == "auto":
        return COMPILE_AUTO if _is_compiling() else _auto(device_type)
    why = backend_status(_check_name(name), device_type)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable on {device_type}: {why}")
    return name


def build_summary() -> dict:
    """How torch and this package were built and what this machine has: the `info` command's
    table and the benchmark report's header."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA devices": torch.cuda.device_count(),
        "torch CPU capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    native = _modules.get("native")
    if native is None:
        info["native extension"] = f"not loaded: {_native_error}"
    else:
        build = native.build_info()
        info["native extension"] = "loaded"
        info["native built with CUDA"] = build["with_cuda"]
        info["native CPU capability"] = (
            f"{build['cpu_capability']} (compiled: {', '.join(build['cpu_capabilities'])})")
        info["native compiler"] = build["compiler"]
        info["native built against torch"] = build["torch_version_at_build"]
    return info


# Availability is settled once, at import, for every device this machine has, so that op
# calls (and torch.compile tracing them) only read a cache. Triton is imported here only where
# it can run (a CUDA device, or TRITON_INTERPRET=1).
for _device_type in device_types():
    for _name in BACKENDS:
        backend_status(_name, _device_type)
_auto_native_cpu = _auto("cpu") == "native"
_auto_native_cuda = torch.cuda.is_available() and _auto("cuda") == "native"
