"""What is timed: rotating input sets for one (op, shape, dtype), the implementations run on
them (eager reference, torch.compile of the reference, each kernel backend), and the timed
steps (forward, backward, forward+backward, device copy).

Inputs come from `kasmina_kernels.opcases` (random, never zero). Rotation: enough copies of
the input set that cycling through them touches more memory than `rotate_bytes` (on GPU twice
the L2 cache), so a timed call never finds its inputs in cache from the previous call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import opcases, optable
from . import esper
from .timing import Step

MAX_SETS = 64


@dataclass
class InputSet:
    args: list
    kwargs: dict
    leaves: list[torch.Tensor]  # the inputs that require grad (what backward differentiates)
    grad: torch.Tensor  # incoming gradient for the output


def _leafify(value, requires_grad: bool = True):
    """A fresh copy (same memory format) of a floating-point tensor input, a leaf that requires
    grad unless told otherwise."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().clone().requires_grad_(requires_grad)
    return value


def _input_set(names, args, kwargs, grad, no_grad: frozenset = frozenset()) -> InputSet:
    """`no_grad`: inputs (by name; `names`: the positional ones') copied without requires_grad."""
    args = [_leafify(a, n not in no_grad) for n, a in zip(names, args)]
    kwargs = {k: _leafify(v, k not in no_grad) for k, v in kwargs.items()}
    leaves = [t for t in list(args) + list(kwargs.values())
              if isinstance(t, torch.Tensor) and t.requires_grad]
    return InputSet(args, kwargs, leaves, grad.clone())


def _set_bytes(s: InputSet) -> int:
    tensors = [t for t in list(s.args) + list(s.kwargs.values()) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors + [s.grad])


@dataclass
class Workload:
    op: optable.Op
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    sets: list[InputSet]
    base_args: list  # set 0's values, not leaves (for checking)
    base_kwargs: dict
    pattern: str = "isolated"  # "isolated" (every input requires grad) or an esper.PATTERNS key
    autocast: bool = False  # every call runs under bf16 autocast
    no_grad: frozenset = frozenset()  # inputs passed without grad (by name)
    inputs: dict | None = None  # esper.describe of set 0: layouts, dtypes, requires-grad flags

    @property
    def n_sets(self) -> int:
        return len(self.sets)

    def check(self) -> opcases.Check:
        """The check of kernels on set 0's values, with this workload's flags, layouts,
        incoming gradient and autocast."""
        return opcases.Check.of(self.op, self.base_args, self.base_kwargs, no_grad=self.no_grad,
                                grad=self.sets[0].grad, ref_fn=self.wrap(self.op.reference))

    def wrap(self, fn: Callable) -> Callable:
        """`fn` as this workload calls it (inside bf16 autocast when `autocast`)."""
        return esper.autocast_wrap(fn, self.device) if self.autocast else fn


def build(op: optable.Op, shape, dtype, device, gen: torch.Generator,
          rotate_bytes: int, *, pattern: str = "isolated", autocast: bool = False) -> Workload:
    """Input sets for one entry. pattern "isolated": `opcases.make`'s inputs, all contiguous and
    all requiring grad (the op-isolation benchmark); an `esper.PATTERNS` key: the layouts,
    dtypes and requires-grad flags of Esper's call (`esper.make_inputs`). The incoming
    gradient has the output's memory format."""
    if pattern == "isolated":
        args, kwargs = opcases.make(op, shape, dtype, device, gen)
        no_grad = frozenset()
    else:
        args, kwargs = esper.make_inputs(op.name, pattern, shape, dtype, device, gen,
                                         autocast=autocast)
        no_grad = esper.NO_GRAD
    ref = op.reference
    with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast):
        out = ref(*args, **kwargs)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device, out.dtype)
    grad = torch.empty_like(out).copy_(grad)  # the output's layout, as a layer's gradient has
    names = op.inputs
    first = _input_set(names, args, kwargs, grad, no_grad)
    n = max(1, min(MAX_SETS, math.ceil(rotate_bytes / max(_set_bytes(first), 1))))
    sets = [first] + [_input_set(names, first.args, first.kwargs, first.grad, no_grad) for _ in range(n - 1)]
    flags = {name: name not in no_grad for name in [*names[:len(args)], *kwargs]}
    inputs = esper.describe(names, first.args, first.kwargs, flags, first.grad)
    return Workload(op, tuple(shape), dtype, torch.device(device), sets, list(args),
                    dict(kwargs), pattern, autocast, no_grad, inputs)


# ---------------------------------------------------------------------------- implementations
@dataclass
class Impl:
    name: str  # "eager", "compile", or a backend name
    fn: Callable
    compile_s: float | None = None  # first forward+backward call, for "compile"
    cache_hits: int | None = None  # graphs inductor found in its on-disk cache while compiling
    dynamic: bool = False  # compiled with dynamic shapes
    reused: bool = False  # compiled by an earlier entry (dynamic shapes)


def eager_impl(op: str, w: Workload | None = None) -> Impl:
    fn = optable.BY_NAME[op].reference
    return Impl("eager", w.wrap(fn) if w is not None else fn)


def backend_impl(op: str, backend: str, w: Workload | None = None) -> Impl:
    public = optable.BY_NAME[op].public

    def fn(*a, **k):
        return public(*a, backend=backend, **k)
    return Impl(backend, w.wrap(fn) if w is not None else fn)


def compiled_impl(w: Workload, *, dynamic: bool = False, shared: dict | None = None) -> Impl:
    """torch.compile of the reference (fullgraph=True), compiled here by one forward+backward
    call whose wall time is reported as compile time.

    dynamic=False: compiled for this exact shape, after a dynamo reset (one entry's graphs at a
    time: no recompile limit, no reuse). dynamic=True: one dynamic-shape compile per (op, dtype)
    kept in `shared` and reused by later entries (the size sweep), whose first call is then
    not a compile (compile_s None, `reused` set)."""
    from torch._dynamo.utils import counters

    key = (w.op.name, w.dtype, w.pattern, w.autocast)
    reused = dynamic and shared is not None and key in shared
    if reused:
        fn = shared[key]
    else:
        if not dynamic or not shared:
            torch._dynamo.reset()
            if shared is not None:
                shared.clear()
        fn = torch.compile(w.wrap(w.op.reference), dynamic=dynamic, fullgraph=True)
        if dynamic and shared is not None:
            shared[key] = fn
    s = w.sets[0]
    hits = counters["inductor"]["fxgraph_cache_hit"]
    t0 = time.perf_counter()
    out = fn(*s.args, **s.kwargs)
    torch.autograd.grad(out, s.leaves, s.grad)
    if w.device.type == "cuda":
        torch.cuda.synchronize(w.device)
    elapsed = time.perf_counter() - t0
    return Impl("compile", fn, None if reused else elapsed,
                counters["inductor"]["fxgraph_cache_hit"] - hits, dynamic, reused)


# ---------------------------------------------------------------------------- steps
def forward_step(w: Workload, impl: Impl) -> Step:
    def run(i, _):
        s = w.sets[i]
        return impl.fn(*s.args, **s.kwargs)
    return Step(run)


def backward_step(w: Workload, impl: Impl) -> Step:
    def prepare(i):
        s = w.sets[i]
        return impl.fn(*s.args, **s.kwargs)

    def run(i, out):
        s = w.sets[i]
        return torch.autograd.grad(out, s.leaves, s.grad)
    return Step(run, prepare)


def forward_backward_step(w: Workload, impl: Impl) -> Step:
    def run(i, _):
        s = w.sets[i]
        return torch.autograd.grad(impl.fn(*s.args, **s.kwargs), s.leaves, s.grad)
    return Step(run)


MODES = {"forward": forward_step, "backward": backward_step, "forward+backward": forward_backward_step}


def copy_step(x: torch.Tensor, n_sets: int) -> Step:
    """A same-size device copy, rotating through its own buffers like the op's inputs."""
    src = [x.detach().clone() for _ in range(n_sets)]
    dst = [torch.empty_like(x) for _ in range(n_sets)]
    return Step(lambda i, _: dst[i].copy_(src[i]))


# ---------------------------------------------------------------------------- saved memory
def saved_for_backward(w: Workload, impl: Impl) -> tuple[int, int]:
    """(bytes saved for backward, of which not the inputs' own storage) by one forward call,
    counted with saved_tensors_hooks over distinct storages."""
    s = w.sets[0]
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = impl.fn(*s.args, **s.kwargs)
    del out
    inputs = {t.untyped_storage().data_ptr() for t in list(s.args) + list(s.kwargs.values())
              if isinstance(t, torch.Tensor)}
    total = sum(saved.values())
    extra = sum(v for k, v in saved.items() if k not in inputs)
    return total, extra
