"""Pieces shared by the Triton kernels: interpreter-safe math (tanh, bfloat16 rounding), loads
and stores that round once, weight loads, and the strided iteration plan.

Triton's interpreter (``TRITON_INTERPRET=1``) cannot run libdevice functions and converts
float32 to bfloat16 by truncation, so every kernel takes an ``INTERPRET`` constexpr and routes
bfloat16 conversions through exact integer arithmetic there. tanh and 1 - t^2 follow the
device whose eager result the kernels must reproduce: libdevice's tanh on a GPU (what ATen's
CUDA kernels call), an exp-based formulation accurate to a few float32 ulps under the
interpreter.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# What every launch passes besides its own arguments: the INTERPRET constexpr, and FMA
# contraction on, as the GPU equivalence runs judged the kernels (Triton's default up to 3.9;
# 3.10 turns it off). The interpreter ignores the option.
LAUNCH_OPTIONS = {"INTERPRET": INTERPRET, "enable_fp_fusion": True}
# Tests set this to route numel-1 weights through the by-value path that a 0-dim CPU alpha
# beside CUDA features takes (so the interpreter exercises it too).
FORCE_VALUE_MODE = False


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of the same name as a torch dtype."""
    found = getattr(tl, str(dtype).split(".")[-1], None)
    if not isinstance(found, tl.dtype):
        raise TypeError(f"triton backend: unsupported dtype {dtype}")
    return found


def compute_dtype(*dtypes: torch.dtype):
    """float64 when any operand is double, else float32 (the opmath of the half types)."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


# ---------------------------------------------------------------------------- jit helpers
@triton.jit
def clamp01(x):
    """clamp(x, 0, 1) keeping NaN (both comparisons are false for NaN), as torch.clamp."""
    return tl.where(x < 0, 0.0, tl.where(x > 1, 1.0, x)).to(x.dtype)


@triton.jit
def in01(x):
    """torch.clamp passes its gradient on the closed interval [0, 1] (NaN: no)."""
    return (x >= 0) & (x <= 1)


@triton.jit
def _bfloat16_bits(x):
    """float32 -> the 16 bits of the nearest bfloat16 (round to nearest even, NaN kept)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16)


@triton.jit
def to_float(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """A loaded value (any dtype) converted to the float DTYPE, exactly where it can be."""
    if x.dtype != tl.bfloat16:
        return x.to(DTYPE)
    elif INTERPRET:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(DTYPE)
    else:
        return x.to(tl.float32).to(DTYPE)


@triton.jit
def load_float(ptr, mask, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """The elements at ptr where mask holds (0 elsewhere), converted to the float DTYPE."""
    return to_float(tl.load(ptr, mask=mask, other=0), DTYPE, INTERPRET)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x rounded to DTYPE, returned in x's (float32/float64) dtype."""
    if DTYPE == x.dtype:
        return x
    else:
        return to_float(_stored_value(x, DTYPE, INTERPRET), x.dtype, INTERPRET)


@triton.jit
def _stored_value(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x rounded once to DTYPE, the element type it is stored as."""
    if DTYPE == tl.bfloat16:
        if INTERPRET:
            return _bfloat16_bits(x.to(tl.float32)).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(tl.float32).to(tl.bfloat16)
    elif DTYPE == tl.float16:
        return x.to(tl.float32).to(tl.float16)
    else:
        return x.to(DTYPE)


@triton.jit
def store(ptr, x, mask, INTERPRET: tl.constexpr):
    """Store x rounded once to the pointer's element type (mask None: a scalar)."""
    tl.store(ptr, _stored_value(x, ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def tanh(x, INTERPRET: tl.constexpr):
    """tanh as the eager reference on this device computes it (libdevice on a GPU)."""
    if INTERPRET:
        return _tanh_from_exp(x)
    else:
        return libdevice.tanh(x)


@triton.jit
def tanh_grad(t, HOST_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """1 - t^2 for a saved tanh t of a host of HOST_DTYPE, as eager tanh_backward forms it: one
    fused multiply-add on CPU (the interpreter's tensors) and on CUDA for float/double hosts;
    on CUDA for bfloat16/float16 hosts in the 16-bit type's own arithmetic (t*t rounded, then
    1 - t*t rounded), as ATen's CUDA kernel computes `a * (1 - b * b)` in scalar_t.
    Mirrors kk::FusedTanhGrad / kk::StorageTanhGrad in csrc/kernels/blend_math.h."""
    if (HOST_DTYPE == tl.bfloat16 or HOST_DTYPE == tl.float16) and not INTERPRET:
        return round_to(1.0 - round_to(t * t, HOST_DTYPE, INTERPRET), HOST_DTYPE, INTERPRET)
    else:
        return tl.fma(-t, t, 1.0)


@triton.jit
def _tanh_from_exp(x):
    """tanh without libdevice (runs under the interpreter), in float64 and rounded once to x's
    dtype: at least as close as eager's CPU tanh.

    Below |x| = 0.625, x + x^3 R(x^2), R Cephes' rational minimax fit of degrees 2/3 (within
    0.7 ulp); the exp form 1 - 2/(exp(2|x|) + 1) cancels there. Above it, that form. |x| is
    capped at 20 (tanh(20) rounds to 1), NaN and -0 are kept. +-1 exactly from where ATen's
    CPU tanh is, and below 1 under it (kFloatTanhBelowOne in blend_math.h,
    kDoubleTanhBelowOne in cpu/blend_kernels.h).
    """
    xw = x.to(tl.float64)
    ax = tl.abs(xw)
    cut = 0.625
    xs = tl.where(ax < cut, xw, 0.0).to(tl.float64)  # the fit only sees its own range
    z = xs * xs
    # tl.full keeps float64 constants whole (a literal is float32)
    num = tl.full(z.shape, -9.64399179425052238628e-1, tl.float64) * z
    num = (num + tl.full(z.shape, -9.92877231001918586564e1, tl.float64)) * z
    num = num + tl.full(z.shape, -1.61468768441708447952e3, tl.float64)
    den = (z + tl.full(z.shape, 1.12811678491632931402e2, tl.float64)) * z
    den = (den + tl.full(z.shape, 2.23548839060100448583e3, tl.float64)) * z
    p = num / (den + tl.full(z.shape, 4.84406305325125486048e3, tl.float64))
    small = tl.where(xs == 0, xw, xs + xs * (z * p))  # keeps -0 (and exact 0)
    ac = tl.where(ax > 20.0, 20.0, ax)
    e = tl.exp(ac + ac)
    big = 1.0 - 2.0 / (e + 1.0)
    below_one = tl.full(ax.shape, 1.0, tl.float64) - 2.0 ** -53
    at_one = ax > tl.full(ax.shape, 19.06154746546846, tl.float64)
    big = tl.where(at_one, 1.0, tl.where(big > below_one, below_one, big))  # NaN stays
    big = tl.where(xw < 0, -big, big)
    t = tl.where(ax < cut, small, big)
    if x.dtype == tl.float32:
        t = t.to(tl.float32)
        sign = tl.where(x < 0, -1.0, 1.0)
        below = tl.where(tl.abs(t) == 1.0, sign * (1.0 - 2.0 ** -24), t)
        t = tl.where(tl.abs(x) > 9.010839462280273, sign, below)
    return t.to(x.dtype)


# How a weight (alpha or gate) reaches a kernel: a Python float, one element, one per
# sample, or one per element of the iteration.
WEIGHT_BY_VALUE, WEIGHT_SCALAR, WEIGHT_PER_SAMPLE, WEIGHT_PER_ELEMENT = 0, 1, 2, 3


@triton.jit
def load_weight(ptr, b, i0, i1, i2, sb, s0, s1, s2, mask, MODE: tl.constexpr, DTYPE: tl.constexpr,
                INTERPRET: tl.constexpr):
    """A weight as DTYPE: by value, one scalar, per sample (b a program's sample) or per element
    (at b*sb + i0*s0 + i1*s1 + i2*s2)."""
    if MODE == 0:
        return tl.cast(ptr, DTYPE)
    elif MODE == 1:
        return to_float(tl.load(ptr), DTYPE, INTERPRET)
    elif MODE == 2:
        return to_float(tl.load(ptr + b * sb), DTYPE, INTERPRET)
    else:
        return load_float(ptr + b * sb + i0 * s0 + i1 * s1 + i2 * s2, mask, DTYPE, INTERPRET)


@triton.jit
def to_index(x, I64: tl.constexpr):
    """Integer index x widened to int64 when offsets may pass 2^31 (I64), else unchanged."""
    if I64:
        return x.to(tl.int64)
    else:
        return x


@triton.jit
def coords(j, D1, D2, NDIM: tl.constexpr):
    """Coordinates (i0, i1, i2) of the flat index j in a (D0, D1, D2) iteration space."""
    if NDIM == 1:
        return j * 0, j * 0, j
    elif NDIM == 2:
        return j * 0, j // D2, j % D2
    else:
        t = j // D2
        return t // D1, t % D1, j % D2


@triton.jit
def offset(b, j, i0, i1, i2, sb, s0, s1, s2, FLAT: tl.constexpr):
    """Element offset of an operand: flat (same layout as the iteration) or strided."""
    if FLAT:
        return b * sb + j
    else:
        return b * sb + i0 * s0 + i1 * s1 + i2 * s2


# ---------------------------------------------------------------------------- host helpers
def cached(cache: dict, key, make):
    """cache[key], made by make() on a miss; the cache is emptied past 4096 entries."""
    value = cache.get(key, cache)
    if value is cache:
        if len(cache) > 4096:
            cache.clear()
        value = cache[key] = make()
    return value


def weight_mode(w: torch.Tensor, device: torch.device, shape) -> int:
    """How weight w reaches a kernel iterating over features of `shape` on `device`."""
    if w.numel() == 1:
        if w.device != device or FORCE_VALUE_MODE:
            if w.dtype != torch.float64 and w.device.type == "cpu":
                return WEIGHT_BY_VALUE  # a CPU scalar beside device features: no copy
        return WEIGHT_SCALAR
    if 2 <= w.dim() == len(shape) and w.shape[0] == shape[0] and all(d == 1 for d in w.shape[1:]):
        return WEIGHT_PER_SAMPLE
    return WEIGHT_PER_ELEMENT


def weight_arg(w, mode, device):
    """What a kernel takes for weight w: a float by value, else a tensor on the device."""
    if w is None:
        return None
    if mode == WEIGHT_BY_VALUE:
        return float(w.item())  # a CPU tensor: no device sync
    if w.device != device:
        return w.to(device, non_blocking=True)
    return w


# Largest elementwise block. The interpreter runs one program at a time, so it gets larger
# blocks (fewer programs); tests may lower MAX_BLOCK to exercise multi-block paths.
MAX_BLOCK = 32768 if INTERPRET else 1024

I32_SAFE = 2**31 - 2**20  # offsets at or past this use 64-bit arithmetic


class Plan(NamedTuple):
    """How a kernel walks a tensor: `samples` samples (grid-split when > 1) of `inner` elements,
    the inner part as up to 3 coalesced dims (D0, D1, D2); per operand (sample stride, 3 inner
    strides, whether it is laid out like the iteration itself: flat)."""

    samples: int
    inner: int
    d1: int
    d2: int
    ndim: int
    operands: tuple
    i64: bool


def _make_plan(shape, ref_strides, op_strides, split):
    samples = shape[0] if split else 1
    dims = [d for d in range(len(shape)) if shape[d] != 1 and not (split and d == 0)]
    order = sorted(dims, key=lambda d: -ref_strides[d])
    all_strides = [ref_strides] + list(op_strides)
    merged: list[list] = []  # [size, [stride per operand]] from outer to inner
    for d in order:
        st = [s[d] for s in all_strides]
        if merged and all(prev == cur * shape[d] for prev, cur in zip(merged[-1][1], st)):
            merged[-1] = [merged[-1][0] * shape[d], st]
        else:
            merged.append([shape[d], st])
    if len(merged) > 3:
        return None
    inner = math.prod(size for size, _ in merged)
    ndim = max(1, len(merged))
    merged = [[1, [0] * len(all_strides)]] * (3 - len(merged)) + merged
    ref_inner = [m[1][0] for m in merged]
    operands = []
    biggest = samples * inner
    for k in range(1, len(all_strides)):
        sb = all_strides[k][0] if split else 0
        inn = [m[1][k] for m in merged]
        flat = ndim == 1 and inn[2] == 1 or inn == ref_inner
        span = (samples - 1) * sb + sum((m[0] - 1) * m[1][k] for m in merged)
        biggest = max(biggest, span + 1)
        operands.append((sb, inn[0], inn[1], inn[2], flat))
    i64 = biggest + MAX_BLOCK >= I32_SAFE
    return Plan(samples, inner, merged[1][0], merged[2][0], ndim, tuple(operands), i64)


_plan_cache: dict = {}


def plan(shape, ref_strides, op_strides, split: bool):
    """The (cached) iteration plan, or None when the operands need more than 3 inner dims."""
    return cached(_plan_cache, (shape, ref_strides, op_strides, split),
                  lambda: _make_plan(tuple(shape), tuple(ref_strides), op_strides, split))
