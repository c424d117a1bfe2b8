"""Eager PyTorch references for every operator (docs/semantics.md#operators).

These are the oracles: each is written exactly in the order the contract gives, because in
bfloat16 the rounding points decide the bits. Tests and benchmarks import them from here;
nothing else in the package defines the math a second time in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .optable import NAMES
from .validation import TOPOLOGIES

__all__ = [*NAMES, "gate_hidden_size"]


def _cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`.to(like.dtype)` only when the dtype differs, as Esper's code casts; a 0-dim CPU scalar
    (alpha) also moves to like's device, while features stay where they are (features on
    another device fail in torch, as they do in Esper's code)."""
    if x.dtype != like.dtype or x.device != like.device:
        if x.ndim == 0 and x.is_cpu:
            return x.to(device=like.device, dtype=like.dtype)
        return x.to(like.dtype)
    return x


def blend_add(h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return torch.lerp(h, _cast(s, h), _cast(alpha.clamp(0, 1), h))


def multiply_valve_multiplier(alpha: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return 1 + alpha.clamp(0, 1) * torch.tanh(m)


def blend_multiply(h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, *,
                   seed_input: torch.Tensor | None = None) -> torch.Tensor:
    r = h if seed_input is None else _cast(seed_input, h)
    return h * (1 + _cast(alpha, h).clamp(0, 1) * torch.tanh(_cast(s, h) - r))


def gate_effective_alpha(alpha: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (alpha.clamp(0, 1) * gate.clamp(0, 1)).clamp(0, 1)


def blend_gate(h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return torch.lerp(h, _cast(s, h), _cast(gate_effective_alpha(alpha, gate), h))


def ste_forward(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = _cast(s, h)
    return h + (s - s.detach())


def blend_with_isolation(h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return blend_add(h, s, alpha)


def gated_pool(x: torch.Tensor, topology: str) -> torch.Tensor:
    return x.mean(dim=TOPOLOGIES[topology].positions)


def gate_hidden_size(channels: int) -> int:
    """Hidden width of the gate network: max(8, C // 4)."""
    return max(8, channels // 4)


def gate_network(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
                 topology: str) -> torch.Tensor:
    pooled = gated_pool(x, topology)
    hidden = F.relu(F.linear(pooled, w1, b1))
    gate = torch.sigmoid(F.linear(hidden, w2, b2))
    return gate.view(TOPOLOGIES[topology].per_sample(-1))
