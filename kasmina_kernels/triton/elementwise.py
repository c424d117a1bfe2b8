"""The elementwise kernel of ADD, GATE, MULTIPLY, STE, the valve multiplier and the gate's
effective alpha (the per-element math is each family's: `lerp.py`, `multiply.py`), forward or
backward, and the kernel that reduces the alpha/gate gradient. Operands: h the host (m for
the valve), s the seed, r the seed input (h when absent).

A backward writes the feature gradients asked for and, for alpha/gate, one partial sum per
program, which one more program sums in a fixed order in float64 and chains through the
clamps (deterministic, no atomics); weights of other broadcast shapes reduce per-element terms
with torch's deterministic sum instead. Only the inputs are saved; no kernel writes an input.
Rounding follows the native backend: the seed is rounded to the host's dtype in the kernel,
math runs in float32 (float64 for double), each output is rounded once.

Iteration follows the output's storage order, split per sample when a weight is per-sample
(one scalar load per program); other operands are addressed by their own strides, inner dims
coalesced to at most three (else copied into the output's layout). A channels_last host
beside NCHW seeds (or the reverse) iterates over [positions x channels] tiles, so every
operand is read along its own contiguous dim. A 0-dim CPU alpha beside device features is
passed by value (no copy, no sync); planning is cached per configuration.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from .. import validation
from ..optable import BY_NAME
from . import _common as common
from ._common import (WEIGHT_PER_ELEMENT, WEIGHT_PER_SAMPLE, WEIGHT_SCALAR, clamp01, coords, in01, load_float,
                      load_weight, offset, round_to, store, to_float, to_index)
from .lerp import effective_alpha, effective_alpha_backward, lerp, lerp_backward
from .multiply import multiply, multiply_backward, valve, valve_backward

# OP_EFFECTIVE_ALPHA: GATE's weight alone (gate_effective_alpha); its backward is the weights' gradient
OP_ADD, OP_GATE, OP_MULTIPLY, OP_STE, OP_VALVE, OP_EFFECTIVE_ALPHA = 0, 1, 2, 3, 4, 5

# Per-sample weights use the per-sample split only when a sample has at least this many
# elements; smaller samples read the weight per element (one program covers many samples).
MIN_SPLIT_INNER = 64
# Elements per tile of the mixed-layout path (a power of two). The interpreter runs one
# program at a time, so it gets larger tiles; tests lower it to exercise edge tiles.
TILE_ELEMS = 32768 if common.INTERPRET else 2048


# ============================================================================ kernels
@triton.jit
def _op_weight(alpha, gate, OP: tl.constexpr, HOST_DTYPE: tl.constexpr, PROMOTED_DTYPE: tl.constexpr,
               COMPUTE_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """The per-element weight of each op, rounded where the reference rounds it."""
    if (OP == 1) | (OP == 5):  # GATE: the effective alpha in the promoted dtype, then h's
        w = round_to(effective_alpha(alpha, gate, PROMOTED_DTYPE, INTERPRET), HOST_DTYPE, INTERPRET)
    elif OP == 2:  # MULTIPLY: clamp01(alpha cast to h's dtype)
        w = clamp01(round_to(alpha, HOST_DTYPE, INTERPRET))
    else:  # ADD, VALVE: clamp01(alpha) in h's dtype (the result dtype for the valve)
        w = round_to(clamp01(alpha), HOST_DTYPE, INTERPRET)
    return w.to(COMPUTE_DTYPE)


@triton.jit
def _seed(x, HOST_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """A seed value read in its own dtype, cast to the host's dtype, then to COMPUTE_DTYPE."""
    if x.dtype == HOST_DTYPE:
        return to_float(x, COMPUTE_DTYPE, INTERPRET)
    elif x.dtype == tl.float64:
        return round_to(x, HOST_DTYPE, INTERPRET).to(COMPUTE_DTYPE)
    else:
        return round_to(to_float(x, tl.float32, INTERPRET), HOST_DTYPE, INTERPRET).to(COMPUTE_DTYPE)


@triton.jit
def _block(INNER, D1, D2, CHUNKS, CHANNEL_TILES, NDIM: tl.constexpr, TILED: tl.constexpr, I64: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(program, sample, flat index, coordinates i0, i1, i2, mask) of this program's block: a
    run of BLOCK_P elements of a sample's (D0, D1, D2) iteration, or when TILED a tile of
    BLOCK_P positions (i1 < D1) x BLOCK_C channels (i2 < D2)."""
    pid = to_index(tl.program_id(0), I64)
    b = pid // CHUNKS
    chunk = pid - b * CHUNKS
    if TILED:
        position_tile = chunk // CHANNEL_TILES
        i1 = (position_tile * BLOCK_P + tl.arange(0, BLOCK_P))[:, None]
        i2 = ((chunk - position_tile * CHANNEL_TILES) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        j = i1 * 0  # no operand of a tile is flat
        i0 = j
        mask = (i1 < D1) & (i2 < D2)
    else:
        j = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = j < INNER
        i0, i1, i2 = coords(j, D1, D2, NDIM)
    return pid, b, j, i0, i1, i2, mask


@triton.jit
def _elementwise_kernel(
    out_ptr, ds_ptr, dr_ptr, weight_terms_ptr, partials_ptr,
    grad_ptr, h_ptr, s_ptr, r_ptr, alpha_ptr, gate_ptr,
    INNER, D1, D2, CHUNKS, CHANNEL_TILES,
    out_sb, out_s0, out_s1, out_s2,
    grad_sb, grad_s0, grad_s1, grad_s2,
    h_sb, h_s0, h_s1, h_s2,
    s_sb, s_s0, s_s1, s_s2,
    r_sb, r_s0, r_s1, r_s2,
    alpha_sb, alpha_s0, alpha_s1, alpha_s2,
    gate_sb, gate_s0, gate_s1, gate_s2,
    OP: tl.constexpr, BACKWARD: tl.constexpr, TILED: tl.constexpr, NDIM: tl.constexpr,
    OUT_FLAT: tl.constexpr, GRAD_FLAT: tl.constexpr, H_FLAT: tl.constexpr, S_FLAT: tl.constexpr,
    R_FLAT: tl.constexpr, ALPHA_MODE: tl.constexpr, GATE_MODE: tl.constexpr, SEED_INPUT_IS_HOST: tl.constexpr,
    READ_HOST: tl.constexpr, READ_SEED: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_DS: tl.constexpr,
    WRITE_DR: tl.constexpr, WEIGHT_GRAD: tl.constexpr, WEIGHT_TERMS_PER_ELEMENT: tl.constexpr,
    HOST_DTYPE: tl.constexpr, PROMOTED_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, TANH_DTYPE: tl.constexpr, REDUCE_DTYPE: tl.constexpr,
    I64: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Forward: out = the op's value. Backward: out = dh (dm for the valve), ds, dr and the
    weight's gradient terms (per element, or one partial sum per program)."""
    pid, b, j, i0, i1, i2, mask = _block(INNER, D1, D2, CHUNKS, CHANNEL_TILES, NDIM, TILED, I64, BLOCK_P, BLOCK_C)
    out_off = offset(b, j, i0, i1, i2, out_sb, out_s0, out_s1, out_s2, OUT_FLAT)
    h_off = offset(b, j, i0, i1, i2, h_sb, h_s0, h_s1, h_s2, H_FLAT)
    if s_ptr is not None:
        s_off = offset(b, j, i0, i1, i2, s_sb, s_s0, s_s1, s_s2, S_FLAT)
    if r_ptr is not None:
        r_off = offset(b, j, i0, i1, i2, r_sb, r_s0, r_s1, r_s2, R_FLAT)
    if OP != 3:
        alpha = load_weight(alpha_ptr, b, i0, i1, i2, alpha_sb, alpha_s0, alpha_s1, alpha_s2, mask, ALPHA_MODE,
                            WEIGHT_DTYPE, INTERPRET)
        gate = alpha
        if (OP == 1) | (OP == 5):
            gate = load_weight(gate_ptr, b, i0, i1, i2, gate_sb, gate_s0, gate_s1, gate_s2, mask, GATE_MODE,
                               WEIGHT_DTYPE, INTERPRET)
        w = _op_weight(alpha, gate, OP, HOST_DTYPE, PROMOTED_DTYPE, COMPUTE_DTYPE, INTERPRET)
    if BACKWARD:
        grad_off = offset(b, j, i0, i1, i2, grad_sb, grad_s0, grad_s1, grad_s2, GRAD_FLAT)
        grad = load_float(grad_ptr + grad_off, mask, COMPUTE_DTYPE, INTERPRET)
    if OP == 5:
        if BACKWARD:
            y = grad
            weight_term = grad.to(REDUCE_DTYPE)
        else:
            y = tl.where(mask, w, 0.0)
    elif OP == 4:
        m = tl.load(h_ptr + h_off, mask=mask, other=0)
        if BACKWARD:
            y, weight_term = valve_backward(grad, m, w, h_ptr.dtype.element_ty, TANH_DTYPE, WEIGHT_GRAD,
                                            COMPUTE_DTYPE, REDUCE_DTYPE, INTERPRET)
        else:
            y = valve(m, w, h_ptr.dtype.element_ty, TANH_DTYPE, COMPUTE_DTYPE, INTERPRET)
    else:
        if BACKWARD:
            # operands the closed forms do not need are not read (placeholders keep the names bound)
            h = grad
            s = grad
        if READ_HOST:
            h = load_float(h_ptr + h_off, mask, COMPUTE_DTYPE, INTERPRET)
        if READ_SEED:
            s = _seed(tl.load(s_ptr + s_off, mask=mask, other=0), HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
        r = h
        if (OP == 2) & (not SEED_INPUT_IS_HOST):
            r = _seed(tl.load(r_ptr + r_off, mask=mask, other=0), HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
        if OP == 3:
            w = h  # STE: no weight
        if BACKWARD:
            if OP <= 1:
                y, ds, weight_term = lerp_backward(grad, h, s, w, WEIGHT_GRAD, REDUCE_DTYPE)
            else:
                y, ds, weight_term = multiply_backward(grad, h, s, r, w, SEED_INPUT_IS_HOST, WEIGHT_GRAD, HOST_DTYPE,
                                                       COMPUTE_DTYPE, REDUCE_DTYPE, INTERPRET)
            # the gradient of s.to(h.dtype) is rounded to h's dtype, then (by the store) to s's
            ds = round_to(ds, HOST_DTYPE, INTERPRET)
            if WRITE_DS:
                store(ds_ptr + s_off, ds, mask, INTERPRET)
            if WRITE_DR:
                store(dr_ptr + r_off, -ds, mask, INTERPRET)
        elif OP <= 1:
            y = lerp(h, s, w)
        elif OP == 2:
            y = multiply(h, s, r, w, HOST_DTYPE, INTERPRET)
        else:
            y = h + (s - s)
    if WRITE_OUT:
        store(out_ptr + out_off, y, mask, INTERPRET)
    if WEIGHT_GRAD:
        weight_term = tl.where(mask, weight_term, 0.0)
        if WEIGHT_TERMS_PER_ELEMENT:
            tl.store(weight_terms_ptr + out_off, weight_term, mask=mask)
        else:
            if TILED:
                weight_term = tl.sum(weight_term, axis=1)
            tl.store(partials_ptr + pid, tl.sum(weight_term, axis=0))


@triton.jit
def _weight_grad_kernel(
    partials_ptr, dalpha_ptr, dgate_ptr, alpha_ptr, gate_ptr,
    B, CHUNKS, alpha_sb, gate_sb,
    OP: tl.constexpr, ALPHA_MODE: tl.constexpr, GATE_MODE: tl.constexpr,
    HOST_DTYPE: tl.constexpr, PROMOTED_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: per-sample sums of the partials (float64, fixed order), chained through
    the clamps to alpha and gate (a gradient not wanted has no buffer: None); summed over
    samples for a scalar weight."""
    total_alpha = tl.zeros([BLOCK_B], dtype=tl.float64)
    total_gate = tl.zeros([BLOCK_B], dtype=tl.float64)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float64)
        for k0 in range(0, CHUNKS, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            m2 = row_mask[:, None] & (kk[None, :] < CHUNKS)
            acc += tl.load(partials_ptr + rows[:, None] * CHUNKS + kk[None, :], mask=m2, other=0).to(tl.float64)
        d_weight = tl.sum(acc, axis=1)
        safe_rows = tl.minimum(rows, B - 1)  # rows past B read sample B-1; their results are masked
        alpha = load_weight(alpha_ptr, safe_rows, 0, 0, 0, alpha_sb, 0, 0, 0, row_mask, ALPHA_MODE, WEIGHT_DTYPE,
                            INTERPRET)
        if (OP == 1) | (OP == 5):
            gate = load_weight(gate_ptr, safe_rows, 0, 0, 0, gate_sb, 0, 0, 0, row_mask, GATE_MODE, WEIGHT_DTYPE,
                               INTERPRET)
            d_alpha, d_gate = effective_alpha_backward(d_weight, alpha, gate, PROMOTED_DTYPE, INTERPRET)
            if dgate_ptr is not None:
                if GATE_MODE == 2:
                    store(dgate_ptr + rows, d_gate, row_mask, INTERPRET)
                else:
                    total_gate += tl.where(row_mask, d_gate, 0.0)
        elif OP == 2:
            d_alpha = tl.where(in01(round_to(alpha, HOST_DTYPE, INTERPRET)), d_weight, 0.0)
        else:
            d_alpha = tl.where(in01(alpha), d_weight, 0.0)
        if dalpha_ptr is not None:
            if ALPHA_MODE == 2:
                store(dalpha_ptr + rows, d_alpha, row_mask, INTERPRET)
            else:
                total_alpha += tl.where(row_mask, d_alpha, 0.0)
    if (dalpha_ptr is not None) & (ALPHA_MODE != 2):
        store(dalpha_ptr, tl.sum(total_alpha, axis=0), None, INTERPRET)
    if (dgate_ptr is not None) & (GATE_MODE != 2):
        store(dgate_ptr, tl.sum(total_gate, axis=0), None, INTERPRET)


# ============================================================================ planning
_dense_cache: dict = {}


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (every element of its storage span used once)."""
    shape, strides = t.shape, t.stride()

    def make():
        expected = 1
        for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1):
            if stride != expected:
                return False
            expected *= size
        return True

    return common.cached(_dense_cache, (shape, strides), make)


def _layout_4d(shape, strides):
    """"nchw" or "cl" when a 4-D tensor is dense in that memory format (size-1 dims carry no
    stride), else None. Where C or H*W is 1 the two coincide; "nchw" is returned."""
    if len(shape) != 4:
        return None
    _, c, h, w = shape
    for name, canon in (("nchw", (c * h * w, h * w, w, 1)), ("cl", (h * w * c, 1, w * c, c))):
        if all(n == 1 or st == want for n, st, want in zip(shape, strides, canon)):
            return name
    return None


_launch_cache: dict = {}


def _tiled_iteration(op, shape, ref_strides, operands, modes):
    """The mixed-layout iteration (channels_last beside NCHW operands of one (B,C,H,W) shape,
    weights scalar or per-sample): (samples, tiles, ints, strides of out/grad/h/s/r, kw), or
    None to leave the call to the strided iteration (one layout everywhere, other layouts,
    ranks or weight shapes)."""
    if op == OP_VALVE or len(shape) != 4 or WEIGHT_PER_ELEMENT in modes:
        return None
    samples, channels, hw = shape[0], shape[1], shape[2] * shape[3]
    if samples == 0 or channels < 2 or hw < 2 or channels * hw < MIN_SPLIT_INNER:
        return None
    ref = _layout_4d(shape, ref_strides)
    layouts = [None if x is None else _layout_4d(shape, x.stride()) for x in operands]
    if ref is None or layouts[1] != ref or any(x is not None and c is None for x, c in zip(operands, layouts)):
        return None  # out (dh) is written at h's offsets
    if all(c is None or c == ref for c in layouts):
        return None  # one layout: the strided iteration is already coalesced
    # powers of two, about TILE_ELEMS elements, neither side starved (each operand's
    # contiguous run is a whole row or column of the tile)
    block_p = min(triton.next_power_of_2(hw), 64)
    block_c = min(triton.next_power_of_2(channels), max(1, TILE_ELEMS // block_p))
    block_p = min(triton.next_power_of_2(hw), max(1, TILE_ELEMS // block_c))
    channel_tiles = triton.cdiv(channels, block_c)
    tiles = triton.cdiv(hw, block_p) * channel_tiles
    sample = channels * hw
    strides = [(sample, 0, channels, 1) if c == "cl" else (sample, 0, 1, hw) for c in [ref] + layouts]
    kw = dict(TILED=True, NDIM=3, I64=samples * sample + TILE_ELEMS >= common.I32_SAFE,
              BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4 if block_p * block_c <= 1024 else 8)
    return samples, tiles, (sample, hw, channels, tiles, channel_tiles), strides, [False] * 5, kw


def _strided_iteration(shape, ref_strides, operands, weights, modes):
    """The iteration in the output's storage order, operands by their own strides: (samples,
    chunks, ints, strides of out/grad/h/s/r and per-element weights, flat flags, kw), or None
    when the operands need more than 3 inner dims. Turns per-sample weight modes per-element
    where samples are not split."""
    split = False
    if WEIGHT_PER_SAMPLE in modes:
        # split when each sample is one contiguous slab (dense, dim 0 outermost) and big enough
        inner = math.prod(shape[1:])
        split = shape[0] > 1 and ref_strides[0] == inner and inner >= MIN_SPLIT_INNER
        if not split:
            modes[:] = [WEIGHT_PER_ELEMENT if m == WEIGHT_PER_SAMPLE else m for m in modes]
    per_element = [w.expand(shape).stride() for m, w in zip(modes, weights) if m == WEIGHT_PER_ELEMENT]
    op_strides = (ref_strides,) + tuple(ref_strides if x is None else x.stride() for x in operands)
    p = common.plan(shape, ref_strides, op_strides + tuple(per_element), split)
    if p is None:
        return None
    block = min(common.MAX_BLOCK, max(64, triton.next_power_of_2(p.inner)))
    chunks = triton.cdiv(p.inner, block)
    kw = dict(TILED=False, NDIM=p.ndim, I64=p.i64, BLOCK_P=block, BLOCK_C=1, num_warps=4 if block <= 1024 else 8)
    return (p.samples, chunks, (p.inner, p.d1, p.d2, chunks, 1), [o[:4] for o in p.operands],
            [o[4] for o in p.operands[:5]], kw)


def _make_launch(backward, op, shape, ref_strides, operands, weights, device, host, promoted, need):
    """Everything about a launch that depends only on shapes, strides, dtypes and devices (built
    once per configuration and cached, so a call does no planning). operands: (grad or None,
    h, s, r); need: the backward's (dh, ds, dr, dalpha, dgate)."""
    modes = [WEIGHT_SCALAR if w is None else common.weight_mode(w, device, shape) for w in weights]
    iteration = _tiled_iteration(op, shape, ref_strides, operands, modes)
    launch = SimpleNamespace(tiled=iteration is not None, modes=modes)
    iteration = iteration or _strided_iteration(shape, ref_strides, operands, weights, modes)
    launch.fallback = iteration is None
    if launch.fallback:
        return launch
    samples, chunks, ints, strides, flats, kw = iteration
    launch.grid = (samples * chunks,)
    # strides the kernel never reads (absent operands, a weight's that is not per element) are
    # None: constexprs, no launch arguments
    unused = (None,) * 4
    per_element = iter(strides[5:])
    present = (True,) + tuple(x is not None for x in operands)
    strides = [st if p else unused for st, p in zip(strides[:5], present)] + [
        next(per_element) if m == WEIGHT_PER_ELEMENT else (w.stride(0), None, None, None) if m == WEIGHT_PER_SAMPLE
        else unused for m, w in zip(modes, weights)]
    launch.ints = ints + sum(strides, ())
    compute = common.compute_dtype(host, operands[1].dtype)
    dtype_kw = dict(OP=op, HOST_DTYPE=common.tl_dtype(host), PROMOTED_DTYPE=common.tl_dtype(promoted),
                    WEIGHT_DTYPE=common.compute_dtype(*[w.dtype for w in weights if w is not None], host, promoted))
    kw.update(dtype_kw, BACKWARD=backward, COMPUTE_DTYPE=compute, TANH_DTYPE=common.compute_dtype(operands[1].dtype),
              ALPHA_MODE=modes[0], GATE_MODE=modes[1], SEED_INPUT_IS_HOST=operands[3] is None,
              **common.LAUNCH_OPTIONS, **dict(zip(("OUT_FLAT", "GRAD_FLAT", "H_FLAT", "S_FLAT", "R_FLAT"), flats)))
    if not backward:
        launch.kw = dict(kw, READ_HOST=True, READ_SEED=True, WRITE_OUT=True, WRITE_DS=False, WRITE_DR=False,
                         WEIGHT_GRAD=False, WEIGHT_TERMS_PER_ELEMENT=False, REDUCE_DTYPE=compute)
        return launch
    need_h, write_ds, write_dr, need_alpha, need_gate = need  # ds, dr: wanted and present
    weight_grad = need_alpha or need_gate
    reduce_dtype = tl.float64 if host in (torch.float32, torch.float64) else tl.float32
    launch.partial_dtype = torch.float64 if reduce_dtype == tl.float64 else torch.float32
    launch.weight_terms_per_element = weight_grad and WEIGHT_PER_ELEMENT in modes
    # what the closed forms read: the lerp's dh = g*(1-w) and ds = g*w need neither h nor s
    # without a weight gradient; MULTIPLY needs s (and r) for tanh, and h only for ds, dr,
    # the alpha term, or when r is h
    if op in (OP_ADD, OP_GATE):
        read_host = read_seed = weight_grad
    else:
        read_host = op != OP_MULTIPLY or operands[3] is None or write_ds or write_dr or weight_grad
        read_seed = True
    launch.kw = dict(kw, READ_HOST=read_host, READ_SEED=read_seed, WRITE_OUT=need_h, WRITE_DS=write_ds,
                     WRITE_DR=write_dr, WEIGHT_GRAD=weight_grad, REDUCE_DTYPE=reduce_dtype,
                     WEIGHT_TERMS_PER_ELEMENT=launch.weight_terms_per_element)
    block_k = min(triton.next_power_of_2(chunks), 1024)
    launch.weight_grad_ints = (samples, chunks, strides[5][0], strides[6][0])
    launch.weight_grad_kw = dict(dtype_kw, ALPHA_MODE=modes[0], GATE_MODE=modes[1], **common.LAUNCH_OPTIONS,
                                 BLOCK_B=max(1, min(triton.next_power_of_2(samples), 4096 // block_k)), BLOCK_K=block_k)
    return launch


def _get_launch(backward, op, shape, ref_strides, operands, weights, device, host, promoted, need=None):
    tensors = tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device)
                    for t in operands + weights)
    key = (backward, op, shape, ref_strides, tensors, device, host, promoted, need, common.FORCE_VALUE_MODE)
    return common.cached(_launch_cache, key, lambda: _make_launch(
        backward, op, shape, ref_strides, operands, weights, device, host, promoted, need))


def _to_layout(x: torch.Tensor, shape, strides) -> torch.Tensor:
    out = torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device)
    out.copy_(x.expand(shape))
    return out


def _materialize(weights, shape, strides, device):
    """Per-element weights as full tensors in the iteration layout (fallback only)."""
    return [w if w is None or common.weight_mode(w, device, shape) != WEIGHT_PER_ELEMENT
            else _to_layout(w.to(device), shape, strides) for w in weights]


# ============================================================================ launches
def forward(op, out, h, s, r, alpha, gate, host, promoted):
    """Launch the forward kernel of `op` writing `out` (whose layout is the iteration's)."""
    if out.numel() == 0:
        return out
    device, shape, strides = h.device, out.shape, out.stride()
    launch = _get_launch(False, op, shape, strides, (None, h, s, r), (alpha, gate), device, host, promoted)
    if launch.fallback:
        # more than 3 inner dims no stride pattern coalesces: copy into the iteration layout
        h, s, r = (None if x is None else _to_layout(x, shape, strides) for x in (h, s, r))
        alpha, gate = _materialize((alpha, gate), shape, strides, device)
        launch = _get_launch(False, op, shape, strides, (None, h, s, r), (alpha, gate), device, host, promoted)
    a = common.weight_arg(alpha, launch.modes[0], device)
    g = common.weight_arg(gate, launch.modes[1], device)
    _elementwise_kernel[launch.grid](out, None, None, None, None, None, h, s, r, a, g, *launch.ints, **launch.kw)
    return out


def _feature_grad_buffer(x: torch.Tensor, needed: bool):
    """(kernel operand, gradient buffer): the gradient shares the operand's strides, so a
    non-dense operand is first copied into the layout empty_like gives."""
    if not is_dense(x):
        x = torch.empty_like(x).copy_(x)
    return x, (torch.empty_like(x) if needed else None)


def backward(op, grad, h, s, r, alpha, gate, need, host, promoted, original_weights=None):
    """Launch the backward of `op`; need = (dh, ds, dr, dalpha, dgate) flags. Returns the
    five gradients, None where not needed. `original_weights`: the (alpha, gate) the fallback
    materialized (their gradients are summed back to the original shapes)."""
    need_h, need_s, need_r, need_alpha, need_gate = need
    if grad.dtype != host:
        grad = grad.to(host)
    device, shape = h.device, h.shape
    dh = torch.empty_like(h) if (need_h or not is_dense(h)) else None
    strides = h.stride() if dh is None else dh.stride()
    ds = dr = None
    if s is not None:
        s, ds = _feature_grad_buffer(s, need_s)
    if r is not None:
        r, dr = _feature_grad_buffer(r, need_r)
    user_alpha, user_gate = (alpha, gate) if original_weights is None else original_weights
    if h.numel() == 0:
        da = user_alpha.new_zeros(user_alpha.shape) if need_alpha else None
        dg = user_gate.new_zeros(user_gate.shape) if need_gate else None
        return (dh if need_h else None), ds, dr, da, dg
    need = (bool(need_h), ds is not None, dr is not None, bool(need_alpha), bool(need_gate))
    launch = _get_launch(True, op, shape, strides, (grad, h, s, r), (alpha, gate), device, host, promoted, need)
    if launch.fallback:
        copies = [None if x is None else _to_layout(x, shape, strides) for x in (grad, h, s, r)]
        full_alpha, full_gate = _materialize((alpha, gate), shape, strides, device)
        grads = backward(op, *copies, full_alpha, full_gate, need, host, promoted,
                         original_weights=(user_alpha, user_gate))
        if ds is not None:
            ds.copy_(grads[1])
        if dr is not None:
            dr.copy_(grads[2])
        return (dh.copy_(grads[0]) if need_h else None), ds, dr, grads[3], grads[4]
    a = common.weight_arg(alpha, launch.modes[0], device)
    g = common.weight_arg(gate, launch.modes[1], device)
    weight_terms = partials = None
    if need_alpha or need_gate:
        if launch.weight_terms_per_element:
            weight_terms = torch.empty_strided(shape, strides, dtype=launch.partial_dtype, device=device)
        else:
            partials = torch.empty(launch.grid, dtype=launch.partial_dtype, device=device)
    _elementwise_kernel[launch.grid](
        dh, ds, dr, weight_terms, partials, grad, h, s, r, a, g, *launch.ints, **launch.kw)
    da = dg = None
    if launch.weight_terms_per_element:
        da, dg = _weight_grads_from_elements(op, weight_terms, user_alpha, user_gate, need_alpha, need_gate, host,
                                             promoted)
    elif need_alpha or need_gate:
        da = torch.empty(user_alpha.shape, dtype=user_alpha.dtype, device=device) if need_alpha else None
        dg = torch.empty(user_gate.shape, dtype=user_gate.dtype, device=device) if need_gate else None
        _weight_grad_kernel[(1,)](partials, da, dg, a, g, *launch.weight_grad_ints, **launch.weight_grad_kw)
        da, dg = (d if d is None or d.device == w.device else d.to(w.device)
                  for d, w in ((da, user_alpha), (dg, user_gate)))
    return (dh if need_h else None), ds, dr, da, dg


def _weight_grads_from_elements(op, weight_terms, alpha, gate, need_alpha, need_gate, host, promoted):
    """Weights of general broadcast shapes: per-element terms summed in float64 by torch
    (deterministic) to the weight's shape (GATE: the broadcast of alpha's and gate's), then
    chained through the clamps."""
    def in01(x):
        return (x >= 0) & (x <= 1)

    def to_shape(d, w):
        return (d.sum_to_size(w.shape) if w.dim() else d.sum()).to(w.dtype).to(w.device)

    terms = weight_terms.to(torch.float64)
    zero = terms.new_zeros(())
    if op not in (OP_GATE, OP_EFFECTIVE_ALPHA):
        a = alpha.to(terms.device)
        d_alpha = terms.sum_to_size(alpha.shape) if alpha.dim() else terms.sum()
        return to_shape(torch.where(in01(a.to(host) if op == OP_MULTIPLY else a), d_alpha, zero), alpha), None
    shape = validation.broadcast_shape(alpha.shape, gate.shape)
    terms = terms.sum_to_size(shape) if len(shape) else terms.sum()
    a, g = alpha.to(terms.device), gate.to(terms.device)
    weight_dtype = torch.float64 if torch.float64 in (alpha.dtype, gate.dtype, host) else torch.float32
    clamped_alpha, clamped_gate = a.to(weight_dtype).clamp(0, 1), g.to(weight_dtype).clamp(0, 1)
    d_product = torch.where(in01((clamped_alpha * clamped_gate).to(promoted)), terms, zero)
    d_alpha = to_shape(torch.where(in01(a), d_product * clamped_gate.double(), zero), alpha) if need_alpha else None
    d_gate = to_shape(torch.where(in01(g), d_product * clamped_alpha.double(), zero), gate) if need_gate else None
    return d_alpha, d_gate


# ============================================================================ the ops
# Forward: f(*inputs). Backward: f(grad, *inputs, need) with one need flag per input (the
# table's `Op.grads`); returns one gradient per input, None where not needed.
def blend_add_forward(h, s, alpha):
    return forward(OP_ADD, torch.empty_like(h), h, s, None, alpha, None, h.dtype, h.dtype)


def blend_gate_forward(h, s, alpha, gate):
    return forward(OP_GATE, torch.empty_like(h), h, s, None, alpha, gate, h.dtype, torch.result_type(alpha, gate))


def blend_multiply_forward(h, s, alpha, seed_input):
    return forward(OP_MULTIPLY, torch.empty_like(h), h, s, seed_input, alpha, None, h.dtype, h.dtype)


def ste_forward(h, s):
    return forward(OP_STE, torch.empty_like(h), h, s, None, None, None, h.dtype, h.dtype)


def valve_multiplier_forward(alpha, m):
    result = torch.result_type(alpha, m)
    return forward(OP_VALVE, torch.empty_like(m, dtype=result), m, None, None, alpha, None, result, result)


def gate_effective_alpha_forward(alpha, gate):
    out = BY_NAME["gate_effective_alpha"].fake(alpha, gate)  # the table's allocation
    return forward(OP_EFFECTIVE_ALPHA, out, out, None, None, alpha, gate, out.dtype, out.dtype)


def blend_add_backward(grad, h, s, alpha, need):
    dh, ds, _, da, _ = backward(OP_ADD, grad, h, s, None, alpha, None,
                                (need[0], need[1], False, need[2], False), h.dtype, h.dtype)
    return dh, ds, da


def blend_gate_backward(grad, h, s, alpha, gate, need):
    dh, ds, _, da, dg = backward(OP_GATE, grad, h, s, None, alpha, gate, (need[0], need[1], False, need[2], need[3]),
                                 h.dtype, torch.result_type(alpha, gate))
    return dh, ds, da, dg


def blend_multiply_backward(grad, h, s, alpha, seed_input, need):
    dh, ds, dr, da, _ = backward(OP_MULTIPLY, grad, h, s, seed_input, alpha, None,
                                 (need[0], need[1], need[3], need[2], False), h.dtype, h.dtype)
    return dh, ds, da, dr


def valve_multiplier_backward(grad, alpha, m, need):
    result = torch.result_type(alpha, m)
    dm, _, _, da, _ = backward(OP_VALVE, grad, m, None, None, alpha, None,
                               (need[1], False, False, need[0], False), result, result)
    return da, dm


def gate_effective_alpha_backward(grad, alpha, gate, need):
    promoted = torch.result_type(alpha, gate)
    _, _, _, da, dg = backward(OP_EFFECTIVE_ALPHA, grad, grad, None, None, alpha, gate,
                               (False, False, False, need[0], need[1]), promoted, promoted)
    return da, dg
