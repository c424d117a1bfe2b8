"""The elementwise kernels of ADD, GATE, MULTIPLY, STE and the valve multiplier: one forward
and one backward kernel over any strided layout, a tiled pair for mixed memory formats, and
the kernel that reduces the alpha/gate gradient. The per-element math is each family's
(`lerp.py`, `multiply.py`; STE's value is h + (s - s)). Operand names: h is the host (m for
the valve), s the seed, r the seed input (h when absent).

A forward is one launch. A backward is one pass that writes each feature gradient and, for
alpha/gate, one partial sum per program, then one program that sums the partials in a fixed
order in float64 and chains them through the clamps (deterministic, no atomics); weights of
other broadcast shapes reduce per-element terms with torch's deterministic sum instead.
Nothing but the inputs is saved for backward, and no kernel writes into an input.

Rounding points follow the native backend (csrc/cpu/blend_cpu.cpp): the seed is read in its
own dtype and rounded to the host's dtype inside the kernel; math runs in float32 (float64
for double); the output is rounded once; weights are rounded where the references round
them. The alpha/gate gradient terms and partial sums are float64 for float32/float64
features (float32 for half types), well inside rule 2 of docs/semantics.md#equivalence.

Iteration: the kernels walk the output's storage order (the host's memory format), split per
sample when a weight is per-sample, so alpha/gate cost one scalar load per program; every
other operand is addressed by its own strides (a channels_last host with an NCHW seed costs no
copy). Inner dims are coalesced to at most three; layouts that need more (rare, rank >= 5)
are copied into the output's layout. Mixed memory formats (Esper's channels_last host beside
an NCHW seed: every operand a dense (B,C,H,W) tensor in one of the two formats, weights scalar
or per-sample) take the tiled kernels: one program per [positions x channels] tile of one
sample, each operand read and written along its own contiguous dim. A backward reads only
what its closed forms need and writes only the gradients asked for. 64-bit offsets switch on
when a tensor spans 2^31 elements. A 0-dim CPU alpha beside device features is passed by value
(no copy, no sync). Host-side planning is cached per (shape, strides, dtypes, devices).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import validation
from . import _common as C
from ._common import (
    WEIGHT_BY_VALUE,
    WEIGHT_PER_ELEMENT,
    WEIGHT_PER_SAMPLE,
    WEIGHT_SCALAR,
    clamp01,
    coords,
    in01,
    load_weight,
    offset,
    round_to,
    store,
    store_scalar,
    to_float,
)
from ._common import present_or as _or
from .lerp import effective_alpha, effective_alpha_backward, lerp, lerp_backward
from .multiply import multiply, multiply_backward, valve, valve_backward

OP_ADD, OP_GATE, OP_MULTIPLY, OP_STE, OP_VALVE = 0, 1, 2, 3, 4

# Per-sample weights use the per-sample split only when a sample has at least this many
# elements; smaller samples read the weight per element (one program covers many samples).
MIN_SPLIT_INNER = 64
# Elements per tile of the mixed-layout path (a power of two). The interpreter runs one
# program at a time, so it gets larger tiles; tests lower it to exercise edge tiles.
TILE_ELEMS = 32768 if C.INTERPRET else 2048


# ============================================================================ kernels
@triton.jit
def _op_weight(alpha, gate, OP: tl.constexpr, HOST_DTYPE: tl.constexpr, PROMOTED_DTYPE: tl.constexpr,
               COMPUTE_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """The per-element weight of each op, rounded where the reference rounds it."""
    if OP == 1:  # GATE: the effective alpha in the promoted dtype, then h's
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
    else:
        if x.dtype == tl.float64:
            xf = x
        else:
            xf = to_float(x, tl.float32, INTERPRET)
        return round_to(xf, HOST_DTYPE, INTERPRET).to(COMPUTE_DTYPE)


@triton.jit
def _forward_math(h, s, r, w, OP: tl.constexpr, INTERPRET: tl.constexpr):
    """The value of ADD/GATE, MULTIPLY or STE on compute-dtype blocks of any shape."""
    if OP <= 1:
        y = lerp(h, s, w)
    elif OP == 2:
        y = multiply(h, s, r, w, INTERPRET)
    else:
        y = h + (s - s)
    return y


@triton.jit
def _backward_math(grad, h, s, r, w, OP: tl.constexpr, SEED_INPUT_IS_HOST: tl.constexpr,
                   WEIGHT_GRAD: tl.constexpr, HOST_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                   REDUCE_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """(dh, ds rounded to the host dtype, the weight's gradient term) of ADD/GATE/MULTIPLY."""
    if OP <= 1:
        dh, ds, weight_term = lerp_backward(grad, h, s, w, WEIGHT_GRAD, REDUCE_DTYPE)
    else:
        dh, ds, weight_term = multiply_backward(grad, h, s, r, w, SEED_INPUT_IS_HOST, WEIGHT_GRAD,
                                                HOST_DTYPE, COMPUTE_DTYPE, REDUCE_DTYPE, INTERPRET)
    # the gradient of s.to(h.dtype) is rounded to h's dtype, then (by the store) to s's
    return dh, round_to(ds, HOST_DTYPE, INTERPRET), weight_term


@triton.jit
def _forward_kernel(
    out_ptr, h_ptr, s_ptr, r_ptr, alpha_ptr, gate_ptr,
    INNER, D1, D2, CHUNKS,
    h_sb, h_s0, h_s1, h_s2,
    s_sb, s_s0, s_s1, s_s2,
    r_sb, r_s0, r_s1, r_s2,
    alpha_sb, alpha_s0, alpha_s1, alpha_s2,
    gate_sb, gate_s0, gate_s1, gate_s2,
    OP: tl.constexpr, NDIM: tl.constexpr,
    H_FLAT: tl.constexpr, S_FLAT: tl.constexpr, R_FLAT: tl.constexpr,
    ALPHA_MODE: tl.constexpr, GATE_MODE: tl.constexpr, SEED_INPUT_IS_HOST: tl.constexpr,
    HOST_DTYPE: tl.constexpr, PROMOTED_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, TANH_DTYPE: tl.constexpr,
    I64: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    b = pid // CHUNKS
    j = (pid - b * CHUNKS) * BLOCK + tl.arange(0, BLOCK)
    mask = j < INNER
    i0, i1, i2 = coords(j, D1, D2, NDIM)
    h_raw = tl.load(h_ptr + offset(b, j, i0, i1, i2, h_sb, h_s0, h_s1, h_s2, H_FLAT), mask=mask, other=0)
    if OP != 3:
        alpha = load_weight(alpha_ptr, b, offset(b, j, i0, i1, i2, alpha_sb, alpha_s0, alpha_s1, alpha_s2, False),
                            mask, ALPHA_MODE, alpha_sb, WEIGHT_DTYPE, INTERPRET)
        if OP == 1:
            gate = load_weight(gate_ptr, b, offset(b, j, i0, i1, i2, gate_sb, gate_s0, gate_s1, gate_s2, False),
                               mask, GATE_MODE, gate_sb, WEIGHT_DTYPE, INTERPRET)
        else:
            gate = alpha
        w = _op_weight(alpha, gate, OP, HOST_DTYPE, PROMOTED_DTYPE, COMPUTE_DTYPE, INTERPRET)
    if OP == 4:
        y = valve(h_raw, w, h_ptr.dtype.element_ty, TANH_DTYPE, COMPUTE_DTYPE, INTERPRET)
    else:
        h = to_float(h_raw, COMPUTE_DTYPE, INTERPRET)
        s_raw = tl.load(s_ptr + offset(b, j, i0, i1, i2, s_sb, s_s0, s_s1, s_s2, S_FLAT), mask=mask, other=0)
        s = _seed(s_raw, HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
        r = h
        if OP == 2:
            if not SEED_INPUT_IS_HOST:
                r_raw = tl.load(r_ptr + offset(b, j, i0, i1, i2, r_sb, r_s0, r_s1, r_s2, R_FLAT), mask=mask, other=0)
                r = _seed(r_raw, HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
        if OP == 3:
            w = h  # unused
        y = _forward_math(h, s, r, w, OP, INTERPRET)
    store(out_ptr + (b * INNER + j), y, mask, INTERPRET)


@triton.jit
def _backward_kernel(
    dh_ptr, ds_ptr, dr_ptr, weight_terms_ptr, partials_ptr,
    grad_ptr, h_ptr, s_ptr, r_ptr, alpha_ptr, gate_ptr,
    INNER, D1, D2, CHUNKS,
    grad_sb, grad_s0, grad_s1, grad_s2,
    h_sb, h_s0, h_s1, h_s2,
    s_sb, s_s0, s_s1, s_s2,
    r_sb, r_s0, r_s1, r_s2,
    alpha_sb, alpha_s0, alpha_s1, alpha_s2,
    gate_sb, gate_s0, gate_s1, gate_s2,
    OP: tl.constexpr, NDIM: tl.constexpr, GRAD_FLAT: tl.constexpr,
    H_FLAT: tl.constexpr, S_FLAT: tl.constexpr, R_FLAT: tl.constexpr,
    ALPHA_MODE: tl.constexpr, GATE_MODE: tl.constexpr, SEED_INPUT_IS_HOST: tl.constexpr,
    WRITE_DH: tl.constexpr, WRITE_DS: tl.constexpr, WRITE_DR: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, WEIGHT_TERMS_PER_ELEMENT: tl.constexpr,
    READ_HOST: tl.constexpr, READ_SEED: tl.constexpr,
    HOST_DTYPE: tl.constexpr, PROMOTED_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, TANH_DTYPE: tl.constexpr, REDUCE_DTYPE: tl.constexpr,
    I64: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    b = pid // CHUNKS
    j = (pid - b * CHUNKS) * BLOCK + tl.arange(0, BLOCK)
    mask = j < INNER
    i0, i1, i2 = coords(j, D1, D2, NDIM)
    out_off = b * INNER + j
    grad = to_float(tl.load(grad_ptr + offset(b, j, i0, i1, i2, grad_sb, grad_s0, grad_s1, grad_s2, GRAD_FLAT),
                            mask=mask, other=0), COMPUTE_DTYPE, INTERPRET)
    h_off = offset(b, j, i0, i1, i2, h_sb, h_s0, h_s1, h_s2, H_FLAT)
    alpha = load_weight(alpha_ptr, b, offset(b, j, i0, i1, i2, alpha_sb, alpha_s0, alpha_s1, alpha_s2, False),
                        mask, ALPHA_MODE, alpha_sb, WEIGHT_DTYPE, INTERPRET)
    if OP == 1:
        gate = load_weight(gate_ptr, b, offset(b, j, i0, i1, i2, gate_sb, gate_s0, gate_s1, gate_s2, False),
                           mask, GATE_MODE, gate_sb, WEIGHT_DTYPE, INTERPRET)
    else:
        gate = alpha
    w = _op_weight(alpha, gate, OP, HOST_DTYPE, PROMOTED_DTYPE, COMPUTE_DTYPE, INTERPRET)
    if OP == 4:
        m = tl.load(h_ptr + h_off, mask=mask, other=0)
        dm, weight_term = valve_backward(grad, m, w, h_ptr.dtype.element_ty, TANH_DTYPE, COMPUTE_DTYPE,
                                         REDUCE_DTYPE, INTERPRET)
        if WRITE_DH:
            store(dh_ptr + out_off, dm, mask, INTERPRET)
    else:
        # operands the closed forms do not need are not read (placeholders keep the names bound)
        h = grad
        s = grad
        r = grad
        if READ_HOST:
            h = to_float(tl.load(h_ptr + h_off, mask=mask, other=0), COMPUTE_DTYPE, INTERPRET)
        s_off = offset(b, j, i0, i1, i2, s_sb, s_s0, s_s1, s_s2, S_FLAT)
        if READ_SEED:
            s = _seed(tl.load(s_ptr + s_off, mask=mask, other=0), HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
        if OP == 2:
            r_off = offset(b, j, i0, i1, i2, r_sb, r_s0, r_s1, r_s2, R_FLAT)
            if SEED_INPUT_IS_HOST:
                r = h
            else:
                r = _seed(tl.load(r_ptr + r_off, mask=mask, other=0), HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
        dh, ds, weight_term = _backward_math(grad, h, s, r, w, OP, SEED_INPUT_IS_HOST, WEIGHT_GRAD,
                                             HOST_DTYPE, COMPUTE_DTYPE, REDUCE_DTYPE, INTERPRET)
        if WRITE_DH:
            store(dh_ptr + out_off, dh, mask, INTERPRET)
        if WRITE_DS:
            store(ds_ptr + s_off, ds, mask, INTERPRET)
        if OP == 2:
            if WRITE_DR:
                store(dr_ptr + r_off, -ds, mask, INTERPRET)
    if WEIGHT_GRAD:
        weight_term = tl.where(mask, weight_term, 0.0)
        if WEIGHT_TERMS_PER_ELEMENT:
            tl.store(weight_terms_ptr + out_off, weight_term, mask=mask)
        else:
            tl.store(partials_ptr + pid, tl.sum(weight_term, axis=0))


# ---------------------------------------------------------------------------- mixed layouts
# A channels_last operand beside NCHW operands of one (B,C,H,W) shape: one program per tile
# of [BLOCK_P positions x BLOCK_C channels] of one sample. Each operand is addressed along its
# own contiguous dim (p*C + c channels_last, c*HW + p NCHW), so every load and store is
# coalesced and Triton's compiler converts between the two register layouts through shared
# memory. The per-element math is the flat kernels'.
@triton.jit
def _tile_offsets(b, positions, channels, C, HW, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return b * (C * HW) + (positions[:, None] * C + channels[None, :])
    else:
        return b * (C * HW) + (channels[None, :] * HW + positions[:, None])


@triton.jit
def _tile_coords(C, HW, TILES, CHANNEL_TILES, I64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(pid, sample, positions, channels, mask) of this program's tile."""
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    b = pid // TILES
    t = pid - b * TILES
    position_tile = t // CHANNEL_TILES
    channel_tile = t - position_tile * CHANNEL_TILES
    positions = position_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = channel_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        positions = positions.to(tl.int64)
        channels = channels.to(tl.int64)
    mask = (positions < HW)[:, None] & (channels < C)[None, :]
    return pid, b, positions, channels, mask


@triton.jit
def _tile_forward_kernel(
    out_ptr, h_ptr, s_ptr, r_ptr, alpha_ptr, gate_ptr,
    C, HW, TILES, CHANNEL_TILES, alpha_sb, gate_sb,
    OP: tl.constexpr, OUT_CL: tl.constexpr,
    H_CL: tl.constexpr, S_CL: tl.constexpr, R_CL: tl.constexpr,
    ALPHA_MODE: tl.constexpr, GATE_MODE: tl.constexpr, SEED_INPUT_IS_HOST: tl.constexpr,
    HOST_DTYPE: tl.constexpr, PROMOTED_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    I64: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid, b, pp, cc, mask = _tile_coords(C, HW, TILES, CHANNEL_TILES, I64, BLOCK_P, BLOCK_C)
    h = to_float(tl.load(h_ptr + _tile_offsets(b, pp, cc, C, HW, H_CL), mask=mask, other=0), COMPUTE_DTYPE, INTERPRET)
    s = _seed(tl.load(s_ptr + _tile_offsets(b, pp, cc, C, HW, S_CL), mask=mask, other=0),
              HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
    r = h
    if OP == 2:
        if not SEED_INPUT_IS_HOST:
            r = _seed(tl.load(r_ptr + _tile_offsets(b, pp, cc, C, HW, R_CL), mask=mask, other=0),
                      HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
    w = h  # STE: unused
    if OP != 3:
        alpha = load_weight(alpha_ptr, b, 0, mask, ALPHA_MODE, alpha_sb, WEIGHT_DTYPE, INTERPRET)
        gate = alpha
        if OP == 1:
            gate = load_weight(gate_ptr, b, 0, mask, GATE_MODE, gate_sb, WEIGHT_DTYPE, INTERPRET)
        w = _op_weight(alpha, gate, OP, HOST_DTYPE, PROMOTED_DTYPE, COMPUTE_DTYPE, INTERPRET)
    y = _forward_math(h, s, r, w, OP, INTERPRET)
    store(out_ptr + _tile_offsets(b, pp, cc, C, HW, OUT_CL), y, mask, INTERPRET)


@triton.jit
def _tile_backward_kernel(
    dh_ptr, ds_ptr, dr_ptr, partials_ptr,
    grad_ptr, h_ptr, s_ptr, r_ptr, alpha_ptr, gate_ptr,
    C, HW, TILES, CHANNEL_TILES, alpha_sb, gate_sb,
    OP: tl.constexpr, GRAD_CL: tl.constexpr,
    H_CL: tl.constexpr, S_CL: tl.constexpr, R_CL: tl.constexpr,
    ALPHA_MODE: tl.constexpr, GATE_MODE: tl.constexpr, SEED_INPUT_IS_HOST: tl.constexpr,
    WRITE_DH: tl.constexpr, WRITE_DS: tl.constexpr, WRITE_DR: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
    READ_HOST: tl.constexpr, READ_SEED: tl.constexpr,
    HOST_DTYPE: tl.constexpr, PROMOTED_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, REDUCE_DTYPE: tl.constexpr,
    I64: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dh, ds, dr share the layouts of h, s, r (empty_like of dense operands)
    pid, b, pp, cc, mask = _tile_coords(C, HW, TILES, CHANNEL_TILES, I64, BLOCK_P, BLOCK_C)
    h_off = _tile_offsets(b, pp, cc, C, HW, H_CL)
    s_off = _tile_offsets(b, pp, cc, C, HW, S_CL)
    r_off = _tile_offsets(b, pp, cc, C, HW, R_CL)
    grad = to_float(tl.load(grad_ptr + _tile_offsets(b, pp, cc, C, HW, GRAD_CL), mask=mask, other=0),
                    COMPUTE_DTYPE, INTERPRET)
    h = grad
    s = grad
    r = grad
    if READ_HOST:
        h = to_float(tl.load(h_ptr + h_off, mask=mask, other=0), COMPUTE_DTYPE, INTERPRET)
    if READ_SEED:
        s = _seed(tl.load(s_ptr + s_off, mask=mask, other=0), HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
    if OP == 2:
        if SEED_INPUT_IS_HOST:
            r = h
        else:
            r = _seed(tl.load(r_ptr + r_off, mask=mask, other=0), HOST_DTYPE, COMPUTE_DTYPE, INTERPRET)
    alpha = load_weight(alpha_ptr, b, 0, mask, ALPHA_MODE, alpha_sb, WEIGHT_DTYPE, INTERPRET)
    gate = alpha
    if OP == 1:
        gate = load_weight(gate_ptr, b, 0, mask, GATE_MODE, gate_sb, WEIGHT_DTYPE, INTERPRET)
    w = _op_weight(alpha, gate, OP, HOST_DTYPE, PROMOTED_DTYPE, COMPUTE_DTYPE, INTERPRET)
    dh, ds, weight_term = _backward_math(grad, h, s, r, w, OP, SEED_INPUT_IS_HOST, WEIGHT_GRAD,
                                         HOST_DTYPE, COMPUTE_DTYPE, REDUCE_DTYPE, INTERPRET)
    if WRITE_DH:
        store(dh_ptr + h_off, dh, mask, INTERPRET)
    if WRITE_DS:
        store(ds_ptr + s_off, ds, mask, INTERPRET)
    if OP == 2:
        if WRITE_DR:
            store(dr_ptr + r_off, -ds, mask, INTERPRET)
    if WEIGHT_GRAD:
        weight_term = tl.where(mask, weight_term, 0.0)
        tl.store(partials_ptr + pid, tl.sum(tl.sum(weight_term, axis=1), axis=0))


@triton.jit
def _load_weight_rows(ptr, rows, row_mask, MODE: tl.constexpr, SAMPLE_STRIDE, DTYPE: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """A weight for a block of samples `rows` (by value, one scalar, or per sample)."""
    if MODE == 0:
        return tl.cast(ptr, DTYPE)
    elif MODE == 1:
        return to_float(tl.load(ptr), DTYPE, INTERPRET)
    else:
        return to_float(tl.load(ptr + rows * SAMPLE_STRIDE, mask=row_mask, other=0), DTYPE, INTERPRET)


@triton.jit
def _weight_grad_kernel(
    partials_ptr, dalpha_ptr, dgate_ptr, alpha_ptr, gate_ptr,
    B, CHUNKS, alpha_sb, gate_sb,
    OP: tl.constexpr, ALPHA_MODE: tl.constexpr, GATE_MODE: tl.constexpr,
    HOST_DTYPE: tl.constexpr, PROMOTED_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr,
    NEED_ALPHA: tl.constexpr, NEED_GATE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: per-sample sums of the partials (float64, fixed order), chained through
    the clamps to alpha and gate; summed over samples for a scalar weight."""
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
        alpha = _load_weight_rows(alpha_ptr, rows, row_mask, ALPHA_MODE, alpha_sb, WEIGHT_DTYPE, INTERPRET)
        if OP == 1:
            gate = _load_weight_rows(gate_ptr, rows, row_mask, GATE_MODE, gate_sb, WEIGHT_DTYPE, INTERPRET)
            d_alpha, d_gate = effective_alpha_backward(d_weight, alpha, gate, PROMOTED_DTYPE, INTERPRET)
            if NEED_GATE:
                if GATE_MODE == 2:
                    store(dgate_ptr + rows, d_gate, row_mask, INTERPRET)
                else:
                    total_gate += tl.where(row_mask, d_gate, 0.0)
        elif OP == 2:
            d_alpha = tl.where(in01(round_to(alpha, HOST_DTYPE, INTERPRET)), d_weight, 0.0)
        else:
            d_alpha = tl.where(in01(alpha), d_weight, 0.0)
        if NEED_ALPHA:
            if ALPHA_MODE == 2:
                store(dalpha_ptr + rows, d_alpha, row_mask, INTERPRET)
            else:
                total_alpha += tl.where(row_mask, d_alpha, 0.0)
    if NEED_ALPHA:
        if ALPHA_MODE != 2:
            store_scalar(dalpha_ptr, tl.sum(total_alpha, axis=0), INTERPRET)
    if NEED_GATE:
        if GATE_MODE != 2:
            store_scalar(dgate_ptr, tl.sum(total_gate, axis=0), INTERPRET)


# ============================================================================ host side
def weight_arg(w, mode, device):
    """What a kernel takes for weight w: a float by value, else a tensor on the device."""
    if w is None:
        return None
    if mode == WEIGHT_BY_VALUE:
        return float(w.item())  # a CPU tensor: no device sync
    if w.device != device:
        return w.to(device, non_blocking=True)
    return w


def _weight_mode(w: torch.Tensor, device: torch.device) -> int:
    if w.numel() == 1:
        if w.device != device or C.FORCE_VALUE_MODE:
            if w.dtype != torch.float64 and w.device.type == "cpu":
                return WEIGHT_BY_VALUE  # a CPU scalar beside device features: no copy
        return WEIGHT_SCALAR
    if w.dim() >= 2 and all(d == 1 for d in w.shape[1:]):
        return WEIGHT_PER_SAMPLE  # confirmed against the features' shape in _make_launch
    return WEIGHT_PER_ELEMENT


class _Launch:
    """Everything about a launch that depends only on shapes, strides, dtypes and devices:
    built once per configuration and cached, so a call does no planning."""

    __slots__ = ("fallback", "tiled", "modes", "grid", "ints", "kw", "weight_terms_per_element",
                 "partial_dtype", "weight_grad_ints", "weight_grad_kw")


_launch_cache: dict = {}


def _to_layout(x: torch.Tensor, shape, strides) -> torch.Tensor:
    out = torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device)
    out.copy_(x.expand(shape))
    return out


def _dtype_kw(op, weights, host, promoted, m_dtype):
    compute = C.compute_dtype(host, *([m_dtype] if m_dtype is not None else []))
    weight = C.compute_dtype(*[w.dtype for w in weights if w is not None], host, promoted)
    return dict(OP=op, HOST_DTYPE=C.tl_dtype(host), PROMOTED_DTYPE=C.tl_dtype(promoted),
                WEIGHT_DTYPE=weight, COMPUTE_DTYPE=compute)


def _backward_kw(launch, op, need, operands, modes, samples, chunks, sample_strides, dtype_kw):
    """The backward kernel's flags and the weight-gradient kernel's launch."""
    _, need_s, need_r, need_alpha, need_gate = need
    weight_grad = bool(need_alpha or need_gate)
    reduce_dtype = tl.float64 if dtype_kw["HOST_DTYPE"] in (tl.float32, tl.float64) else tl.float32
    launch.partial_dtype = torch.float64 if reduce_dtype == tl.float64 else torch.float32
    write_ds = bool(need_s) and operands[2] is not None
    write_dr = bool(need_r) and operands[3] is not None
    # what the closed forms read: the lerp's dh = g*(1-w) and ds = g*w need neither h nor s
    # without a weight gradient; MULTIPLY needs s (and r) for tanh, and h only for ds, dr,
    # the alpha term, or when r is h
    if op in (OP_ADD, OP_GATE):
        read_host = read_seed = weight_grad
    else:
        read_host = op != OP_MULTIPLY or operands[3] is None or write_ds or write_dr or weight_grad
        read_seed = True
    block_k = min(C.next_pow2(chunks), 1024)
    launch.weight_grad_ints = (samples, chunks, sample_strides[0], sample_strides[1])
    launch.weight_grad_kw = dict(
        {k: dtype_kw[k] for k in ("OP", "HOST_DTYPE", "PROMOTED_DTYPE", "WEIGHT_DTYPE")},
        ALPHA_MODE=modes[0], GATE_MODE=modes[1], NEED_ALPHA=bool(need_alpha), NEED_GATE=bool(need_gate),
        INTERPRET=C.INTERPRET, BLOCK_B=max(1, min(C.next_pow2(samples), 4096 // block_k)), BLOCK_K=block_k)
    return dict(WRITE_DH=bool(need[0]), WRITE_DS=write_ds, WRITE_DR=write_dr, WEIGHT_GRAD=weight_grad,
                READ_HOST=bool(read_host), READ_SEED=read_seed, REDUCE_DTYPE=reduce_dtype)


def _make_launch(backward, op, shape, ref_strides, operands, weights, device, host, promoted, m_dtype,
                 need):
    launch = _Launch()
    modes = [WEIGHT_SCALAR if w is None else _weight_mode(w, device) for w in weights]
    for k, (m, w) in enumerate(zip(modes, weights)):
        if m == WEIGHT_PER_SAMPLE and not (w.dim() == len(shape) and w.shape[0] == shape[0]):
            modes[k] = WEIGHT_PER_ELEMENT
    launch.fallback = launch.tiled = False
    launch.modes = modes
    dtype_kw = _dtype_kw(op, weights, host, promoted, m_dtype)
    if _make_tile_launch(launch, backward, op, shape, ref_strides, operands, weights, need, dtype_kw):
        return launch
    n = 1
    for v in shape:
        n *= v
    split = False
    if WEIGHT_PER_SAMPLE in modes:
        split = C.batch_outermost(shape, ref_strides) and n // shape[0] >= MIN_SPLIT_INNER
        if not split:
            modes = launch.modes = [WEIGHT_PER_ELEMENT if m == WEIGHT_PER_SAMPLE else m for m in modes]
    per_element = [w.expand(shape).stride() for m, w in zip(modes, weights) if m == WEIGHT_PER_ELEMENT]
    op_strides = tuple(ref_strides if x is None else x.stride() for x in operands) + tuple(per_element)
    p = C.plan(shape, ref_strides, op_strides, split)
    launch.fallback = p is None
    if p is None:
        return launch
    block, warps = C.elementwise_block(p.inner)
    chunks = C.cdiv(p.inner, block)
    launch.grid = (p.samples * chunks,)
    n_operands = len(operands)
    strides = [o[:4] for o in p.operands[:n_operands]]
    flats = [o[4] for o in p.operands[:n_operands]]
    k = n_operands
    for m, w in zip(modes, weights):
        if m == WEIGHT_PER_ELEMENT:
            strides.append(p.operands[k][:4])
            k += 1
        else:
            strides.append((w.stride(0) if m == WEIGHT_PER_SAMPLE else 0, 0, 0, 0))
    launch.ints = (p.inner, p.d1, p.d2, chunks) + sum(strides, ())
    kw = dict(dtype_kw, NDIM=p.ndim, ALPHA_MODE=modes[0], GATE_MODE=modes[1],
              SEED_INPUT_IS_HOST=operands[-1] is None,
              TANH_DTYPE=C.compute_dtype(operands[1 if backward else 0].dtype),  # m's opmath (VALVE)
              I64=p.i64, INTERPRET=C.INTERPRET, BLOCK=block, num_warps=warps)
    names = ("GRAD_FLAT", "H_FLAT", "S_FLAT", "R_FLAT") if backward else ("H_FLAT", "S_FLAT", "R_FLAT")
    kw.update(zip(names, flats))
    if backward:
        launch.weight_terms_per_element = bool(need[3] or need[4]) and WEIGHT_PER_ELEMENT in modes
        kw.update(_backward_kw(launch, op, need, operands, modes, p.samples, chunks,
                               (strides[-2][0], strides[-1][0]), dtype_kw),
                  WEIGHT_TERMS_PER_ELEMENT=launch.weight_terms_per_element)
    launch.kw = kw
    return launch


def _tile_blocks(channels, hw):
    """(BLOCK_P, BLOCK_C, num_warps) of the mixed-layout path: powers of two, about
    TILE_ELEMS elements, neither side starved (each operand's contiguous run is a whole row
    of the tile)."""
    bp0 = min(C.next_pow2(hw), 64)
    bc = min(C.next_pow2(channels), max(1, TILE_ELEMS // bp0))
    bp = min(C.next_pow2(hw), max(1, TILE_ELEMS // bc))
    return bp, bc, (4 if bp * bc <= 1024 else 8)


def _make_tile_launch(launch, backward, op, shape, ref_strides, operands, weights, need, dtype_kw):
    """The mixed-layout path (channels_last beside NCHW operands of one (B,C,H,W) shape, weights
    scalar or per-sample): fills `launch` and returns True, or returns False to leave the call
    to the flat path (one layout everywhere, other layouts, ranks or weight shapes)."""
    modes = launch.modes
    if op == OP_VALVE or len(shape) != 4 or WEIGHT_PER_ELEMENT in modes:
        return False
    samples, channels, hw = shape[0], shape[1], shape[2] * shape[3]
    if samples == 0 or channels < 2 or hw < 2 or channels * hw < MIN_SPLIT_INNER:
        return False
    ref = C.layout_4d(shape, ref_strides)
    layouts = [None if x is None else C.layout_4d(shape, x.stride()) for x in operands]
    if ref is None or any(x is not None and c is None for x, c in zip(operands, layouts)):
        return False
    if backward and layouts[1] != ref:  # dh is written at h's offsets
        return False
    if all(c is None or c == ref for c in layouts):
        return False  # one layout: the flat path is already coalesced
    bp, bc, warps = _tile_blocks(channels, hw)
    channel_tiles = C.cdiv(channels, bc)
    tiles = C.cdiv(hw, bp) * channel_tiles
    launch.tiled = True
    launch.weight_terms_per_element = False
    launch.grid = (samples * tiles,)
    sample_strides = [w.stride(0) if m == WEIGHT_PER_SAMPLE else 0 for m, w in zip(modes, weights)]
    launch.ints = (channels, hw, tiles, channel_tiles, *sample_strides)
    kw = dict(dtype_kw, ALPHA_MODE=modes[0], GATE_MODE=modes[1], SEED_INPUT_IS_HOST=operands[-1] is None,
              I64=samples * channels * hw + TILE_ELEMS >= C.I32_SAFE, INTERPRET=C.INTERPRET,
              BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
    channels_last = [c == "cl" for c in layouts]
    if backward:
        kw.update(_backward_kw(launch, op, need, operands, modes, samples, tiles, sample_strides, dtype_kw),
                  GRAD_CL=channels_last[0], H_CL=channels_last[1], S_CL=channels_last[2],
                  R_CL=channels_last[3])
    else:
        kw.update(OUT_CL=ref == "cl", H_CL=channels_last[0], S_CL=channels_last[1], R_CL=channels_last[2])
    launch.kw = kw
    return True


def _describe(t):
    return None if t is None else (t.stride(), t.dtype)


def _describe_weight(w):
    return None if w is None else (w.shape, w.stride(), w.dtype, w.device)


def _get_launch(backward, op, shape, ref_strides, operands, weights, device, host, promoted, m_dtype,
                need=None):
    key = (backward, op, shape, ref_strides, tuple(_describe(x) for x in operands),
           _describe_weight(weights[0]), _describe_weight(weights[1]), device, host, promoted, need,
           C.FORCE_VALUE_MODE)
    return C.cached(_launch_cache, key, lambda: _make_launch(
        backward, op, shape, ref_strides, operands, weights, device, host, promoted, m_dtype, need))


def _materialize(weights, shape, strides, device):
    """Weights of general shapes as full tensors in the iteration layout (fallback only)."""
    out = []
    for w in weights:
        per_sample = w is not None and w.dim() == len(shape) and w.shape[0] == shape[0] and all(
            d == 1 for d in w.shape[1:])
        if w is None or w.numel() == 1 or per_sample:
            out.append(w)
        else:
            out.append(_to_layout(w.to(device), shape, strides))
    return out


# ---------------------------------------------------------------------------- forward
def forward(op, out, h, s, r, alpha, gate, host, promoted, m_dtype=None):
    """Launch the forward kernel of `op` writing `out` (whose layout is the iteration's)."""
    if out.numel() == 0:
        return out
    device = h.device
    shape, strides = out.shape, out.stride()
    launch = _get_launch(False, op, shape, strides, (h, s, r), (alpha, gate), device, host, promoted, m_dtype)
    if launch.fallback:
        # more than 3 inner dims no stride pattern coalesces: copy into the iteration layout
        h, s, r = (None if x is None else _to_layout(x, shape, strides) for x in (h, s, r))
        alpha, gate = _materialize((alpha, gate), shape, strides, device)
        launch = _get_launch(False, op, shape, strides, (h, s, r), (alpha, gate), device, host, promoted, m_dtype)
    a = weight_arg(alpha, launch.modes[0], device)
    g = weight_arg(gate, launch.modes[1], device)
    kernel = _tile_forward_kernel if launch.tiled else _forward_kernel
    kernel[launch.grid](out, h, _or(s, h), _or(r, h), _or(a, h), _or(g, h), *launch.ints, **launch.kw)
    return out


# ---------------------------------------------------------------------------- backward
def _feature_grad_buffer(x: torch.Tensor, needed: bool):
    """(kernel operand, gradient buffer): the gradient shares the operand's strides, so a
    non-dense operand is first copied into the layout empty_like gives."""
    if C.is_dense(x):
        return x, (torch.empty_like(x) if needed else None)
    return torch.empty_like(x).copy_(x), (torch.empty_like(x) if needed else None)


def backward(op, grad, h, s, r, alpha, gate, need, host, promoted, m_dtype=None, original_weights=None):
    """Launch the backward of `op`; need = (dh, ds, dr, dalpha, dgate) flags. Returns the
    five gradients, None where not needed. `original_weights`: the (alpha, gate) the fallback
    materialized (their gradients are summed back to the original shapes)."""
    need_h, need_s, need_r, need_alpha, need_gate = need
    if grad.dtype != host:
        grad = grad.to(host)
    device = h.device
    shape = h.shape
    dh = torch.empty_like(h) if (need_h or not C.is_dense(h)) else None
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
    launch = _get_launch(True, op, shape, strides, (grad, h, s, r), (alpha, gate), device, host, promoted,
                         m_dtype, need)
    if launch.fallback:
        copies = [None if x is None else _to_layout(x, shape, strides) for x in (grad, h, s, r)]
        full_alpha, full_gate = _materialize((alpha, gate), shape, strides, device)
        grads = backward(op, *copies, full_alpha, full_gate, need, host, promoted, m_dtype,
                         original_weights=(user_alpha, user_gate))
        if ds is not None:
            ds.copy_(grads[1])
        if dr is not None:
            dr.copy_(grads[2])
        return (dh.copy_(grads[0]) if need_h else None), ds, dr, grads[3], grads[4]
    a = weight_arg(alpha, launch.modes[0], device)
    g = weight_arg(gate, launch.modes[1], device)
    weight_terms = partials = None
    if need_alpha or need_gate:
        if launch.weight_terms_per_element:
            weight_terms = torch.empty_strided(shape, strides, dtype=launch.partial_dtype, device=device)
        else:
            partials = torch.empty(launch.grid, dtype=launch.partial_dtype, device=device)
    if launch.tiled:
        _tile_backward_kernel[launch.grid](
            _or(dh, h), _or(ds, h), _or(dr, h), _or(partials, h),
            grad, h, _or(s, h), _or(r, h), _or(a, h), _or(g, h), *launch.ints, **launch.kw)
    else:
        _backward_kernel[launch.grid](
            _or(dh, h), _or(ds, h), _or(dr, h), _or(weight_terms, h), _or(partials, h),
            grad, h, _or(s, h), _or(r, h), _or(a, h), _or(g, h), *launch.ints, **launch.kw)
    da = dg = None
    if need_alpha or need_gate:
        if launch.weight_terms_per_element:
            da, dg = _weight_grads_from_elements(op, weight_terms, user_alpha, user_gate, need_alpha, need_gate,
                                                 host, promoted)
        else:
            da = torch.empty(user_alpha.shape, dtype=user_alpha.dtype, device=device) if need_alpha else None
            dg = torch.empty(user_gate.shape, dtype=user_gate.dtype, device=device) if need_gate else None
            _weight_grad_kernel[(1,)](partials, _or(da, partials), _or(dg, partials), _or(a, partials),
                                      _or(g, partials), *launch.weight_grad_ints, **launch.weight_grad_kw)
            if da is not None and da.device != user_alpha.device:
                da = da.to(user_alpha.device)
            if dg is not None and dg.device != user_gate.device:
                dg = dg.to(user_gate.device)
    return (dh if need_h else None), ds, dr, da, dg


def _in01(x):
    return (x >= 0) & (x <= 1)


def _weight_grads_from_elements(op, weight_terms, alpha, gate, need_alpha, need_gate, host, promoted):
    """Slow path for weights of general broadcast shapes: per-element terms summed to the
    weight's shape in float64 by torch (deterministic), then chained through the clamps."""
    device = weight_terms.device
    zero = torch.zeros((), dtype=torch.float64, device=device)

    def to_shape(x, w):
        return (x.sum_to_size(w.shape) if w.dim() else x.sum()).to(w.dtype).to(w.device)

    if op != OP_GATE:
        d = weight_terms.to(torch.float64)
        d = d.sum_to_size(alpha.shape) if alpha.dim() else d.sum()
        a = alpha.to(device)
        masked_on = a.to(host) if op == OP_MULTIPLY else a
        return torch.where(_in01(masked_on), d, zero).to(alpha.dtype).to(alpha.device), None
    eshape = validation.broadcast_shape(alpha.shape, gate.shape)
    de = weight_terms.to(torch.float64)
    de = de.sum_to_size(eshape) if len(eshape) else de.sum()
    a, g = alpha.to(device), gate.to(device)
    wd = torch.float64 if torch.float64 in (alpha.dtype, gate.dtype, host) else torch.float32
    ca, cg = a.to(wd).clamp(0, 1), g.to(wd).clamp(0, 1)
    dp = torch.where(_in01((ca * cg).to(promoted)), de, zero)
    da = to_shape(torch.where(_in01(a), dp * cg.double(), zero), alpha) if need_alpha else None
    dg = to_shape(torch.where(_in01(g), dp * ca.double(), zero), gate) if need_gate else None
    return da, dg


# ============================================================================ op bodies
# Forward: f(*inputs). Backward: f(grad, *inputs, need) with one need flag per input; returns
# one gradient per input, None where not needed.
def blend_add_forward(h, s, alpha):
    return forward(OP_ADD, torch.empty_like(h), h, s, None, alpha, None, h.dtype, h.dtype)


def blend_gate_forward(h, s, alpha, gate):
    return forward(OP_GATE, torch.empty_like(h), h, s, None, alpha, gate, h.dtype, C.result_type(alpha, gate))


def blend_multiply_forward(h, s, alpha, seed_input):
    return forward(OP_MULTIPLY, torch.empty_like(h), h, s, seed_input, alpha, None, h.dtype, h.dtype)


def ste_forward(h, s):
    return forward(OP_STE, torch.empty_like(h), h, s, None, None, None, h.dtype, h.dtype)


def valve_multiplier_forward(alpha, m):
    result = C.result_type(alpha, m)
    return forward(OP_VALVE, torch.empty_like(m, dtype=result), m, None, None, alpha, None, result, result,
                   m.dtype)


def blend_add_backward(grad, h, s, alpha, need):
    dh, ds, _, da, _ = backward(OP_ADD, grad, h, s, None, alpha, None,
                                (need[0], need[1], False, need[2], False), h.dtype, h.dtype)
    return dh, ds, da


def blend_gate_backward(grad, h, s, alpha, gate, need):
    dh, ds, _, da, dg = backward(OP_GATE, grad, h, s, None, alpha, gate,
                                 (need[0], need[1], False, need[2], need[3]), h.dtype, C.result_type(alpha, gate))
    return dh, ds, da, dg


def blend_multiply_backward(grad, h, s, alpha, seed_input, need):
    dh, ds, dr, da, _ = backward(OP_MULTIPLY, grad, h, s, seed_input, alpha, None,
                                 (need[0], need[1], seed_input is not None and need[3], need[2], False),
                                 h.dtype, h.dtype)
    return dh, ds, da, dr


def valve_multiplier_backward(grad, alpha, m, need):
    result = C.result_type(alpha, m)
    dm, _, _, da, _ = backward(OP_VALVE, grad, m, None, None, alpha, None,
                               (need[1], False, False, need[0], False), result, result, m.dtype)
    return da, dm
