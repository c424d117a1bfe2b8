"""The triton backend: fused Triton kernels, forward and backward, for every op, and their
torch glue. Runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, slow, for tests). Exposes the same functions, with the same
signatures, as `kasmina_kernels.native`. Kernels by family: `lerp.py` (ADD, GATE, isolation),
`multiply.py` (MULTIPLY, the valve), `elementwise.py` (the kernel those, STE and the effective
alpha share), `gate.py` (gated pooling, the gate network); `_common.py` holds the shared
loads, stores, rounding and iteration helpers.

Each kernel op of the table (`optable`, `Op.kernel`) is registered as
``kasmina::triton_<name>`` with the table's (native's) schemas, backward op and fake kernels
(the pooled input's gradient is dense on every device). A backward op takes the gradient,
the forward's inputs and one ``need_<input>_grad`` flag per input whose gradient may be
skipped; as native's, a weight gradient nobody needs is zeros and a seed input's an empty
placeholder.

Plain eager calls (no tracing, no dispatch modes, plain tensors) skip the dispatcher: without
a gradient wanted they launch the forward kernels directly, else they go through an
autograd.Function, whose backward launches only the gradients asked for. Calls inside
forward-mode AD and torch.func transforms take the Function too, whose jvp refuses
forward-mode AD naming the op (a registered op would run with a silently missing tangent)
and whose vmap runs the op per batch entry.
"""

from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as _forward_ad

from ..optable import NAMES, OPS
from . import elementwise, gate

_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_peek_functorch = torch._C._functorch.peek_interpreter_stack
_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor


class _FirstOrderOnly(torch.autograd.Function):
    """The gradients a backward returns, unchanged, wired to the inputs they depend on: the
    fused gradient kernels have no derivative of their own, so differentiating a gradient
    (create_graph=True, then backward through it) raises naming the op instead of giving a
    silently missing or zero second derivative."""

    @staticmethod
    def forward(ctx, op, n, *tensors):
        ctx.op = op
        return tensors[:n]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ctx.op}: double backward (differentiating a gradient computed with create_graph=True) "
            "is not supported: the fused Triton gradient kernels have no derivative of their own; "
            'use backend="reference" for higher-order derivatives')


def _signature(schema):
    """A table schema without its op name, as torch.library.custom_op takes it."""
    return schema[schema.index("("):]


# STE's gradient is the incoming one to both inputs (s's in its dtype): plain autograd, no kernel.
def _ste_setup_context(ctx, inputs, output):
    ctx.seed_dtype = inputs[1].dtype


def _ste_backward(ctx, grad):
    return grad, (grad if grad.dtype == ctx.seed_dtype else grad.to(ctx.seed_dtype))


class _Op:
    """One kernel op of the table (`optable.Op`): its registered ops and eager
    autograd.Function. `backward(grad, *inputs, need)` takes one need flag per input of
    `Op.grads` (the leading inputs) and returns their gradients in that order, None where not
    needed; an op without one (STE) passes the gradient through."""

    def __init__(self, op, forward, backward):
        self.name, self.grads, self.weights = f"kasmina::{op.name}", op.grads, op.weights
        self.n_tensors = len(op.grads)
        self.flag_index = [op.grads.index(f) for f in op.need_flags]
        self.forward, self.backward = forward, backward
        name = f"triton_{op.name}"
        registered = torch.library.custom_op(f"kasmina::{name}", forward, mutates_args=(), schema=_signature(op.schema))
        registered.register_fake(op.forward_fake)
        self.op = getattr(torch.ops.kasmina, name).default
        setup_context, eager_backward, op_backward = _ste_setup_context, _ste_backward, _ste_backward
        if backward is not None:
            bwd = torch.library.custom_op(f"kasmina::{name}_backward", self._backward_op, mutates_args=(),
                                          schema=_signature(op.backward))
            bwd.register_fake(functools.partial(op.backward_fake, dense_pooled=True))
            self.backward_op = getattr(torch.ops.kasmina, f"{name}_backward").default
            setup_context, eager_backward = self._setup_context, self._eager_backward
            op_backward = self._backward_through_op
        registered.register_autograd(op_backward, setup_context=setup_context)
        self.function = type(op.name, (torch.autograd.Function,), {
            "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
            "backward": staticmethod(eager_backward), "jvp": staticmethod(self._jvp), "vmap": staticmethod(self._vmap)})

    def _backward_op(self, grad, *args):
        """The registered backward op: the inputs, then need flags for `Op.need_flags`."""
        n = len(args) - len(self.flag_index)
        need = [True] * self.n_tensors
        for i, flag in zip(self.flag_index, args[n:]):
            need[i] = flag
        tensors = args[: self.n_tensors]
        grads = self.backward(grad, *args[:n], need)
        out = tuple(
            g if g is not None
            else torch.zeros(x.shape, dtype=x.dtype, device=x.device) if name in self.weights
            else tensors[0].new_empty((0,))
            for g, x, name in zip(grads, tensors, self.grads))
        return out[0] if self.n_tensors == 1 else out

    def _setup_context(self, ctx, inputs, output):
        ctx.save_for_backward(*inputs[: self.n_tensors])
        ctx.others = inputs[self.n_tensors:]

    def _backward_through_op(self, ctx, grad):
        need = ctx.needs_input_grad
        grads = self.backward_op(grad, *ctx.saved_tensors, *ctx.others, *(need[i] for i in self.flag_index))
        if self.n_tensors == 1:
            grads = (grads,)
        return tuple(g if n else None for n, g in zip(need, grads)) + (None,) * len(ctx.others)

    def _eager_backward(self, ctx, grad):
        # the kernels run directly only outside tracing, dispatch modes and functorch transforms
        if _is_compiling() or _len_dispatch_stack() or _peek_functorch() is not None or type(grad) is not _Tensor:
            if _peek_functorch() is not None:  # the registered backward op has no functorch rule
                raise RuntimeError(
                    f"{self.name}: torch.func transforms that differentiate (grad, vjp, jacrev, ...) "
                    'are not supported by the fused op; call it outside the transform, or use backend="reference"')
            return self._backward_through_op(ctx, grad)
        inputs = ctx.saved_tensors
        grads = tuple(self.backward(grad, *inputs, *ctx.others, ctx.needs_input_grad[: self.n_tensors]))
        if torch.is_grad_enabled():  # create_graph=True: differentiating a gradient raises
            live = [t for t in (grad,) + inputs if t is not None and t.requires_grad]
            if live:
                grads = _FirstOrderOnly.apply(self.name, len(grads), *grads, *live)
        return grads + (None,) * len(ctx.others)

    def _jvp(self, ctx, *tangents):
        raise RuntimeError(
            f"{self.name}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not "
            'supported: the fused op has no forward derivative; use backend="reference" for it')

    def _vmap(self, info, in_dims, *args):
        rows = [self.function.apply(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                for i in range(info.batch_size)]
        return torch.stack(rows), 0

    def __call__(self, *args):
        tensors = args[: self.n_tensors] if self.n_tensors < len(args) else args
        if _is_compiling() or _len_dispatch_stack():
            return self.op(*args)
        for t in tensors:
            if t is not None and type(t) is not _Tensor:
                return self.op(*args)
        if _peek_functorch() is not None or _forward_ad._current_level >= 0:
            return self.function.apply(*args)
        if torch.is_grad_enabled():
            for t in tensors:
                if t is not None and t.requires_grad:
                    return self.function.apply(*args)
        return self.forward(*args)


def _pool_backward(grad, x, topology, need):
    return (gate.gated_pool_backward(grad, x, topology),)


# The forward and backward entry points of each kernel op of the table (`Op.kernel`).
_KERNELS = {
    "blend_add": (elementwise.blend_add_forward, elementwise.blend_add_backward),
    "blend_multiply": (elementwise.blend_multiply_forward, elementwise.blend_multiply_backward),
    "blend_gate": (elementwise.blend_gate_forward, elementwise.blend_gate_backward),
    "ste_forward": (elementwise.ste_forward, None),
    "multiply_valve_multiplier": (elementwise.valve_multiplier_forward, elementwise.valve_multiplier_backward),
    "gate_effective_alpha": (elementwise.gate_effective_alpha_forward, elementwise.gate_effective_alpha_backward),
    "gated_pool": (gate.gated_pool_forward, _pool_backward),
    "gate_network": (gate.gate_network_forward, gate.gate_network_backward),
}
_RUN = {op.name: _Op(op, *_KERNELS[op.name]) for op in OPS if op.kernel == op.name}


# ---------------------------------------------------------------------------- public functions
# The ops without keyword-only inputs are their runners; the others take them as the public
# functions do.
for _op in OPS:
    if not _op.kwonly:
        globals()[_op.name] = _RUN[_op.kernel]
del _op
_blend_multiply = _RUN["blend_multiply"]
_gate_network = _RUN["gate_network"]


def blend_multiply(h, s, alpha, *, seed_input=None):
    return _blend_multiply(h, s, alpha, seed_input)


def gate_network(x, w1, b1, w2, b2, *, topology):
    return _gate_network(x, w1, b1, w2, b2, topology)


__all__ = list(NAMES)
