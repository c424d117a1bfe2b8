"""The native backend: the compiled extension `kasmina_kernels._C` (C++ CPU kernels, and CUDA
kernels when built with CUDA). Importing this module loads the extension, which registers
the `torch.ops.kasmina` schemas, CPU/CUDA kernels and C++ autograd; the fake kernels that let
`torch.compile` trace the ops are registered here."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading registers torch.ops.kasmina)

_ops = torch.ops.kasmina


def built_with_cuda() -> bool:
    return bool(_C.build_info()["with_cuda"])


def build_info() -> dict:
    return dict(_C.build_info())


# ---------------------------------------------------------------------------- fake kernels
# Each mirrors its C++ kernel's allocation: outputs and feature gradients follow their
# tensor's layout (empty_like), weight gradients are contiguous in the weight's shape.
def _weight_grad(w: torch.Tensor) -> torch.Tensor:
    return w.new_empty(w.shape)


@torch.library.register_fake("kasmina::blend_add")
def _(h, s, alpha):
    return torch.empty_like(h)


@torch.library.register_fake("kasmina::blend_add_backward")
def _(grad, h, s, alpha, need_alpha_grad):
    return torch.empty_like(h), torch.empty_like(s), _weight_grad(alpha)


@torch.library.register_fake("kasmina::blend_gate")
def _(h, s, alpha, gate):
    return torch.empty_like(h)


@torch.library.register_fake("kasmina::blend_gate_backward")
def _(grad, h, s, alpha, gate, need_alpha_grad, need_gate_grad):
    return torch.empty_like(h), torch.empty_like(s), _weight_grad(alpha), _weight_grad(gate)


@torch.library.register_fake("kasmina::blend_multiply")
def _(h, s, alpha, seed_input):
    return torch.empty_like(h)


@torch.library.register_fake("kasmina::blend_multiply_backward")
def _(grad, h, s, alpha, seed_input, need_alpha_grad, need_seed_input_grad):
    # dr: an empty placeholder when r is h or wants no gradient
    if seed_input is None or not need_seed_input_grad:
        dr = h.new_empty((0,))
    else:
        dr = torch.empty_like(seed_input)
    return torch.empty_like(h), torch.empty_like(s), _weight_grad(alpha), dr


@torch.library.register_fake("kasmina::ste_forward")
def _(h, s):
    return torch.empty_like(h)


@torch.library.register_fake("kasmina::multiply_valve_multiplier")
def _(alpha, m):
    return torch.empty_like(m, dtype=torch.result_type(alpha, m))


@torch.library.register_fake("kasmina::multiply_valve_multiplier_backward")
def _(grad, alpha, m, need_alpha_grad):
    return _weight_grad(alpha), torch.empty_like(m)


def _pair_device(alpha: torch.Tensor, gate: torch.Tensor) -> torch.device:
    # a 0-dim CPU scalar defers to the other operand's device
    if alpha.dim() == 0 and alpha.device.type == "cpu":
        return gate.device
    return alpha.device


@torch.library.register_fake("kasmina::gate_effective_alpha")
def _(alpha, gate):
    shape = torch.broadcast_shapes(alpha.shape, gate.shape)
    return torch.empty(shape, dtype=torch.result_type(alpha, gate), device=_pair_device(alpha, gate))


@torch.library.register_fake("kasmina::gate_effective_alpha_backward")
def _(grad, alpha, gate, need_alpha_grad, need_gate_grad):
    return _weight_grad(alpha), _weight_grad(gate)


@torch.library.register_fake("kasmina::gated_pool")
def _(x, topology):
    channels = x.shape[1] if topology == "cnn" else x.shape[2]
    return x.new_empty((x.shape[0], channels))


def _pooled_input_grad(x: torch.Tensor, topology: str) -> torch.Tensor:
    # the CPU kernels return the (B, C) values broadcast over the positions with stride 0;
    # the CUDA kernels write a dense dx
    if x.device.type != "cpu" or x.numel() == 0:
        return torch.empty_like(x)
    if topology == "cnn":
        values = x.new_empty((x.shape[0], x.shape[1], 1, 1))
    else:
        values = x.new_empty((x.shape[0], 1, x.shape[2]))
    return values.expand(x.shape)


@torch.library.register_fake("kasmina::gated_pool_backward")
def _(grad, x, topology):
    return _pooled_input_grad(x, topology)


@torch.library.register_fake("kasmina::gate_network")
def _(x, w1, b1, w2, b2, topology):
    shape = (x.shape[0], 1, 1, 1) if topology == "cnn" else (x.shape[0], 1, 1)
    return x.new_empty(shape)


@torch.library.register_fake("kasmina::gate_network_backward")
def _(grad, x, w1, b1, w2, b2, topology):
    return (
        _pooled_input_grad(x, topology),
        _weight_grad(w1),
        _weight_grad(b1),
        _weight_grad(w2),
        _weight_grad(b2),
    )


# ---------------------------------------------------------------------------- ops
# Bound once: an OpOverload call is the cheapest way into the dispatcher from Python.
_blend_add = _ops.blend_add.default
_blend_gate = _ops.blend_gate.default
_blend_multiply = _ops.blend_multiply.default
_ste_forward = _ops.ste_forward.default
_valve = _ops.multiply_valve_multiplier.default
_gate_effective_alpha = _ops.gate_effective_alpha.default
_gated_pool = _ops.gated_pool.default
_gate_network = _ops.gate_network.default


def blend_add(h, s, alpha):
    return _blend_add(h, s, alpha)


def blend_with_isolation(h, s, alpha):
    return _blend_add(h, s, alpha)


def blend_gate(h, s, alpha, gate):
    return _blend_gate(h, s, alpha, gate)


def blend_multiply(h, s, alpha, *, seed_input=None):
    return _blend_multiply(h, s, alpha, seed_input)


def ste_forward(h, s):
    return _ste_forward(h, s)


def multiply_valve_multiplier(alpha, m):
    return _valve(alpha, m)


def gate_effective_alpha(alpha, gate):
    return _gate_effective_alpha(alpha, gate)


def gated_pool(x, topology):
    return _gated_pool(x, topology)


def gate_network(x, w1, b1, w2, b2, *, topology):
    return _gate_network(x, w1, b1, w2, b2, topology)
