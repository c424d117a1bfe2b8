"""The multiply family's per-element math: MULTIPLY, h * (1 + c * tanh(s - r)) with
c = clamp01(alpha.to(h.dtype)) and r = seed_input (default h), and the valve multiplier
1 + clamp01(alpha) * tanh(m). The elementwise kernels (`elementwise.py`) call these on
compute-dtype blocks of any shape.

The backward rounds where the reference autograd does (as the CUDA kernels do): s - r and its
saved tanh rounded to the host dtype; g*h, g*h*c, c*t and 1 + c*t rounded to it; 1 - t^2 as the
device's tanh_backward forms it (`tanh_grad`). A tanh that saturates to +-1 in the host dtype
so gives exactly zero, as in the reference."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import round_to, tanh, tanh_grad, to_float


@triton.jit
def multiply(h, s, r, c, HOST_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Computed in the compute dtype and rounded once by the store; the tanh is exactly +-1
    where the reference's tanh in a 16-bit host dtype is (the thresholds of
    csrc/kernels/blend_math.h), so 1 + c*t vanishes where the reference's does."""
    d = s - r
    t = tanh(d, INTERPRET)
    if HOST_DTYPE == tl.bfloat16:
        t = tl.where(tl.abs(d) >= 3.4609375, tl.where(d < 0, -1.0, 1.0), t)
    elif HOST_DTYPE == tl.float16:
        t = tl.where(tl.abs(d) >= 4.505859375, tl.where(d < 0, -1.0, 1.0), t)
    return h * (1.0 + c * t)


@triton.jit
def multiply_backward(grad, h, s, r, c, SEED_INPUT_IS_HOST: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
                      HOST_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                      REDUCE_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """(dh, ds before its rounding to the host dtype, alpha's gradient term in REDUCE_DTYPE)."""
    diff = s - r
    rounded_diff = round_to(diff, HOST_DTYPE, INTERPRET)
    t = tanh(rounded_diff, INTERPRET)
    saved_t = round_to(t, HOST_DTYPE, INTERPRET)
    grad_h = round_to(grad * h, HOST_DTYPE, INTERPRET)
    ds = round_to(grad_h * c, HOST_DTYPE, INTERPRET) * tanh_grad(saved_t, HOST_DTYPE, INTERPRET)
    one_plus = round_to(1.0 + round_to(c * saved_t, HOST_DTYPE, INTERPRET), HOST_DTYPE, INTERPRET)
    dh = round_to(grad * one_plus, HOST_DTYPE, INTERPRET)
    if SEED_INPUT_IS_HOST:
        dh = dh - round_to(ds, HOST_DTYPE, INTERPRET)
    weight_term = grad
    if WEIGHT_GRAD:
        if REDUCE_DTYPE == COMPUTE_DTYPE:
            # the alpha term wants tanh of the unrounded s - r: first-order correction
            e = diff - rounded_diff
            e = tl.where(e == e, e, 0.0)  # an infinite difference rounds to itself
            weight_term = grad * h * (t + (1.0 - t * t) * e)
        else:
            weight_term = grad.to(REDUCE_DTYPE) * h.to(REDUCE_DTYPE) * tanh(s.to(REDUCE_DTYPE) - r.to(REDUCE_DTYPE), INTERPRET)
    return dh, ds, weight_term


@triton.jit
def valve(m, c, M_DTYPE: tl.constexpr, TANH_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
          INTERPRET: tl.constexpr):
    """1 + c * tanh(m): tanh in m's opmath TANH_DTYPE, rounded to m's dtype M_DTYPE."""
    t = round_to(tanh(to_float(m, TANH_DTYPE, INTERPRET), INTERPRET), M_DTYPE, INTERPRET).to(COMPUTE_DTYPE)
    return 1.0 + c * t


@triton.jit
def valve_backward(grad, m, c, M_DTYPE: tl.constexpr, TANH_DTYPE: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
                   COMPUTE_DTYPE: tl.constexpr, REDUCE_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """(dm, alpha's gradient term): dm at the reference's rounding points (tanh_backward in m's
    dtype: the saved tanh and g*c rounded to it); where WEIGHT_GRAD, the alpha term with the
    unrounded tanh, taken in the sum's dtype where that is wider (as MULTIPLY's alpha term): a
    float32 tanh's rounding would weigh g in every term."""
    t = tanh(to_float(m, TANH_DTYPE, INTERPRET), INTERPRET).to(COMPUTE_DTYPE)
    saved_t = round_to(t, M_DTYPE, INTERPRET)
    dm = round_to(grad * c, M_DTYPE, INTERPRET) * tanh_grad(saved_t, M_DTYPE, INTERPRET)
    weight_term = grad
    if WEIGHT_GRAD:
        if REDUCE_DTYPE == TANH_DTYPE:
            weight_term = grad.to(REDUCE_DTYPE) * t.to(REDUCE_DTYPE)
        else:
            weight_term = grad.to(REDUCE_DTYPE) * tanh(to_float(m, REDUCE_DTYPE, INTERPRET), INTERPRET)
    return dm, weight_term
