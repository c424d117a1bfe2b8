"""The Triton backend's torch glue: each op registered with torch.library as
``kasmina::triton_<name>`` (fake kernel and autograd included), an autograd.Function per op
for eager calls, and the public functions.

The registered ops are what torch.compile and other tracers see. Their schemas are the native
ops' (csrc/ops/registration.cpp) under a ``triton_`` prefix, backward ops included: a backward
op takes the gradient, the forward's inputs and one ``need_<input>_grad`` flag for each input
whose gradient may be skipped, and returns one gradient per tensor input, always computing the
feature gradients; a weight gradient nobody needs is zeros of the weight's shape and a seed
input gradient nobody needs (or an absent seed input's) an empty placeholder, as native's.

Plain eager calls (no tracing, no dispatch modes, plain tensors) skip the dispatcher round
trip: without a gradient wanted they launch the forward kernels directly, else they go through
the op's autograd.Function, whose backward launches only the gradients asked for. The same
Function takes calls inside forward-mode AD and torch.func transforms, so that its jvp refuses
forward-mode AD, naming the op (a registered op would run with a silently missing tangent),
and its vmap runs the op per batch entry.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _common as C
from . import elementwise as E
from . import gate as G

_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_peek_functorch = torch._C._functorch.peek_interpreter_stack
_is_compiling = torch.compiler.is_compiling
_DelayedError = torch._C._functions.DelayedError
_Tensor = torch.Tensor
_FEATURES = ("h", "s", "seed_input", "m", "x")  # gradients shaped like the input (empty_like)


def eager_ok(*tensors) -> bool:
    """True when a call may skip the dispatcher: plain tensors, no dispatch modes, no
    functorch transform, not being traced by torch.compile."""
    if _is_compiling() or _len_dispatch_stack() or _peek_functorch() is not None:
        return False
    for t in tensors:
        if t is not None and type(t) is not _Tensor:
            return False
    return True


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
    """One op: its kernels' entry points, registered ops and eager autograd.Function.
    `backward(grad, *inputs, need)` takes one need flag per tensor input and returns one
    gradient per tensor input, None where not needed."""

    def __init__(self, name, inputs, forward, fake, backward=None, flags=(), autograd=None):
        self.name = f"kasmina::{name}"
        params = [p.split() for p in inputs.split(", ")]
        self.tensor_names = [n for t, n in params if t.startswith("Tensor")]
        self.n_tensors = len(self.tensor_names)
        self.flag_index = [self.tensor_names.index(f) for f in flags]
        self.forward, self.backward = forward, backward
        op = torch.library.custom_op(f"kasmina::triton_{name}", forward, mutates_args=(),
                                     schema=f"({inputs}) -> Tensor")
        op.register_fake(fake)
        self.op = getattr(torch.ops.kasmina, f"triton_{name}").default
        if backward is not None:
            returns = ", ".join(["Tensor"] * self.n_tensors)
            schema = (f"(Tensor grad, {inputs}{''.join(f', bool need_{f}_grad' for f in flags)})"
                      f" -> {returns if self.n_tensors == 1 else f'({returns})'}")
            bwd = torch.library.custom_op(f"kasmina::triton_{name}_backward", self._backward_op,
                                          mutates_args=(), schema=schema)
            bwd.register_fake(self._backward_fake)
            self.backward_op = getattr(torch.ops.kasmina, f"triton_{name}_backward").default
            autograd = (self._setup_context, self._backward_through_op, self._eager_backward)
        op.register_autograd(autograd[1], setup_context=autograd[0])
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
            else tensors[0].new_empty((0,)) if name in _FEATURES
            else torch.zeros(x.shape, dtype=x.dtype, device=x.device)
            for g, x, name in zip(grads, tensors, self.tensor_names))
        return out[0] if self.n_tensors == 1 else out

    def _backward_fake(self, grad, *args):
        tensors, _, need = self._split(args)
        out = tuple(
            (torch.empty_like(x) if n and x is not None else tensors[0].new_empty((0,))) if name in _FEATURES
            else x.new_empty(x.shape)
            for x, n, name in zip(tensors, need, self.tensor_names))
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
        if not eager_ok(grad):
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
def _like_host(h, *rest):
    return torch.empty_like(h)


def _valve_fake(alpha, m):
    return torch.empty_like(m, dtype=C.result_type(alpha, m))


def _effective_alpha_fake(alpha, gate):
    shape = torch.broadcast_shapes(alpha.shape, gate.shape)
    return torch.empty(shape, dtype=C.result_type(alpha, gate), device=G.pair_device(alpha, gate))


def _pool_fake(x, topology):
    return x.new_empty((x.shape[0], x.shape[1] if topology == "cnn" else x.shape[2]))


def _gate_network_fake(x, w1, b1, w2, b2, topology):
    return x.new_empty(G.gate_shape(x.shape[0], topology))


def _pool_backward(grad, x, topology, need):
    return (G.gated_pool_backward(grad, x, topology),)


_ADD = _Op("blend_add", "Tensor h, Tensor s, Tensor alpha", E.blend_add_forward, _like_host,
           E.blend_add_backward, flags=("alpha",))
_GATE = _Op("blend_gate", "Tensor h, Tensor s, Tensor alpha, Tensor gate", E.blend_gate_forward,
            _like_host, E.blend_gate_backward, flags=("alpha", "gate"))
_MULTIPLY = _Op("blend_multiply", "Tensor h, Tensor s, Tensor alpha, Tensor? seed_input",
                E.blend_multiply_forward, _like_host, E.blend_multiply_backward,
                flags=("alpha", "seed_input"))
_VALVE = _Op("multiply_valve_multiplier", "Tensor alpha, Tensor m", E.valve_multiplier_forward,
             _valve_fake, E.valve_multiplier_backward, flags=("alpha",))
_EFFECTIVE_ALPHA = _Op("gate_effective_alpha", "Tensor alpha, Tensor gate", G.gate_effective_alpha_forward,
                       _effective_alpha_fake, G.gate_effective_alpha_backward, flags=("alpha", "gate"))
_POOL = _Op("gated_pool", "Tensor x, str topology", G.gated_pool_forward, _pool_fake, _pool_backward)
_GATE_NETWORK = _Op("gate_network", "Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, str topology",
                    G.gate_network_forward, _gate_network_fake, G.gate_network_backward)


# STE's gradient is the incoming one to both inputs (s's in its dtype): plain autograd, no kernel.
def _ste_setup_context(ctx, inputs, output):
    ctx.seed_dtype = inputs[1].dtype


def _ste_backward(ctx, grad):
    return grad, (grad if grad.dtype == ctx.seed_dtype else grad.to(ctx.seed_dtype))


_STE = _Op("ste_forward", "Tensor h, Tensor s", E.ste_forward, _like_host,
           autograd=(_ste_setup_context, _ste_backward, _ste_backward))


# ---------------------------------------------------------------------------- public functions
def blend_add(h, s, alpha):
    return _ADD(h, s, alpha)


def blend_with_isolation(h, s, alpha):
    return _ADD(h, s, alpha)


def blend_gate(h, s, alpha, gate):
    return _GATE(h, s, alpha, gate)


def blend_multiply(h, s, alpha, *, seed_input=None):
    return _MULTIPLY(h, s, alpha, seed_input)


def ste_forward(h, s):
    return _STE(h, s)


def multiply_valve_multiplier(alpha, m):
    return _VALVE(alpha, m)


def gate_effective_alpha(alpha, gate):
    return _EFFECTIVE_ALPHA(alpha, gate)


def gated_pool(x, topology):
    return _POOL(x, topology)


def gate_network(x, w1, b1, w2, b2, *, topology):
    return _GATE_NETWORK(x, w1, b1, w2, b2, topology)
