"""Drop-in for Esper's `kasmina.blend_ops`: the same five functions with Esper's signatures,
each calling the public op of the same name (`kasmina_kernels.ops`) on the default backend.
To put them in place of Esper's in code that already imported those, see
`kasmina_kernels.swap`.

Esper's functions are plain torch code, so they take inputs the fused ops reject (a seed that
broadcasts to the host, an alpha that enlarges the output, integer or complex tensors) and
fail on others with torch's own exceptions. For every input the fused op rejects, and every
call its autograd cannot record (`validation.DECLINED`: forward-mode AD, torch.func's
differentiating transforms, an inference tensor to save), a drop-in answers as Esper's
function does: it runs the eager math (`kasmina_kernels.reference`, which
is Esper's), returning its result with a warning that no fused kernel ran (none while
torch.compile traces), or raising its exception (with the fused op's message as the context).
"""

from __future__ import annotations

import torch

from . import ops, reference
from .optable import drop_ins
from .validation import DECLINED, warn_eager_answer

__all__ = drop_ins("blend_ops")


def eager_answer(rejected: Exception, name: str, *args, **kwargs):
    """Esper's answer for an input the fused op `name` rejected (`rejected`): the reference's
    result, or its exception. Call it while handling `rejected`."""
    out = getattr(reference, name)(*args, **kwargs)
    warn_eager_answer(lambda: f"{rejected}; the drop-in {name} computed this call with Esper's eager math, "
                              "not a fused kernel", stacklevel=3)
    return out


def blend_add(host_features: torch.Tensor, seed_features: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ADD: ``lerp(host, seed, clamp01(alpha))`` in the host's dtype."""
    try:
        return ops.blend_add(host_features, seed_features, alpha)
    except DECLINED as rejected:
        return eager_answer(rejected, "blend_add", host_features, seed_features, alpha)


def multiply_valve_multiplier(alpha: torch.Tensor, seed_modulation: torch.Tensor) -> torch.Tensor:
    """The MULTIPLY valve ``1 + clamp01(alpha) * tanh(seed_modulation)``."""
    try:
        return ops.multiply_valve_multiplier(alpha, seed_modulation)
    except DECLINED as rejected:
        return eager_answer(rejected, "multiply_valve_multiplier", alpha, seed_modulation)


def blend_multiply(host_features: torch.Tensor, seed_features: torch.Tensor, alpha: torch.Tensor, *,
                   seed_input: torch.Tensor | None = None) -> torch.Tensor:
    """MULTIPLY: ``host * (1 + clamp01(alpha) * tanh(seed - r))``, ``r = seed_input`` (default: host)."""
    try:
        return ops.blend_multiply(host_features, seed_features, alpha, seed_input=seed_input)
    except DECLINED as rejected:
        return eager_answer(rejected, "blend_multiply", host_features, seed_features, alpha,
                            seed_input=seed_input)


def gate_effective_alpha(alpha: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``clamp01(clamp01(alpha) * clamp01(gate))``."""
    try:
        return ops.gate_effective_alpha(alpha, gate)
    except DECLINED as rejected:
        return eager_answer(rejected, "gate_effective_alpha", alpha, gate)


def blend_gate(host_features: torch.Tensor, seed_features: torch.Tensor, alpha: torch.Tensor,
               gate: torch.Tensor) -> torch.Tensor:
    """GATE: ``lerp(host, seed, gate_effective_alpha(alpha, gate))`` in the host's dtype."""
    try:
        return ops.blend_gate(host_features, seed_features, alpha, gate)
    except DECLINED as rejected:
        return eager_answer(rejected, "blend_gate", host_features, seed_features, alpha, gate)
