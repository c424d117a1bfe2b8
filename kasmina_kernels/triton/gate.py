"""The gate family's gated pooling and fused gate network (the gate's effective alpha is an
elementwise op, `elementwise.py`).

gated_pool: the mean over (H, W) of a (B,C,H,W) tensor (NCHW, channels_last or any strides)
or over T of a (B,T,C) tensor, accumulated in float32 for half inputs (float64 for float32 and
float64 inputs), rounded once.

gate_network: sigmoid(W2 relu(W1 pool(x) + b1) + b2). For C <= FUSED_MAX_C one program per
sample pools its slice of x, runs both linear layers, ReLU and sigmoid, and writes one gate
value: one launch per call. Larger C pools in a separate launch first. The backward recomputes
the forward from x (nothing but the inputs is saved), writes dx in the same program, and
leaves per-sample terms that one more launch reduces, in a fixed order, into the weight
gradients. The MLP runs in the accumulation dtype and rounds once to x's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..validation import TOPOLOGIES
from . import _common as common
from ._common import load_float, store, to_float, to_index

FUSED_MAX_C = 512
# elements of a 2-D tile held per step (the interpreter: fewer, larger steps)
TILE = 65536 if common.INTERPRET else 4096


# ============================================================================ kernels
@triton.jit
def _position_offsets(positions, WIDTH, h_stride, w_stride, FLAT: tl.constexpr):
    if FLAT:
        return positions * w_stride
    else:
        return (positions // WIDTH) * h_stride + (positions % WIDTH) * w_stride


@triton.jit
def _compensated_add(sum_a, err_a, sum_b, err_b):
    """(sum_a + sum_b, its rounding error (Neumaier's TwoSum) plus both carried errors); a
    non-finite sum carries no error."""
    total = sum_a + sum_b
    err = tl.where(tl.abs(sum_a) >= tl.abs(sum_b), (sum_a - total) + sum_b, (sum_b - total) + sum_a)
    return total, err_a + err_b + tl.where(total - total == 0, err, 0.0)


@triton.jit
def _pool_slice(x_ptr, base, channels, channel_mask, POSITIONS, WIDTH, x_sc, x_sh, x_sw,
                FLAT: tl.constexpr, ACC_DTYPE: tl.constexpr, I64: tl.constexpr, INTERPRET: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Mean over the positions of `channels` of one sample, in ACC_DTYPE (NaN when there are
    none). A float64 x is summed with its rounding errors carried (as the CPU kernels' long
    double): the mean feeds the whole gate network, and a plain float64 sum of mixed-sign
    values can be several ulps off the mean."""
    COMPENSATED: tl.constexpr = x_ptr.dtype.element_ty == tl.float64
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC_DTYPE)
    err = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC_DTYPE)
    for l0 in range(0, POSITIONS, BLOCK_L):
        positions = to_index(l0 + tl.arange(0, BLOCK_L), I64)
        off = base + channels[:, None] * x_sc + _position_offsets(positions, WIDTH, x_sh, x_sw, FLAT)[None, :]
        mask = channel_mask[:, None] & (positions < POSITIONS)[None, :]
        value = load_float(x_ptr + off, mask, ACC_DTYPE, INTERPRET)
        if COMPENSATED:
            acc, err = _compensated_add(acc, err, value, 0.0)
        else:
            acc += value
    if COMPENSATED:
        total, total_err = tl.reduce((acc, err), 1, _compensated_add)
        return tl.where(total - total == 0, total + total_err, total) / POSITIONS
    return tl.sum(acc, axis=1) / POSITIONS


@triton.jit
def _spread_mean_grad(dx_ptr, base, channels, channel_mask, positions, mean_grad, POSITIONS, WIDTH,
                      dx_sc, dx_sh, dx_sw, FLAT: tl.constexpr, ACC_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx = mean_grad (one value per channel) at `positions` of one sample, rounded once."""
    off = base + channels[:, None] * dx_sc + _position_offsets(positions, WIDTH, dx_sh, dx_sw, FLAT)[None, :]
    value = mean_grad[:, None] + tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC_DTYPE)
    store(dx_ptr + off, value, channel_mask[:, None] & (positions < POSITIONS)[None, :], INTERPRET)


@triton.jit
def _pool_kernel(
    x_ptr, out_ptr, CHANNELS, POSITIONS, WIDTH, x_sb, x_sc, x_sh, x_sw, out_sb,
    FLAT: tl.constexpr, ACC_DTYPE: tl.constexpr, I64: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = to_index(tl.program_id(0), I64)
    channels = to_index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), I64)
    channel_mask = channels < CHANNELS
    mean = _pool_slice(x_ptr, b * x_sb, channels, channel_mask, POSITIONS, WIDTH, x_sc, x_sh, x_sw,
                       FLAT, ACC_DTYPE, I64, INTERPRET, BLOCK_C, BLOCK_L)
    store(out_ptr + b * out_sb + channels, mean, channel_mask, INTERPRET)


@triton.jit
def _pool_backward_kernel(
    grad_ptr, dx_ptr, CHANNELS, POSITIONS, WIDTH, CHANNEL_BLOCKS, POSITION_BLOCKS, grad_sb, grad_sc,
    dx_sb, dx_sc, dx_sh, dx_sw,
    FLAT: tl.constexpr, ACC_DTYPE: tl.constexpr, I64: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dx[b, c, l] = grad[b, c] / L, rounded once to dx's dtype. One program per (sample,
    channel block, position block), on a 1-D grid: a grid's second dimension stops at 65,535."""
    pid = to_index(tl.program_id(0), I64)
    sample_channels = pid // POSITION_BLOCKS
    b = sample_channels // CHANNEL_BLOCKS
    channels = (sample_channels - b * CHANNEL_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    positions = (pid - sample_channels * POSITION_BLOCKS) * BLOCK_L + tl.arange(0, BLOCK_L)
    channel_mask = channels < CHANNELS
    grad = tl.load(grad_ptr + b * grad_sb + channels * grad_sc, mask=channel_mask, other=0)
    _spread_mean_grad(dx_ptr, b * dx_sb, channels, channel_mask, positions,
                      to_float(grad, ACC_DTYPE, INTERPRET) / POSITIONS, POSITIONS, WIDTH, dx_sc, dx_sh, dx_sw,
                      FLAT, ACC_DTYPE, INTERPRET, BLOCK_C, BLOCK_L)


@triton.jit
def _hidden_chunk(w1_ptr, b1_ptr, w2_ptr, pooled, channels, channel_mask, k0, HIDDEN, w1_s0, w1_s1, b1_s0, w2_s1,
                  ACC_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows k0..k0+BLOCK_K of the first layer: (W1 tile, z1, w2 chunk, rows, row mask)."""
    rows = k0 + tl.arange(0, BLOCK_K)
    row_mask = rows < HIDDEN
    w1_mask = row_mask[:, None] & channel_mask[None, :]
    w1 = load_float(w1_ptr + rows[:, None] * w1_s0 + channels[None, :] * w1_s1, w1_mask, ACC_DTYPE, INTERPRET)
    b1 = load_float(b1_ptr + rows * b1_s0, row_mask, ACC_DTYPE, INTERPRET)
    z1 = tl.sum(w1 * pooled[None, :], axis=1) + b1
    w2 = load_float(w2_ptr + rows * w2_s1, row_mask, ACC_DTYPE, INTERPRET)
    return w1, z1, w2, rows, row_mask


@triton.jit
def _gate_network_kernel(
    x_ptr, pooled_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gate_ptr, grad_ptr, dx_ptr, scratch_ptr, dpooled_ptr,
    CHANNELS, POSITIONS, WIDTH, HIDDEN, x_sb, x_sc, x_sh, x_sw, w1_s0, w1_s1, b1_s0, w2_s1,
    dx_sb, dx_sc, dx_sh, dx_sw, A1_OFF, DZ1_OFF, DZ2_OFF, grad_sb,
    BACKWARD: tl.constexpr, FROM_POOLED: tl.constexpr, FLAT: tl.constexpr, DX_FLAT: tl.constexpr, NEED_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr, I64: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One sample. Forward: its gate value. Backward: recompute the forward, then d(pooled)
    (written as dx, or to dpooled_ptr; None where not wanted) and the per-sample terms of the
    weight gradients (pooled, relu(z1), dz1, dz2) into scratch. Sums run in a fixed order."""
    b = to_index(tl.program_id(0), I64)
    channels = to_index(tl.arange(0, BLOCK_C), I64)
    channel_mask = channels < CHANNELS
    if FROM_POOLED:
        pooled = tl.load(pooled_ptr + b * CHANNELS + channels, mask=channel_mask, other=0)
    else:
        pooled = _pool_slice(x_ptr, b * x_sb, channels, channel_mask, POSITIONS, WIDTH, x_sc, x_sh, x_sw,
                             FLAT, ACC_DTYPE, I64, INTERPRET, BLOCK_C, BLOCK_L)
    pooled = tl.where(channel_mask, pooled, 0.0)
    if NEED_W & (not FROM_POOLED):
        tl.store(scratch_ptr + b * CHANNELS + channels, pooled, mask=channel_mask)
    z2 = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for k0 in range(0, HIDDEN, BLOCK_K):
        w1, z1, w2, rows, row_mask = _hidden_chunk(w1_ptr, b1_ptr, w2_ptr, pooled, channels, channel_mask, k0,
                                                   HIDDEN, w1_s0, w1_s1, b1_s0, w2_s1, ACC_DTYPE, INTERPRET, BLOCK_K)
        z2 += tl.where(row_mask, tl.where(z1 < 0, 0.0, z1) * w2, 0.0)  # relu keeping NaN
    y = tl.sigmoid(tl.sum(z2, axis=0) + to_float(tl.load(b2_ptr), ACC_DTYPE, INTERPRET))
    if BACKWARD:
        dz2 = to_float(tl.load(grad_ptr + b * grad_sb), ACC_DTYPE, INTERPRET) * y * (1.0 - y)
        if NEED_W:
            tl.store(scratch_ptr + DZ2_OFF + b, dz2)
        dpooled = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
        for k0 in range(0, HIDDEN, BLOCK_K):
            w1, z1, w2, rows, row_mask = _hidden_chunk(w1_ptr, b1_ptr, w2_ptr, pooled, channels, channel_mask, k0,
                                                       HIDDEN, w1_s0, w1_s1, b1_s0, w2_s1, ACC_DTYPE, INTERPRET,
                                                       BLOCK_K)
            dz1 = tl.where(z1 <= 0, 0.0, dz2 * w2)  # threshold_backward: a NaN z1 passes the gradient
            if NEED_W:
                tl.store(scratch_ptr + A1_OFF + b * HIDDEN + rows, tl.where(z1 < 0, 0.0, z1), mask=row_mask)
                tl.store(scratch_ptr + DZ1_OFF + b * HIDDEN + rows, dz1, mask=row_mask)
            dpooled += tl.sum(w1 * dz1[:, None], axis=0)
        if dpooled_ptr is not None:
            tl.store(dpooled_ptr + b * CHANNELS + channels, dpooled, mask=channel_mask)
        if dx_ptr is not None:
            mean_grad = dpooled / POSITIONS
            for l0 in range(0, POSITIONS, BLOCK_L):
                positions = to_index(l0 + tl.arange(0, BLOCK_L), I64)
                _spread_mean_grad(dx_ptr, b * dx_sb, channels, channel_mask, positions, mean_grad, POSITIONS, WIDTH,
                                  dx_sc, dx_sh, dx_sw, DX_FLAT, ACC_DTYPE, INTERPRET, BLOCK_C, BLOCK_L)
    else:
        store(gate_ptr + b, y, None, INTERPRET)


@triton.jit
def _gate_weight_grad_kernel(
    scratch_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, SAMPLES, CHANNELS, HIDDEN, A1_OFF, DZ1_OFF, DZ2_OFF,
    ACC_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dW1 = dz1^T pooled, db1 = sum dz1, dW2 = dz2^T relu(z1), db2 = sum dz2: each program
    owns a (rows, channels) tile of dW1 and walks the batch in a fixed order."""
    row_block = tl.program_id(0)
    channel_block = tl.program_id(1)
    rows = row_block * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < HIDDEN
    channels = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < CHANNELS
    acc_w1 = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC_DTYPE)
    acc_b1 = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    acc_w2 = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    acc_b2 = tl.zeros([BLOCK_B], dtype=ACC_DTYPE)
    for b0 in range(0, SAMPLES, BLOCK_B):
        samples = b0 + tl.arange(0, BLOCK_B)
        sample_mask = samples < SAMPLES
        sample_row_mask = sample_mask[:, None] & row_mask[None, :]
        dz1 = tl.load(scratch_ptr + DZ1_OFF + samples[:, None] * HIDDEN + rows[None, :], mask=sample_row_mask, other=0)
        pooled = tl.load(scratch_ptr + samples[:, None] * CHANNELS + channels[None, :],
                         mask=sample_mask[:, None] & channel_mask[None, :], other=0)
        acc_w1 += tl.sum(dz1[:, :, None] * pooled[:, None, :], axis=0)
        a1 = tl.load(scratch_ptr + A1_OFF + samples[:, None] * HIDDEN + rows[None, :], mask=sample_row_mask, other=0)
        dz2 = tl.load(scratch_ptr + DZ2_OFF + samples, mask=sample_mask, other=0)
        acc_b1 += tl.sum(dz1, axis=0)
        acc_w2 += tl.sum(a1 * dz2[:, None], axis=0)
        acc_b2 += dz2
    # a gradient nobody needs has no buffer (None)
    if dw1_ptr is not None:
        store(dw1_ptr + rows[:, None] * CHANNELS + channels[None, :], acc_w1,
              row_mask[:, None] & channel_mask[None, :], INTERPRET)
    if channel_block == 0:
        if db1_ptr is not None:
            store(db1_ptr + rows, acc_b1, row_mask, INTERPRET)
        if dw2_ptr is not None:
            store(dw2_ptr + rows, acc_w2, row_mask, INTERPRET)
        if db2_ptr is not None:
            if row_block == 0:
                store(db2_ptr, tl.sum(acc_b2, axis=0), None, INTERPRET)


# ============================================================================ pooling, gate network
class _View:
    """x as (samples, channels, positions = H*W) with strides (sample, channel, row, column);
    a transformer's (B,T,C) is (B, C, T). flat: position l is at l * the column stride."""

    def __init__(self, shape, strides, topology):
        if topology == "cnn":
            samples, channels, height, width = shape
            sb, sc, sh, sw = strides
            if height == 1:
                sh = sw * width
            if width == 1:
                sw = sh
        else:
            samples, height, channels = shape
            sb, sh, sc = strides
            width, sw = 1, sh
        self.samples, self.channels, self.positions, self.width = samples, channels, height * width, width
        self.strides = (sb, sc, sh, sw)
        self.flat = width == 1 or sh == width * sw


def _i64(shape, strides) -> bool:
    span = 1 + sum((s - 1) * st for s, st in zip(shape, strides) if s > 0)
    return max(span, math.prod(shape)) + 2 * common.MAX_BLOCK >= common.I32_SAFE


def _acc_dtypes(dtype):
    """Accumulation/MLP dtype: float32 for half inputs; float64 for float32 and float64 inputs,
    so sums and dot products stay well inside the 2x-eager error budget (rule 2 of
    docs/semantics.md#equivalence) at no cost on these memory-bound kernels."""
    if dtype in (torch.float32, torch.float64):
        return tl.float64, torch.float64
    return tl.float32, torch.float32


_cache: dict = {}


def _pool_cfg(shape, strides, dtype, topology, backward, out_strides):
    """(grid, ints, kw) of the pooling kernel over x (means land at out[b * out_strides[0] +
    c]), or of its backward writing dx of `strides` from a gradient of `out_strides`."""
    def make():
        v = _View(shape, strides, topology)
        if v.strides[1] == 1 and v.channels > 1:  # channels contiguous
            block_c = min(triton.next_power_of_2(v.channels), 128)
            block_l = max(1, min(triton.next_power_of_2(v.positions), TILE // block_c))
        else:
            block_l = min(triton.next_power_of_2(max(v.positions, 1)), 1024)
            block_c = max(1, min(triton.next_power_of_2(v.channels), TILE // block_l))
        kw = dict(FLAT=v.flat, ACC_DTYPE=_acc_dtypes(dtype)[0], I64=_i64(shape, strides), **common.LAUNCH_OPTIONS,
                  BLOCK_C=block_c, BLOCK_L=block_l, num_warps=8 if block_c * block_l >= 2048 else 4)
        channel_blocks = triton.cdiv(v.channels, block_c)
        if not backward:
            return (v.samples, channel_blocks), (v.channels, v.positions, v.width, *v.strides, out_strides[0]), kw
        position_blocks = triton.cdiv(v.positions, block_l)
        return ((v.samples * channel_blocks * position_blocks,),
                (v.channels, v.positions, v.width, channel_blocks, position_blocks, *out_strides[:2], *v.strides),
                kw)
    return common.cached(_cache, ("pool", backward, shape, strides, dtype, topology, out_strides), make)


def gated_pool_forward(x, topology):
    out = x.new_empty((x.shape[0], TOPOLOGIES[topology].channels(x)))
    if out.numel() > 0:
        grid, ints, kw = _pool_cfg(x.shape, x.stride(), x.dtype, topology, False, out.stride())
        _pool_kernel[grid](x, out, *ints, **kw)
    return out


def gated_pool_backward(grad, x, topology, need):
    """(dx,): x's is the only gradient."""
    dx = torch.empty_like(x)
    if dx.numel() > 0:
        grid, ints, kw = _pool_cfg(x.shape, dx.stride(), x.dtype, topology, True, grad.stride())
        _pool_backward_kernel[grid](grad, dx, *ints, **kw)
    return (dx,)


def _gate_cfg(x, w1, b1, w2, topology, dx_strides=None, need=None):
    """The gate network's launch configuration: the forward's when need is None, else the
    backward's for need = (dx, dw1, db1, dw2, db2) flags."""
    key = ("gate", need, x.shape, x.stride(), x.dtype, w1.shape, w1.stride(), b1.stride(),
           w2.stride(), topology, dx_strides)

    def make():
        v = _View(x.shape, x.stride(), topology)
        hidden = w1.shape[0]
        acc_dtype, acc_t = _acc_dtypes(x.dtype)
        block_c = max(16, triton.next_power_of_2(v.channels))
        block_l = max(1, min(triton.next_power_of_2(max(v.positions, 1)), TILE // block_c))
        block_k = max(1, min(triton.next_power_of_2(max(hidden, 1)), TILE // block_c))
        from_pooled = v.channels > FUSED_MAX_C
        need_w = need is not None and any(need[1:])
        # the per-sample terms of the weight gradients in scratch, after the pooled means
        a1_off = v.samples * v.channels
        dz1_off = a1_off + v.samples * hidden
        dz2_off = dz1_off + v.samples * hidden
        dx_view = None if dx_strides is None else _View(x.shape, dx_strides, topology)
        # what the forward never reads is None: constexprs, no launch arguments
        ints = (v.channels, v.positions, v.width, hidden, *v.strides, w1.stride(0),
                w1.stride(1), b1.stride(0), w2.stride(1),
                *((None,) * 4 if dx_view is None else dx_view.strides),
                *((None,) * 3 if need is None else (a1_off, dz1_off, dz2_off)))
        kw = dict(BACKWARD=need is not None, FROM_POOLED=from_pooled, FLAT=v.flat,
                  DX_FLAT=dx_view is None or dx_view.flat, NEED_W=need_w, ACC_DTYPE=acc_dtype,
                  I64=_i64(x.shape, x.stride()), **common.LAUNCH_OPTIONS, BLOCK_C=block_c,
                  BLOCK_L=block_l, BLOCK_K=block_k, num_warps=8 if block_c >= 256 else 4)
        scratch = dz2_off + v.samples if (need_w or from_pooled) else 0
        cfg = {"view": v, "acc_t": acc_t, "from_pooled": from_pooled, "need_w": need_w,
               "ints": ints, "kw": kw, "scratch": scratch}
        if from_pooled:  # pooled means in a launch of their own, into a float buffer
            cfg["pool"] = _pool_cfg(x.shape, x.stride(), x.dtype, topology, False, (v.channels,))
            if dx_view is not None:
                cfg["dx_pool"] = _pool_cfg(x.shape, dx_strides, x.dtype, topology, True, (v.channels, 1))
        weight_block_k = min(triton.next_power_of_2(max(hidden, 1)), 16)
        weight_block_c = min(max(16, triton.next_power_of_2(v.channels)), 64)
        cfg["weight_grad"] = (
            (triton.cdiv(hidden, weight_block_k), triton.cdiv(v.channels, weight_block_c)),
            (v.samples, v.channels, hidden, a1_off, dz1_off, dz2_off),
            dict(ACC_DTYPE=acc_dtype, **common.LAUNCH_OPTIONS, BLOCK_B=8, BLOCK_K=weight_block_k,
                 BLOCK_C=weight_block_c, num_warps=4))
        return cfg

    return common.cached(_cache, key, make)


def gate_network_forward(x, w1, b1, w2, b2, topology):
    samples = x.shape[0]
    y = x.new_empty(TOPOLOGIES[topology].per_sample(samples))
    if samples == 0:
        return y
    cfg = _gate_cfg(x, w1, b1, w2, topology)
    pooled = None
    if cfg["from_pooled"]:
        pooled = torch.empty((samples, cfg["view"].channels), dtype=cfg["acc_t"], device=x.device)
        grid, ints, kw = cfg["pool"]
        _pool_kernel[grid](x, pooled, *ints, **kw)
    _gate_network_kernel[(samples,)](x, pooled, w1, b1, w2, b2, y, None, None, None, None,
                                     *cfg["ints"], None, **cfg["kw"])
    return y


def gate_network_backward(grad, x, w1, b1, w2, b2, topology, need):
    """(dx, dw1, db1, dw2, db2), None where not needed."""
    samples = x.shape[0]
    dx = torch.empty_like(x) if need[0] else None
    new = torch.zeros if samples == 0 else torch.empty  # no samples: zero weight gradients
    weight_grads = [new(w.shape, dtype=w.dtype, device=w.device) if n else None
                    for w, n in zip((w1, b1, w2, b2), need[1:])]
    if samples == 0:
        return (dx, *weight_grads)
    need = tuple(bool(n) for n in need)
    cfg = _gate_cfg(x, w1, b1, w2, topology, None if dx is None else dx.stride(), need)
    scratch = torch.empty((cfg["scratch"],), dtype=cfg["acc_t"], device=x.device) if cfg["scratch"] else None
    dpooled = None
    if cfg["from_pooled"]:
        grid, ints, kw = cfg["pool"]
        _pool_kernel[grid](x, scratch, *ints, **kw)  # pooled means land in scratch
        if dx is not None:
            dpooled = torch.empty((samples, cfg["view"].channels), dtype=cfg["acc_t"], device=x.device)
    _gate_network_kernel[(samples,)](
        x, scratch, w1, b1, w2, b2, None, grad, None if cfg["from_pooled"] else dx, scratch, dpooled,
        *cfg["ints"], grad.stride(0), **cfg["kw"])
    if dpooled is not None and dx.numel() > 0:
        grid, ints, kw = cfg["dx_pool"]
        _pool_backward_kernel[grid](dpooled, dx, *ints, **kw)
    if cfg["need_w"]:
        grid, ints, kw = cfg["weight_grad"]
        _gate_weight_grad_kernel[grid](scratch, *weight_grads, *ints, **kw)
    return (dx, *weight_grads)
