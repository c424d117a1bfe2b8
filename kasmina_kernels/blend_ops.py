"""Drop-in for Esper's `kasmina.blend_ops`: the same five functions with Esper's signatures,
each calling the public op of the same name (`kasmina_kernels.ops`) on the default backend.
To put them in place of Esper's in code that already imported those, see
`kasmina_kernels.swap`.
"""

from __future__ import annotations

import torch

from . import ops
from .optable import drop_ins

__all__ = drop_ins("blend_ops")


def blend_add(host_features: torch.Tensor, seed_features: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ADD: ``lerp(host, seed, clamp01(alpha))`` in the host's dtype."""
    return ops.blend_add(host_features, seed_features, alpha)


def multiply_valve_multiplier(alpha: torch.Tensor, seed_modulation: torch.Tensor) -> torch.Tensor:
    """The MULTIPLY valve ``1 + clamp01(alpha) * tanh(seed_modulation)``."""
    return ops.multiply_valve_multiplier(alpha, seed_modulation)


def blend_multiply(host_features: torch.Tensor, seed_features: torch.Tensor, alpha: torch.Tensor, *,
                   seed_input: torch.Tensor | None = None) -> torch.Tensor:
    """MULTIPLY: ``host * (1 + clamp01(alpha) * tanh(seed - r))``, ``r = seed_input`` (default: host)."""
    return ops.blend_multiply(host_features, seed_features, alpha, seed_input=seed_input)


def gate_effective_alpha(alpha: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``clamp01(clamp01(alpha) * clamp01(gate))``."""
    return ops.gate_effective_alpha(alpha, gate)


def blend_gate(host_features: torch.Tensor, seed_features: torch.Tensor, alpha: torch.Tensor,
               gate: torch.Tensor) -> torch.Tensor:
    """GATE: ``lerp(host, seed, gate_effective_alpha(alpha, gate))`` in the host's dtype."""
    return ops.blend_gate(host_features, seed_features, alpha, gate)
