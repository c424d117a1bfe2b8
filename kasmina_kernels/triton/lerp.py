"""The lerp family's per-element math: ADD and blend_with_isolation (weight clamp01(alpha)),
GATE (weight clamp01(clamp01(alpha) * clamp01(gate))) and the gate's effective alpha. The
elementwise kernels (`elementwise.py`) call these on compute-dtype blocks of any shape."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import clamp01, in01, round_to


@triton.jit
def lerp(h, s, w):
    """torch.lerp's two-branch formula, each branch one fused multiply-add as ATen's: exact at
    w == 0 (h) and at w == 1 (s). (Spelled out: the CPU interpreter rounds a product and a sum
    apart, which loses to ATen where the sum cancels.)"""
    d = s - h
    return tl.where(tl.abs(w) < 0.5, tl.fma(w, d, h), tl.fma(-d, 1.0 - w, s))


@triton.jit
def lerp_backward(grad, h, s, w, WEIGHT_GRAD: tl.constexpr, REDUCE_DTYPE: tl.constexpr):
    """(dh, ds, the weight's gradient term in REDUCE_DTYPE). Without WEIGHT_GRAD neither h nor
    s is read (the caller may pass placeholders) and the term is a placeholder too."""
    weight_term = grad
    if WEIGHT_GRAD:
        weight_term = grad.to(REDUCE_DTYPE) * (s.to(REDUCE_DTYPE) - h.to(REDUCE_DTYPE))
    return grad * (1.0 - w), grad * w, weight_term


@triton.jit
def effective_alpha(alpha, gate, PROMOTED_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """clamp01(clamp01(alpha) * clamp01(gate)), the product rounded to the promoted dtype of
    alpha and gate."""
    return clamp01(round_to(clamp01(alpha) * clamp01(gate), PROMOTED_DTYPE, INTERPRET))


@triton.jit
def effective_alpha_backward(grad, alpha, gate, PROMOTED_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """(d alpha, d gate) in float64 from the float64 gradient of effective_alpha, through the
    clamps."""
    clamped_alpha = clamp01(alpha)
    clamped_gate = clamp01(gate)
    d_product = tl.where(in01(round_to(clamped_alpha * clamped_gate, PROMOTED_DTYPE, INTERPRET)), grad, 0.0)
    d_alpha = tl.where(in01(alpha), d_product * clamped_gate.to(tl.float64), 0.0)
    d_gate = tl.where(in01(gate), d_product * clamped_alpha.to(tl.float64), 0.0)
    return d_alpha, d_gate
