"""Pieces shared by the Triton kernels: interpreter-safe math (tanh, bf16 rounding), dtype
maps, the strided iteration plan, block-size heuristics and the eager fast-path test.

Triton's interpreter (``TRITON_INTERPRET=1``) cannot run libdevice functions and converts
float32 to bfloat16 by truncation, so every kernel takes an ``INTERP`` constexpr and routes
bfloat16 conversions through exact integer arithmetic there. tanh follows the device whose
eager result the kernels must reproduce: on a GPU it is libdevice's tanh (what ATen's CUDA
kernels call); under the interpreter an exp-based formulation accurate to a few float32 ulps.
Likewise 1 - t^2 of tanh's gradient (`tanh_grad`) is formed as each device's eager
tanh_backward forms it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# ---------------------------------------------------------------------------- dtypes
TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.int8: tl.int8,
    torch.int16: tl.int16,
    torch.int32: tl.int32,
    torch.int64: tl.int64,
    torch.uint8: tl.uint8,
}

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tl_dtype(dtype: torch.dtype):
    try:
        return TL_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"triton backend: unsupported dtype {dtype}") from None


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
def _bf16_bits(x):
    """float32 -> the 16 bits of the nearest bfloat16 (round to nearest even, NaN kept)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16)


@triton.jit
def to_float(x, CD: tl.constexpr, INTERP: tl.constexpr):
    """A loaded value (any dtype) converted to the compute dtype CD, exactly where it can be."""
    if x.dtype == tl.bfloat16:
        if INTERP:
            f = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            return f.to(CD)
        else:
            return x.to(tl.float32).to(CD)
    else:
        return x.to(CD)


@triton.jit
def round_to(x, T: tl.constexpr, INTERP: tl.constexpr):
    """x rounded to dtype T, returned in x's (float32/float64) dtype."""
    if T == x.dtype:
        return x
    elif T == tl.bfloat16:
        if INTERP:
            b = _bf16_bits(x.to(tl.float32)).to(tl.uint32) << 16
            return b.to(tl.float32, bitcast=True).to(x.dtype)
        else:
            return x.to(tl.float32).to(tl.bfloat16).to(x.dtype)
    elif T == tl.float16:
        return x.to(tl.float32).to(tl.float16).to(x.dtype)
    else:
        return x.to(T).to(x.dtype)


@triton.jit
def store(ptr, x, mask, INTERP: tl.constexpr):
    """Store x rounded once to the pointer's element type."""
    T = ptr.dtype.element_ty
    if T == tl.bfloat16:
        if INTERP:
            tl.store(ptr, _bf16_bits(x.to(tl.float32)).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr, x.to(tl.float32).to(tl.bfloat16), mask=mask)
    elif T == tl.float16:
        tl.store(ptr, x.to(tl.float32).to(tl.float16), mask=mask)
    else:
        tl.store(ptr, x.to(T), mask=mask)


@triton.jit
def store_scalar(ptr, x, INTERP: tl.constexpr):
    T = ptr.dtype.element_ty
    if T == tl.bfloat16:
        if INTERP:
            tl.store(ptr, _bf16_bits(x.to(tl.float32)).to(tl.bfloat16, bitcast=True))
        else:
            tl.store(ptr, x.to(tl.float32).to(tl.bfloat16))
    elif T == tl.float16:
        tl.store(ptr, x.to(tl.float32).to(tl.float16))
    else:
        tl.store(ptr, x.to(T))


@triton.jit
def tanh(x, INTERP: tl.constexpr):
    """tanh as the eager reference on this device computes it (libdevice on a GPU)."""
    if INTERP:
        return _tanh_from_exp(x)
    else:
        return libdevice.tanh(x)


@triton.jit
def tanh_grad(t, H: tl.constexpr, INTERP: tl.constexpr):
    """1 - t^2 for a saved tanh t of a host of dtype H, as eager tanh_backward forms it: one
    fused multiply-add on CPU (the interpreter's tensors) and on CUDA for float/double hosts;
    on CUDA for bfloat16/float16 hosts in the 16-bit type's own arithmetic (t*t rounded to H,
    then 1 - t*t rounded to H), as ATen's CUDA kernel computes `a * (1 - b * b)` in scalar_t.
    Mirrors kk::FusedTanhGrad / kk::StorageTanhGrad in csrc/kernels/blend_math.h."""
    if INTERP:
        return tl.fma(-t, t, 1.0)
    elif H == tl.bfloat16 or H == tl.float16:
        return round_to(1.0 - round_to(t * t, H, INTERP), H, INTERP)
    else:
        return tl.fma(-t, t, 1.0)


@triton.jit
def _tanh_from_exp(x):
    """tanh without libdevice (runs under the interpreter).

    float32: Cephes' odd minimax polynomial for |x| < 0.625 (relative error ~1e-7), else
    1 - 2/(exp(2|x|) + 1); float64: the Taylor series to x^11 for |x| < 0.05, else the same
    exp form. |x| is capped at 20 (tanh(20) rounds to 1 in both), NaN and -0 are kept.
    """
    ax = tl.abs(x)
    if x.dtype == tl.float64:
        cut = 0.05
    else:
        cut = 0.625
    xs = tl.where(ax < cut, x, 0.0).to(x.dtype)  # the series only sees its own range
    z = xs * xs
    if x.dtype == tl.float64:
        p = -1.0 / 3.0 + z * (2.0 / 15.0 + z * (-17.0 / 315.0 + z * (62.0 / 2835.0 + z * (-1382.0 / 155925.0))))
    else:
        p = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z - 3.33332819422e-1
    small = tl.where(xs == 0, x, xs + xs * (z * p))  # keeps -0 (and exact 0)
    ac = tl.where(ax > 20.0, 20.0, ax)
    e = tl.exp(ac + ac)
    big = 1.0 - 2.0 / (e + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < cut, small, big).to(x.dtype)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def lerp(h, s, w):
    """torch.lerp's two-branch formula: exact at w == 0 (h) and at w == 1 (s)."""
    d = s - h
    return tl.where(tl.abs(w) < 0.5, h + w * d, s - d * (1.0 - w))


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
def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Largest elementwise block. The interpreter runs one program at a time, so it gets larger
# blocks (fewer programs); tests may lower MAX_BLOCK to exercise multi-block paths.
MAX_BLOCK = 32768 if INTERPRET else 1024
MIN_BLOCK = 64


def elementwise_block(inner: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for an elementwise pass over `inner` elements per sample."""
    block = min(MAX_BLOCK, max(MIN_BLOCK, next_pow2(inner)))
    return block, (4 if block <= 1024 else 8)


_I32_SAFE = 2**31 - 2**20  # offsets at or past this use 64-bit arithmetic


def _dense_check(shape, strides) -> bool:
    dims = sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


_dense_cache: dict = {}


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (every element of its storage span used once)."""
    key = (t.shape, t.stride())
    r = _dense_cache.get(key)
    if r is None:
        if len(_dense_cache) > 4096:
            _dense_cache.clear()
        r = _dense_cache[key] = _dense_check(t.shape, t.stride())
    return r


def batch_outermost(shape, strides) -> bool:
    """Dense strides whose dim 0 is the outermost: each sample is one contiguous slab."""
    n = 1
    for v in shape:
        n *= v
    return len(shape) > 0 and shape[0] > 1 and strides[0] * shape[0] == n


class Plan:
    """How a kernel walks a tensor: B samples (grid-split when > 1) of `inner` elements,
    the inner part as up to 3 coalesced dims (D0, D1, D2); per operand its batch stride, its
    3 inner strides and whether it is laid out like the iteration itself (flat)."""

    __slots__ = ("B", "inner", "d1", "d2", "ndim", "ops", "i64")

    def __init__(self, B, inner, d1, d2, ndim, ops, i64):
        self.B, self.inner, self.d1, self.d2, self.ndim, self.ops, self.i64 = (
            B, inner, d1, d2, ndim, ops, i64)


def _make_plan(shape, ref_strides, op_strides, split):
    nd = len(shape)
    dims = [d for d in range(nd) if shape[d] != 1]
    B = 1
    if split:
        B = shape[0]
        dims = [d for d in dims if d != 0]
    order = sorted(dims, key=lambda d: -ref_strides[d])
    all_strides = [ref_strides] + list(op_strides)
    merged: list[list] = []  # [size, [stride per operand]] from outer to inner
    for d in order:
        st = [s[d] for s in all_strides]
        if merged:
            psize, pst = merged[-1]
            if all(pst[k] == st[k] * shape[d] for k in range(len(st))):
                merged[-1] = [psize * shape[d], st]
                continue
        merged.append([shape[d], st])
    if len(merged) > 3:
        return None
    inner = 1
    for size, _ in merged:
        inner *= size
    ndim = max(1, len(merged))
    while len(merged) < 3:
        merged.insert(0, [1, [0] * len(all_strides)])
    d1, d2 = merged[1][0], merged[2][0]
    ref_inner = [m[1][0] for m in merged]
    ops = []
    biggest = B * inner
    for k in range(1, len(all_strides)):
        sb = all_strides[k][0] if split else 0
        inn = [m[1][k] for m in merged]
        flat = ndim == 1 and inn[2] == 1 or inn == ref_inner
        span = (B - 1) * sb + sum((m[0] - 1) * m[1][k] for m in merged)
        biggest = max(biggest, span + 1)
        ops.append((sb, inn[0], inn[1], inn[2], flat))
    i64 = biggest + MAX_BLOCK >= _I32_SAFE
    return Plan(B, inner, d1, d2, ndim, tuple(ops), i64)


_plan_cache: dict = {}


def plan(shape, ref_strides, op_strides, split: bool):
    """The (cached) iteration plan, or None when the operands need more than 3 inner dims."""
    key = (shape, ref_strides, op_strides, split)
    p = _plan_cache.get(key, 0)
    if p == 0:
        if len(_plan_cache) > 4096:
            _plan_cache.clear()
        p = _plan_cache[key] = _make_plan(tuple(shape), tuple(ref_strides), op_strides, split)
    return p


# ---------------------------------------------------------------------------- dispatch
_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_peek_functorch = torch._C._functorch.peek_interpreter_stack
_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor


def eager_ok(*tensors) -> bool:
    """True when a call may skip the dispatcher: plain tensors, no dispatch modes, no
    functorch transform, not being traced by torch.compile. Anything else goes through the
    registered torch.library op, which every tracer understands."""
    if _is_compiling() or _len_dispatch_stack() or _peek_functorch() is not None:
        return False
    for t in tensors:
        if t is not None and type(t) is not _Tensor:
            return False
    return True


def grad_wanted(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def select_grads(need, grads):
    """The gradients an autograd backward returns: None where the input needs none."""
    return tuple(g if n else None for n, g in zip(need, grads))


_DelayedError = torch._C._functions.DelayedError


def first_order_only(op: str, grads: tuple, inputs: tuple) -> tuple:
    """The gradients a backward returns, made to raise (naming `op`) if they are ever
    differentiated: the fused gradient kernels have no derivative of their own, so a double
    backward (create_graph=True, then differentiating the gradient) is an error instead of a
    silently missing or zero second derivative. Free when grad mode is off (a plain backward)."""
    if not torch.is_grad_enabled():
        return grads
    live = [t for t in inputs if t is not None and t.requires_grad]
    if not live:
        return grads
    msg = (f"{op}: double backward (differentiating a gradient computed with create_graph=True) "
           "is not supported: the fused Triton gradient kernels have no derivative of their own; "
           'use backend="reference" for higher-order derivatives')
    # one error node whose edges lead to the inputs the gradients depend on, so that
    # differentiating a gradient with respect to any of them reaches it (and raises)
    out = _DelayedError(msg.encode(), len(grads) + len(live))(*grads, *live)
    return tuple(out[: len(grads)])


def op_name(bwd_op) -> str:
    """"kasmina::blend_add" for the registered backward op kasmina::triton_blend_add_backward."""
    name = bwd_op._schema.name
    return name.replace("::triton_", "::").removesuffix("_backward")


def saving_function(name: str, fwd, bwd, bwd_op):
    """An autograd.Function for eager calls that saves exactly its tensor inputs (nothing
    else: docs/semantics.md#performance-model), runs `fwd(*inputs)`, and in backward `bwd(grad, *inputs,
    need)` directly, or the registered backward op `bwd_op(grad, *inputs, need)` when the
    gradient itself must go through the dispatcher."""

    def forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return fwd(*inputs)

    op = op_name(bwd_op)

    def backward(ctx, grad):
        inputs = ctx.saved_tensors
        need = ctx.needs_input_grad
        if eager_ok(grad):
            return first_order_only(op, bwd(grad, *inputs, need), (grad,) + inputs)
        return select_grads(need, bwd_op(grad, *inputs, list(need)))

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def call_fused(function, fwd, op, *inputs):
    """A public op's call: straight to the kernels when the dispatcher can be skipped (through
    `function` when a gradient is wanted), else through the registered op `op`."""
    if eager_ok(*inputs):
        if grad_wanted(*inputs):
            return function.apply(*inputs)
        return fwd(*inputs)
    return op(*inputs)


def empty_placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a backward op returns for a gradient nobody asked for."""
    return like.new_empty((0,))


def layout_4d(shape, strides):
    """"nchw" or "cl" when a 4-D tensor is dense in that memory format (size-1 dims carry no
    stride), else None. Where C or H*W is 1 the two coincide; "nchw" is returned."""
    if len(shape) != 4:
        return None
    B, Cn, Hn, Wn = shape
    for name, canon in (("nchw", (Cn * Hn * Wn, Hn * Wn, Wn, 1)), ("cl", (Hn * Wn * Cn, 1, Wn * Cn, Cn))):
        if all(n == 1 or st == c for n, st, c in zip(shape, strides, canon)):
            return name
    return None
