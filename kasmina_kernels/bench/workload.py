"""What is timed: rotating input sets for one (op, shape, dtype) (from `kasmina_kernels.opcases`
or `esper`: random, never zero), the implementations run on them (eager reference,
torch.compile of the reference, each kernel backend), and the timed steps. Rotation: enough
copies of the input set to span more than `rotate_bytes` (on GPU twice the L2 cache), so a
timed call never finds its inputs in cache from the previous one.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import opcases, optable
from . import esper
from .timing import Step, synchronize

MAX_SETS = 64


@dataclass
class InputSet:
    args: list
    kwargs: dict
    leaves: list[torch.Tensor]  # the inputs that require grad (what backward differentiates)
    grad: torch.Tensor  # incoming gradient for the output


def _input_set(names, args, kwargs, grad, no_grad: frozenset) -> InputSet:
    """Fresh copies (same memory format) of the floating-point inputs, leaves that require grad
    unless named in `no_grad` (`names`: the positional inputs')."""
    def leaf(name, v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().clone().requires_grad_(name not in no_grad)
        return v
    args = [leaf(n, a) for n, a in zip(names, args)]
    kwargs = {k: leaf(k, v) for k, v in kwargs.items()}
    leaves = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
    return InputSet(args, kwargs, leaves, grad.clone())


@dataclass
class Workload:
    op: optable.Op
    dtype: torch.dtype
    device: torch.device
    sets: list[InputSet]
    base_args: list  # set 0's values, not leaves (for checking)
    base_kwargs: dict
    pattern: str  # "isolated" (every input requires grad) or an esper.PATTERNS key
    autocast: bool  # every call runs under bf16 autocast
    no_grad: frozenset  # inputs passed without grad (by name)
    inputs: dict  # esper.describe of set 0: layouts, dtypes, requires-grad flags

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
        def under_autocast(*args, **kwargs):
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return fn(*args, **kwargs)
        return functools.wraps(fn)(under_autocast) if self.autocast else fn


def build(op: optable.Op, shape, dtype, device, gen: torch.Generator,
          rotate_bytes: int, *, pattern: str = "isolated", autocast: bool = False) -> Workload:
    """Input sets for one entry: pattern "isolated", `opcases.make`'s (all contiguous, all
    requiring grad); an `esper.PATTERNS` key, Esper's call (`esper.make_inputs`). The incoming
    gradient has the output's memory format."""
    device = torch.device(device)
    if pattern == "isolated":
        args, kwargs = opcases.make(op, shape, dtype, device, gen)
        no_grad = frozenset()
    else:
        args, kwargs = esper.make_inputs(op.name, pattern, shape, dtype, device, gen, autocast=autocast)
        no_grad = esper.NO_GRAD
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        out = op.reference(*args, **kwargs)
    # in the output's layout, as a layer's gradient has
    grad = opcases.incoming_grad(out, int(torch.randint(1 << 31, (), generator=gen)))
    first = _input_set(op.inputs, args, kwargs, grad, no_grad)
    named = {**opcases.leaves_of(op, first.args, first.kwargs), "grad": grad}
    set_bytes = sum(t.numel() * t.element_size() for t in named.values() if isinstance(t, torch.Tensor))
    n = max(1, min(MAX_SETS, math.ceil(rotate_bytes / max(set_bytes, 1))))
    sets = [first] + [_input_set(op.inputs, first.args, first.kwargs, grad, no_grad) for _ in range(n - 1)]
    return Workload(op, dtype, device, sets, list(args), dict(kwargs), pattern, autocast, no_grad,
                    esper.describe(named))


# ---------------------------------------------------------------------------- implementations
@dataclass
class Impl:
    name: str  # "eager", "compile", or a backend name
    fn: Callable
    compile_s: float | None = None  # first forward+backward call, for "compile"
    cache_hits: int | None = None  # graphs inductor found in its on-disk cache while compiling
    dynamic: bool = False  # compiled with dynamic shapes
    reused: bool = False  # compiled by an earlier entry (dynamic shapes)


def eager_impl(w: Workload) -> Impl:
    return Impl("eager", w.wrap(w.op.reference))


def backend_impl(w: Workload, backend: str) -> Impl:
    return Impl(backend, w.wrap(functools.partial(w.op.public, backend=backend)))


def compiled_impl(w: Workload, shared: dict, *, dynamic: bool = False) -> Impl:
    """torch.compile of the reference (fullgraph=True), compiled by one forward+backward call
    whose wall time is the compile time. dynamic=False: for this exact shape, after a dynamo
    reset. dynamic=True: one compile per (op, dtype) kept in `shared` and reused by later
    entries (the size sweep), whose first call is then not a compile (`reused`)."""
    from torch._dynamo.utils import counters

    key = (w.op.name, w.dtype, w.pattern, w.autocast)
    if not dynamic or not shared:
        torch._dynamo.reset()
        shared.clear()
    reused = dynamic and key in shared
    fn = shared[key] if reused else torch.compile(w.wrap(w.op.reference), dynamic=dynamic,
                                                  fullgraph=True)
    if dynamic:
        shared[key] = fn
    s = w.sets[0]
    hits = counters["inductor"]["fxgraph_cache_hit"]
    t0 = time.perf_counter()
    torch.autograd.grad(fn(*s.args, **s.kwargs), s.leaves, s.grad)
    synchronize(w.device)
    elapsed = time.perf_counter() - t0
    return Impl("compile", fn, None if reused else elapsed,
                counters["inductor"]["fxgraph_cache_hit"] - hits, dynamic, reused)


# ---------------------------------------------------------------------------- steps
def forward_step(w: Workload, impl: Impl) -> Step:
    return Step(lambda i, _: impl.fn(*w.sets[i].args, **w.sets[i].kwargs))


def backward_step(w: Workload, impl: Impl) -> Step:
    forward = forward_step(w, impl).run
    return Step(lambda i, out: torch.autograd.grad(out, w.sets[i].leaves, w.sets[i].grad),
                lambda i: forward(i, None))


def forward_backward_step(w: Workload, impl: Impl) -> Step:
    """The backward step with its untimed forward timed too."""
    backward = backward_step(w, impl)
    return Step(lambda i, _: backward.run(i, backward.state(i)))


MODES = {"forward": forward_step, "backward": backward_step, "forward+backward": forward_backward_step}


def copy_step(x: torch.Tensor, n_sets: int) -> Step:
    """A same-size device copy, rotating through its own buffers like the op's inputs."""
    src = [x.detach().clone() for _ in range(n_sets)]
    dst = [torch.empty_like(x) for _ in range(n_sets)]
    return Step(lambda i, _: dst[i].copy_(src[i]))


def gradient_layouts(w: Workload, impl: Impl) -> dict:
    """{"grad_layouts": {input name: `esper.layout`}} of the gradients one forward+backward
    call returns. Eager's follow the incoming gradient, not their input: a channels_last
    gradient for an NCHW seed is left for whatever consumes it to move."""
    s = w.sets[0]
    grads = torch.autograd.grad(impl.fn(*s.args, **s.kwargs), s.leaves, s.grad)
    names = [n for n, t in opcases.leaves_of(w.op, s.args, s.kwargs).items()
             if any(t is leaf for leaf in s.leaves)]
    return {"grad_layouts": dict(zip(names, map(esper.layout, grads)))}


def saved_for_backward(w: Workload, impl: Impl) -> dict:
    """{"saved_bytes": bytes saved for backward by one forward call, "saved_extra_bytes": of
    which not the inputs' own storage}, counted with saved_tensors_hooks over distinct storages."""
    s = w.sets[0]
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        impl.fn(*s.args, **s.kwargs)
    inputs = {t.untyped_storage().data_ptr() for t in [*s.args, *s.kwargs.values()]
              if isinstance(t, torch.Tensor)}
    return {"saved_bytes": sum(saved.values()),
            "saved_extra_bytes": sum(v for k, v in saved.items() if k not in inputs)}
