"""The public ops: check the inputs once, pick the backend, call it.

Every op takes ``backend=None`` (the current default, see `kasmina_kernels.backends`) or a
backend name. The semantics are the references' in `kasmina_kernels.reference`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import validation
from .backends import backend_module, resolve_backend

__all__ = [
    "blend_add",
    "blend_multiply",
    "blend_gate",
    "gate_effective_alpha",
    "multiply_valve_multiplier",
    "ste_forward",
    "blend_with_isolation",
    "gated_pool",
    "gate_network",
]

def _impl(tensor: torch.Tensor, backend: str | None) -> ModuleType:
    return backend_module(resolve_backend(tensor, backend))


def _feature_operand(alpha: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The operand whose device decides the backend (a 0-dim CPU scalar never does)."""
    return other if alpha.dim() == 0 and alpha.device.type == "cpu" else alpha


def blend_add(h, s, alpha, *, backend=None):
    """ADD: lerp(h, s.to(h.dtype), clamp01(alpha).to(h.dtype))."""
    validation.check_blend("blend_add", h, s, alpha)
    return _impl(h, backend).blend_add(h, s, alpha)


def blend_with_isolation(h, s, alpha, *, backend=None):
    """The isolation blend: identical to ADD."""
    validation.check_blend("blend_with_isolation", h, s, alpha)
    return _impl(h, backend).blend_with_isolation(h, s, alpha)


def blend_multiply(h, s, alpha, *, seed_input=None, backend=None):
    """MULTIPLY: h * (1 + clamp01(alpha) * tanh(s - r)), r = seed_input (default: h)."""
    validation.check_blend("blend_multiply", h, s, alpha)
    if seed_input is not None:
        validation.check_like_host("blend_multiply", h, "seed_input", seed_input)
    return _impl(h, backend).blend_multiply(h, s, alpha, seed_input=seed_input)


def blend_gate(h, s, alpha, gate, *, backend=None):
    """GATE: lerp with the effective alpha clamp01(clamp01(alpha) * clamp01(gate))."""
    validation.check_blend("blend_gate", h, s, alpha)
    validation.check_weight("blend_gate", "gate", gate, h)
    if not gate.is_floating_point():
        raise TypeError(f"blend_gate: gate must be a floating-point tensor, got {gate.dtype}")
    return _impl(h, backend).blend_gate(h, s, alpha, gate)


def gate_effective_alpha(alpha, gate, *, backend=None):
    """clamp01(clamp01(alpha) * clamp01(gate)), in the promoted dtype of alpha and gate."""
    validation.check_gate_pair("gate_effective_alpha", alpha, gate)
    return _impl(_feature_operand(alpha, gate), backend).gate_effective_alpha(alpha, gate)


def multiply_valve_multiplier(alpha, m, *, backend=None):
    """1 + clamp01(alpha) * tanh(m), in the promoted dtype of alpha and m."""
    validation.check_features("multiply_valve_multiplier", "m", m)
    validation.check_weight("multiply_valve_multiplier", "alpha", alpha, m)
    return _impl(m, backend).multiply_valve_multiplier(alpha, m)


def ste_forward(h, s, *, backend=None):
    """Straight-through: value h (NaN where s is not finite), gradient 1 to h and s."""
    validation.check_features("ste_forward", "host", h)
    validation.check_like_host("ste_forward", h, "seed", s)
    return _impl(h, backend).ste_forward(h, s)


def gated_pool(x, topology, *, backend=None):
    """Mean over (H, W) of a (B,C,H,W) x ("cnn") or over T of a (B,T,C) x ("transformer")."""
    validation.check_topology("gated_pool", x, topology)
    return _impl(x, backend).gated_pool(x, topology)


def gate_network(x, w1, b1, w2, b2, *, topology, backend=None):
    """sigmoid(W2 relu(W1 pool(x) + b1) + b2), shaped (B,1,1,1) ("cnn") or (B,1,1)."""
    validation.check_gate_network("gate_network", x, w1, b1, w2, b2, topology)
    return _impl(x, backend).gate_network(x, w1, b1, w2, b2, topology=topology)
