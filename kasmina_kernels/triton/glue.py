"""The Triton backend's torch glue: each kernel op of the table (`optable`, `Op.kernel`)
registered as ``kasmina::triton_<name>`` with the table's (native's) schemas, backward op and
fake kernels (the pooled input's gradient is dense on every device), an autograd.Function
per op for eager calls, and the public functions. A backward op takes the gradient, the
forward's inputs and one ``need_<input>_grad`` flag per input whose gradient may be skipped;
as native's, a weight gradient nobody needs is zeros and a seed input's an empty placeholder.

Plain eager calls (no tracing, no dispatch modes, plain tensors) skip the dispatcher: without
a gradient wanted they launch the forward kernels directly, else they go through the
Function, whose backward launches only the gradients asked for. Calls inside forward-mode AD
and torch.func transforms take the Function too, whose jvp refuses forward-mode AD naming the
op (a registered op would run with a silently missing tangent) and whose vmap runs the op per
batch entry.
"""

from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as _forward_ad

from ..optable import OPS
from . import elementwise, gate

_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_peek_functorch = torch._C._functorch.peek_interpreter_stack
_is_compiling = torch.compiler.is_compiling
_DelayedError = torch._C._functions.DelayedError
_Tensor = torch.Tensor


def first_order_only(op: str, grads: tuple, inputs: tuple) -> tuple:
    """The gradients a backward returns, made to raise (naming `op`) if they are ever
    differentiated: the fused gradient kernels have no derivative of their own, so a double
    backward (create_graph=True, then differentiating the gradient) is an error instead of a
    silently missing or zero second derivative. Free when grad mode is off (a plain backward)."""
    if not torch.is_grad_enabled():
        return grads
    live = [t for t in inputs if t is not None and t.requires_grad]
    if not live:
        return grads
    msg = (f"{op}: double backward (differentiating a gradient computed with create_graph=True) "
           "is not supported: the fused Triton gradient kernels have no derivative of their own; "
           'use backend="reference" for higher-order derivatives')
    # one error node whose edges lead to the inputs the gradients depend on, so that
    # differentiating a gradient with respect to any of them reaches it (and raises)
    out = _DelayedError(msg.encode(), len(grads) + len(live))(*grads, *live)
    return tuple(out[: len(grads)])


class _Op:
    """One op of the table (`optable.Op`): its kernels' entry points, registered ops and eager
    autograd.Function. `backward(grad, *inputs, need)` takes one need flag per input in
    `Op.grads` (the leading inputs) and returns their gradients in that order, None where not
    needed."""

    def __init__(self, op, forward, backward=None, autograd=None):
        self.name, self.weights = f"kasmina::{op.name}", op.weights
        self.grads, self.n_tensors = op.grads, len(op.grads)
        self.flag_index = [op.grads.index(f) for f in op.need_flags]
        self.forward, self.backward = forward, backward
        name = f"kasmina::triton_{op.name}"
        registered = torch.library.custom_op(name, forward, mutates_args=(), schema=_signature(op.schema))
        registered.register_fake(op.forward_fake)
        self.op = getattr(torch.ops.kasmina, f"triton_{op.name}").default
        if backward is not None:
            bwd = torch.library.custom_op(f"{name}_backward", self._backward_op, mutates_args=(),
                                          schema=_signature(op.backward))
            bwd.register_fake(functools.partial(op.backward_fake, dense_pooled=True))
            self.backward_op = getattr(torch.ops.kasmina, f"triton_{op.name}_backward").default
            autograd = (self._setup_context, self._backward_through_op, self._eager_backward)
        registered.register_autograd(autograd[1], setup_context=autograd[0])
        self.function = self._make_function(autograd[0], autograd[2])

    def _split(self, args):
        """(tensor inputs, other inputs, need flags) of a backward op's arguments."""
        n = len(args) - len(self.flag_index)
        inputs, flags = args[:n], args[n:]
        need = [True] * self.n_tensors
        for i, flag in zip(self.flag_index, flags):
            need[i] = flag
        return inputs[: self.n_tensors], inputs[self.n_tensors:], need

    def _backward_op(self, grad, *args):
        tensors, others, need = self._split(args)
        grads = self.backward(grad, *tensors, *others, need)
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
        grads = self.backward(grad, *inputs, *ctx.others, ctx.needs_input_grad[: self.n_tensors])
        return first_order_only(self.name, tuple(grads) + (None,) * len(ctx.others), (grad,) + inputs)

    def _make_function(self, setup_context, backward):
        spec = self

        def jvp(ctx, *tangents):
            raise RuntimeError(
                f"{spec.name}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not "
                'supported: the fused op has no forward derivative; use backend="reference" for it')

        def vmap(info, in_dims, *args):
            rows = [function.apply(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                    for i in range(info.batch_size)]
            return torch.stack(rows), 0

        function = type(self.name.split("::")[1], (torch.autograd.Function,), {
            "forward": staticmethod(self.forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "vmap": staticmethod(vmap),
        })
        return function

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


# ---------------------------------------------------------------------------- the ops
def _signature(schema):
    """A table schema without its op name, as torch.library.custom_op takes it."""
    return schema[schema.index("("):]


def _pool_backward(grad, x, topology, need):
    return (gate.gated_pool_backward(grad, x, topology),)


# STE's gradient is the incoming one to both inputs (s's in its dtype): plain autograd, no kernel.
def _ste_setup_context(ctx, inputs, output):
    ctx.seed_dtype = inputs[1].dtype


def _ste_backward(ctx, grad):
    return grad, (grad if grad.dtype == ctx.seed_dtype else grad.to(ctx.seed_dtype))


# The forward and backward entry points of each kernel op of the table (`Op.kernel`).
_KERNELS = {
    "blend_add": (elementwise.blend_add_forward, elementwise.blend_add_backward),
    "blend_multiply": (elementwise.blend_multiply_forward, elementwise.blend_multiply_backward),
    "blend_gate": (elementwise.blend_gate_forward, elementwise.blend_gate_backward),
    "ste_forward": (elementwise.ste_forward, None, (_ste_setup_context, _ste_backward, _ste_backward)),
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
