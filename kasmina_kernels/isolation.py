"""Drop-in for the blend functions of Esper's `kasmina.isolation`: `ste_forward` and
`blend_with_isolation` with Esper's signatures, on the default backend. Esper's
gradient-health monitor is bookkeeping, not a blend, and stays Esper's. Inputs the fused ops
reject get Esper's answer, as in `kasmina_kernels.blend_ops`.
"""

from __future__ import annotations

import torch

from . import ops
from .blend_ops import eager_answer
from .optable import drop_ins
from .validation import DECLINED

__all__ = drop_ins("isolation")


def blend_with_isolation(host_features: torch.Tensor, seed_features: torch.Tensor,
                         alpha: torch.Tensor) -> torch.Tensor:
    """``lerp(host, seed, clamp01(alpha))``: gradients reach both inputs (the same as ADD)."""
    try:
        return ops.blend_with_isolation(host_features, seed_features, alpha)
    except DECLINED as rejected:
        return eager_answer(rejected, "blend_with_isolation", host_features, seed_features, alpha)


def ste_forward(host_features: torch.Tensor, seed_features: torch.Tensor) -> torch.Tensor:
    """Straight-through: the value is the host's (NaN where the seed is not finite), the
    gradient is passed unchanged to both host and seed."""
    try:
        return ops.ste_forward(host_features, seed_features)
    except DECLINED as rejected:
        return eager_answer(rejected, "ste_forward", host_features, seed_features)
