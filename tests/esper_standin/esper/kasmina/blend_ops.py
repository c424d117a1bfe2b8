"""Stand-in for esper.kasmina.blend_ops: Esper's eager blend functions."""

import torch


def blend_add(host_features, seed_features, alpha):
    a = alpha.clamp(0, 1).to(host_features.dtype)
    return torch.lerp(host_features, seed_features.to(host_features.dtype), a)


def multiply_valve_multiplier(alpha, seed_modulation):
    return 1 + alpha.clamp(0, 1) * torch.tanh(seed_modulation)


def blend_multiply(host_features, seed_features, alpha, *, seed_input=None):
    s = seed_features.to(host_features.dtype)
    r = host_features if seed_input is None else seed_input.to(host_features.dtype)
    return host_features * multiply_valve_multiplier(alpha.to(host_features.dtype), s - r)


def gate_effective_alpha(alpha, gate):
    return (alpha.clamp(0, 1) * gate.clamp(0, 1)).clamp(0, 1)


def blend_gate(host_features, seed_features, alpha, gate):
    e = gate_effective_alpha(alpha, gate).to(host_features.dtype)
    return torch.lerp(host_features, seed_features.to(host_features.dtype), e)
