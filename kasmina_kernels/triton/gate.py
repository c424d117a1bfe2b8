"""The gate family: the gate's effective alpha clamp01(clamp01(alpha) * clamp01(gate)) (its
math is the lerp family's, `lerp.py`), gated pooling and the fused gate network.

gate_effective_alpha: one elementwise pass over the broadcast shape; its backward writes
float64 per-element terms that torch sums to each weight's shape (deterministic).

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

import torch
import triton
import triton.language as tl

from .. import validation
from . import _common as C
from ._common import coords, load_weight, sigmoid, store, store_scalar, to_float
from .lerp import effective_alpha, effective_alpha_backward

FUSED_MAX_C = 512
# elements of a 2-D tile held per step (the interpreter: fewer, larger steps)
TILE = 65536 if C.INTERPRET else 4096


# ============================================================================ kernels

@triton.jit
def _effective_alpha_kernel(
    out_ptr, alpha_ptr, gate_ptr, N, D1, D2,
    alpha_s0, alpha_s1, alpha_s2, gate_s0, gate_s1, gate_s2,
    NDIM: tl.constexpr, ALPHA_MODE: tl.constexpr, GATE_MODE: tl.constexpr,
    PROMOTED_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N
    i0, i1, i2 = coords(j, D1, D2, NDIM)
    alpha = load_weight(alpha_ptr, 0, i0 * alpha_s0 + i1 * alpha_s1 + i2 * alpha_s2, mask, ALPHA_MODE, 0,
                        WEIGHT_DTYPE, INTERPRET)
    gate = load_weight(gate_ptr, 0, i0 * gate_s0 + i1 * gate_s1 + i2 * gate_s2, mask, GATE_MODE, 0,
                       WEIGHT_DTYPE, INTERPRET)
    e = effective_alpha(alpha, gate, PROMOTED_DTYPE, INTERPRET)
    store(out_ptr + j, e + tl.zeros([BLOCK], dtype=e.dtype), mask, INTERPRET)


@triton.jit
def _effective_alpha_backward_kernel(
    dalpha_ptr, dgate_ptr, grad_ptr, alpha_ptr, gate_ptr, N, D1, D2,
    grad_s0, grad_s1, grad_s2, alpha_s0, alpha_s1, alpha_s2, gate_s0, gate_s1, gate_s2,
    NDIM: tl.constexpr, ALPHA_MODE: tl.constexpr, GATE_MODE: tl.constexpr,
    PROMOTED_DTYPE: tl.constexpr, WEIGHT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-element d(alpha) and d(gate) terms in float64 (summed to each shape on the host)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N
    i0, i1, i2 = coords(j, D1, D2, NDIM)
    grad = to_float(tl.load(grad_ptr + i0 * grad_s0 + i1 * grad_s1 + i2 * grad_s2, mask=mask, other=0),
                    tl.float64, INTERPRET)
    alpha = load_weight(alpha_ptr, 0, i0 * alpha_s0 + i1 * alpha_s1 + i2 * alpha_s2, mask, ALPHA_MODE, 0,
                        WEIGHT_DTYPE, INTERPRET)
    gate = load_weight(gate_ptr, 0, i0 * gate_s0 + i1 * gate_s1 + i2 * gate_s2, mask, GATE_MODE, 0,
                       WEIGHT_DTYPE, INTERPRET)
    d_alpha, d_gate = effective_alpha_backward(grad, alpha, gate, PROMOTED_DTYPE, INTERPRET)
    tl.store(dalpha_ptr + j, d_alpha, mask=mask)
    tl.store(dgate_ptr + j, d_gate, mask=mask)

@triton.jit
def _spatial_offsets(ll, W, sh, sw, FLAT_L: tl.constexpr):
    if FLAT_L:
        return ll * sw
    else:
        return (ll // W) * sh + (ll % W) * sw


@triton.jit
def _pool_slice(x_ptr, base, cc, cm, L, W, sxc, sxh, sxw,
                FLAT_L: tl.constexpr, ACC_DTYPE: tl.constexpr, I64: tl.constexpr, INTERPRET: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Mean over the L positions of channels cc of one sample, in ACC_DTYPE (NaN when L == 0)."""
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC_DTYPE)
    for l0 in range(0, L, BLOCK_L):
        ll = l0 + tl.arange(0, BLOCK_L)
        if I64:
            ll = ll.to(tl.int64)
        lm = ll < L
        off = base + cc[:, None] * sxc + _spatial_offsets(ll, W, sxh, sxw, FLAT_L)[None, :]
        x = tl.load(x_ptr + off, mask=cm[:, None] & lm[None, :], other=0)
        acc += to_float(x, ACC_DTYPE, INTERPRET)
    return tl.sum(acc, axis=1) / L


@triton.jit
def _pool_kernel(
    x_ptr, out_ptr, C, L, W, sxb, sxc, sxh, sxw, out_sb,
    FLAT_L: tl.constexpr, ACC_DTYPE: tl.constexpr, I64: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0)
    if I64:
        b = b.to(tl.int64)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        cc = cc.to(tl.int64)
    cm = cc < C
    mean = _pool_slice(x_ptr, b * sxb, cc, cm, L, W, sxc, sxh, sxw,
                       FLAT_L, ACC_DTYPE, I64, INTERPRET, BLOCK_C, BLOCK_L)
    store(out_ptr + b * out_sb + cc, mean, cm, INTERPRET)


@triton.jit
def _pool_bwd_kernel(
    g_ptr, dx_ptr, C, L, W, CB, sgb, sgc, sdb, sdc, sdh, sdw,
    FLAT_L: tl.constexpr, ACC_DTYPE: tl.constexpr, I64: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dx[b, c, l] = g[b, c] / L, rounded once to dx's dtype."""
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    b = pid // CB
    cc = (pid - b * CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    ll = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    if I64:
        ll = ll.to(tl.int64)
    cm = cc < C
    lm = ll < L
    g = to_float(tl.load(g_ptr + b * sgb + cc * sgc, mask=cm, other=0), ACC_DTYPE, INTERPRET) / L
    off = b * sdb + cc[:, None] * sdc + _spatial_offsets(ll, W, sdh, sdw, FLAT_L)[None, :]
    val = g[:, None] + tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC_DTYPE)
    store(dx_ptr + off, val, cm[:, None] & lm[None, :], INTERPRET)


@triton.jit
def _hidden_chunk(w1_ptr, b1_ptr, w2_ptr, pooled, cc, cm, k0, HIDDEN, sw1k, sw1c, sb1, sw2,
                  ACC_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows k0..k0+BLOCK_K of the first layer: (W1 tile, z1, w2 chunk, row mask)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    km = kk < HIDDEN
    w1 = to_float(tl.load(w1_ptr + kk[:, None] * sw1k + cc[None, :] * sw1c,
                          mask=km[:, None] & cm[None, :], other=0), ACC_DTYPE, INTERPRET)
    z1 = tl.sum(w1 * pooled[None, :], axis=1) + to_float(tl.load(b1_ptr + kk * sb1, mask=km, other=0), ACC_DTYPE, INTERPRET)
    w2 = to_float(tl.load(w2_ptr + kk * sw2, mask=km, other=0), ACC_DTYPE, INTERPRET)
    return w1, z1, w2, kk, km


@triton.jit
def _gate_out(w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled, cc, cm, HIDDEN, sw1k, sw1c, sb1, sw2,
              ACC_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_K: tl.constexpr):
    """z2 = w2 . relu(W1 pooled + b1) + b2 for one sample (fixed-order sums)."""
    zacc = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for k0 in range(0, HIDDEN, BLOCK_K):
        w1, z1, w2, kk, km = _hidden_chunk(w1_ptr, b1_ptr, w2_ptr, pooled, cc, cm, k0, HIDDEN,
                                           sw1k, sw1c, sb1, sw2, ACC_DTYPE, INTERPRET, BLOCK_K)
        a1 = tl.where(z1 < 0, 0.0, z1)  # relu keeping NaN
        zacc += tl.where(km, a1 * w2, 0.0)
    return tl.sum(zacc, axis=0) + to_float(tl.load(b2_ptr), ACC_DTYPE, INTERPRET)


@triton.jit
def _sample_pooled(x_ptr, buf_ptr, b, cc, cm, C, L, W, sxb, sxc, sxh, sxw,
                   FROM_BUF: tl.constexpr, FLAT_L: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   I64: tl.constexpr, INTERPRET: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    if FROM_BUF:
        pooled = tl.load(buf_ptr + b * C + cc, mask=cm, other=0)
    else:
        pooled = _pool_slice(x_ptr, b * sxb, cc, cm, L, W, sxc, sxh, sxw,
                             FLAT_L, ACC_DTYPE, I64, INTERPRET, BLOCK_C, BLOCK_L)
    return tl.where(cm, pooled, 0.0)


@triton.jit
def _gate_fwd_kernel(
    x_ptr, buf_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr,
    C, L, W, HIDDEN, sxb, sxc, sxh, sxw, sw1k, sw1c, sb1, sw2,
    FROM_BUF: tl.constexpr, FLAT_L: tl.constexpr, ACC_DTYPE: tl.constexpr, I64: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    if I64:
        b = b.to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    if I64:
        cc = cc.to(tl.int64)
    cm = cc < C
    pooled = _sample_pooled(x_ptr, buf_ptr, b, cc, cm, C, L, W, sxb, sxc, sxh, sxw,
                            FROM_BUF, FLAT_L, ACC_DTYPE, I64, INTERPRET, BLOCK_C, BLOCK_L)
    z2 = _gate_out(w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled, cc, cm, HIDDEN, sw1k, sw1c, sb1, sw2,
                   ACC_DTYPE, INTERPRET, BLOCK_K)
    store_scalar(y_ptr + b, sigmoid(z2), INTERPRET)


@triton.jit
def _gate_bwd_kernel(
    x_ptr, buf_ptr, gy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dx_ptr, scr_ptr, dp_ptr,
    C, L, W, HIDDEN, sxb, sxc, sxh, sxw, sw1k, sw1c, sb1, sw2, sgy,
    sdb, sdc, sdh, sdw, A1_OFF, DZ1_OFF, DZ2_OFF,
    FROM_BUF: tl.constexpr, FLAT_L: tl.constexpr, DX_FLAT_L: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DP: tl.constexpr, NEED_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr, I64: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One sample: recompute the forward, then d(pooled) (written as dx, or to dp_ptr) and the
    per-sample terms of the weight gradients (pooled, relu(z1), dz1, dz2) into scratch."""
    b = tl.program_id(0)
    if I64:
        b = b.to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    if I64:
        cc = cc.to(tl.int64)
    cm = cc < C
    pooled = _sample_pooled(x_ptr, buf_ptr, b, cc, cm, C, L, W, sxb, sxc, sxh, sxw,
                            FROM_BUF, FLAT_L, ACC_DTYPE, I64, INTERPRET, BLOCK_C, BLOCK_L)
    if NEED_W:
        if not FROM_BUF:
            tl.store(scr_ptr + b * C + cc, pooled, mask=cm)
    z2 = _gate_out(w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled, cc, cm, HIDDEN, sw1k, sw1c, sb1, sw2,
                   ACC_DTYPE, INTERPRET, BLOCK_K)
    y = sigmoid(z2)
    gy = to_float(tl.load(gy_ptr + b * sgy), ACC_DTYPE, INTERPRET)
    dz2 = gy * y * (1.0 - y)
    if NEED_W:
        tl.store(scr_ptr + DZ2_OFF + b, dz2)
    dp = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for k0 in range(0, HIDDEN, BLOCK_K):
        w1, z1, w2, kk, km = _hidden_chunk(w1_ptr, b1_ptr, w2_ptr, pooled, cc, cm, k0, HIDDEN,
                                           sw1k, sw1c, sb1, sw2, ACC_DTYPE, INTERPRET, BLOCK_K)
        dz1 = tl.where(z1 > 0, dz2 * w2, 0.0)
        if NEED_W:
            tl.store(scr_ptr + A1_OFF + b * HIDDEN + kk, tl.where(z1 < 0, 0.0, z1), mask=km)
            tl.store(scr_ptr + DZ1_OFF + b * HIDDEN + kk, dz1, mask=km)
        dp += tl.sum(w1 * dz1[:, None], axis=0)
    if WRITE_DP:
        tl.store(dp_ptr + b * C + cc, dp, mask=cm)
    if WRITE_DX:
        g = dp / L
        for l0 in range(0, L, BLOCK_L):
            ll = l0 + tl.arange(0, BLOCK_L)
            if I64:
                ll = ll.to(tl.int64)
            lm = ll < L
            off = b * sdb + cc[:, None] * sdc + _spatial_offsets(ll, W, sdh, sdw, DX_FLAT_L)[None, :]
            val = g[:, None] + tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC_DTYPE)
            store(dx_ptr + off, val, cm[:, None] & lm[None, :], INTERPRET)


@triton.jit
def _gate_wgrad_kernel(
    scr_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, B, C, HIDDEN, A1_OFF, DZ1_OFF, DZ2_OFF,
    ACC_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CC: tl.constexpr,
):
    """dW1 = dz1^T pooled, db1 = sum dz1, dW2 = dz2^T relu(z1), db2 = sum dz2: each program
    owns a (rows, cols) tile of dW1 and walks the batch in a fixed order."""
    pk = tl.program_id(0)
    pc = tl.program_id(1)
    kk = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    km = kk < HIDDEN
    cc = pc * BLOCK_CC + tl.arange(0, BLOCK_CC)
    cm = cc < C
    acc = tl.zeros([BLOCK_K, BLOCK_CC], dtype=ACC_DTYPE)
    acc_b1 = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    acc_w2 = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    acc_b2 = tl.zeros([BLOCK_B], dtype=ACC_DTYPE)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        bm = bb < B
        m_bk = bm[:, None] & km[None, :]
        dz1 = tl.load(scr_ptr + DZ1_OFF + bb[:, None] * HIDDEN + kk[None, :], mask=m_bk, other=0)
        pooled = tl.load(scr_ptr + bb[:, None] * C + cc[None, :], mask=bm[:, None] & cm[None, :], other=0)
        acc += tl.sum(dz1[:, :, None] * pooled[:, None, :], axis=0)
        a1 = tl.load(scr_ptr + A1_OFF + bb[:, None] * HIDDEN + kk[None, :], mask=m_bk, other=0)
        dz2 = tl.load(scr_ptr + DZ2_OFF + bb, mask=bm, other=0)
        acc_b1 += tl.sum(dz1, axis=0)
        acc_w2 += tl.sum(a1 * dz2[:, None], axis=0)
        acc_b2 += dz2
    store(dw1_ptr + kk[:, None] * C + cc[None, :], acc, km[:, None] & cm[None, :], INTERPRET)
    if pc == 0:
        store(db1_ptr + kk, acc_b1, km, INTERPRET)
        store(dw2_ptr + kk, acc_w2, km, INTERPRET)
        if pk == 0:
            store_scalar(db2_ptr, tl.sum(acc_b2, axis=0), INTERPRET)


# ============================================================================ host side
class _View:
    """x as (B, C, L = H*W) with strides; a transformer's (B,T,C) is (B, C, T)."""

    __slots__ = ("B", "C", "L", "W", "sb", "sc", "sh", "sw", "flat")


def _view(shape, strides, topology):
    v = _View()
    if topology == "cnn":
        B, Cc, H, W = shape
        sb, sc, sh, sw = strides
        if H == 1:
            sh = sw * W
        if W == 1:
            sw = sh
            W = 1
    else:
        B, T, Cc = shape
        sb, sh, sc = strides
        H, W, sw = T, 1, sh
    v.B, v.C, v.L, v.W, v.sb, v.sc, v.sh, v.sw = B, Cc, H * W, W, sb, sc, sh, sw
    v.flat = W == 1 or sh == W * sw
    return v


def _i64(shape, strides) -> bool:
    span = 1 + sum((s - 1) * st for s, st in zip(shape, strides) if s > 0)
    n = 1
    for s in shape:
        n *= s
    return max(span, n) + 2 * C.MAX_BLOCK >= C.I32_SAFE


def _acc_dtypes(dtype):
    """Accumulation/MLP dtype: float32 for half inputs; float64 for float32 and float64 inputs,
    so sums and dot products stay well inside the 2x-eager error budget (rule 2 of docs/semantics.md#equivalence) at no
    cost on these memory-bound kernels."""
    if dtype in (torch.float32, torch.float64):
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _pool_blocks(v: _View):
    if v.sc == 1 and v.C > 1:
        bc = min(C.next_pow2(v.C), 128)
        bl = max(1, min(C.next_pow2(v.L), TILE // bc))
    else:
        bl = min(C.next_pow2(v.L), 1024)
        bc = max(1, min(C.next_pow2(v.C), TILE // bl))
    return bc, bl, (8 if bc * bl >= 2048 else 4)


def _gate_blocks(Cc, L, hidden):
    bc = max(16, C.next_pow2(Cc))
    bl = max(1, min(C.next_pow2(max(L, 1)), TILE // bc))
    bk = max(1, min(C.next_pow2(hidden), TILE // bc))
    return bc, bl, bk, (8 if bc >= 256 else 4)


_cache: dict = {}


def _pool_cfg(shape, strides, dtype, topology, out_sb):
    """(grid, ints, kw) of the pooling kernel over x (means land at out[b * out_sb + c])."""
    def make():
        v = _view(shape, strides, topology)
        bc, bl, warps = _pool_blocks(v)
        acc_dtype, _ = _acc_dtypes(dtype)
        return ((v.B, C.cdiv(v.C, bc)), (v.C, v.L, v.W, v.sb, v.sc, v.sh, v.sw, out_sb),
                dict(FLAT_L=v.flat, ACC_DTYPE=acc_dtype, I64=_i64(shape, strides), INTERPRET=C.INTERPRET,
                     BLOCK_C=bc, BLOCK_L=bl, num_warps=warps))
    return C.cached(_cache, ("pool", shape, strides, dtype, topology, out_sb), make)


def _pool_bwd_cfg(shape, dx_strides, g_strides, dtype, topology):
    def make():
        v = _view(shape, dx_strides, topology)
        bc, bl, warps = _pool_blocks(v)
        acc_dtype, _ = _acc_dtypes(dtype)
        cb = C.cdiv(v.C, bc)
        return ((v.B * cb, C.cdiv(v.L, bl)),
                (v.C, v.L, v.W, cb, g_strides[0], g_strides[1], v.sb, v.sc, v.sh, v.sw),
                dict(FLAT_L=v.flat, ACC_DTYPE=acc_dtype, I64=_i64(shape, dx_strides), INTERPRET=C.INTERPRET,
                     BLOCK_C=bc, BLOCK_L=bl, num_warps=warps))
    return C.cached(_cache, ("pool_bwd", shape, dx_strides, g_strides, dtype, topology), make)


def gated_pool_forward(x, topology):
    B = x.shape[0]
    Cc = x.shape[1] if topology == "cnn" else x.shape[2]
    out = x.new_empty((B, Cc))
    if out.numel() == 0:
        return out
    grid, ints, kw = _pool_cfg(x.shape, x.stride(), x.dtype, topology, Cc)
    _pool_kernel[grid](x, out, *ints, **kw)
    return out


def gated_pool_backward(grad, x, topology):
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx
    grid, ints, kw = _pool_bwd_cfg(x.shape, dx.stride(), grad.stride(), x.dtype, topology)
    _pool_bwd_kernel[grid](grad, dx, *ints, **kw)
    return dx


def _gate_cfg(x, w1, b1, w2, topology, backward, dx_strides=None, need=None):
    key = ("gate", backward, x.shape, x.stride(), x.dtype, w1.shape, w1.stride(), b1.stride(),
           w2.stride(), topology, dx_strides, need)

    def make():
        v = _view(x.shape, x.stride(), topology)
        hidden = w1.shape[0]
        acc_dtype, acc_t = _acc_dtypes(x.dtype)
        i64 = _i64(x.shape, x.stride())
        bc, bl, bk, warps = _gate_blocks(v.C, v.L, hidden)
        from_buf = v.C > FUSED_MAX_C
        ints = (v.C, v.L, v.W, hidden, v.sb, v.sc, v.sh, v.sw,
                w1.stride(0), w1.stride(1), b1.stride(0), w2.stride(1))
        kw = dict(FROM_BUF=from_buf, FLAT_L=v.flat, ACC_DTYPE=acc_dtype, I64=i64, INTERPRET=C.INTERPRET,
                  BLOCK_C=bc, BLOCK_L=bl, BLOCK_K=bk, num_warps=warps)
        cfg = {"v": v, "acc_t": acc_t, "from_buf": from_buf, "ints": ints, "kw": kw,
               "pool": _pool_cfg(x.shape, x.stride(), x.dtype, topology, v.C) if from_buf else None}
        if backward:
            nx, nw1, nb1, nw2, nb2 = need
            need_w = nw1 or nb1 or nw2 or nb2
            a1_off = v.B * v.C
            dz1_off = a1_off + v.B * hidden
            dz2_off = dz1_off + v.B * hidden
            cfg["scratch"] = dz2_off + v.B if (need_w or from_buf) else 0
            if dx_strides is not None:
                vd = _view(x.shape, dx_strides, topology)
                dxs, dx_flat = (vd.sb, vd.sc, vd.sh, vd.sw), vd.flat
            else:
                dxs, dx_flat = (0, 0, 0, 0), True
            cfg["bwd_ints"] = dxs + (a1_off, dz1_off, dz2_off)
            cfg["bwd_kw"] = dict(kw, DX_FLAT_L=dx_flat, WRITE_DX=bool(nx) and not from_buf,
                                 WRITE_DP=bool(nx) and from_buf, NEED_W=bool(need_w))
            cfg["need_w"] = need_w
            if from_buf and nx:
                cfg["dx_pool"] = _pool_bwd_cfg(x.shape, dx_strides, (v.C, 1), x.dtype, topology)
            bkw = min(C.next_pow2(hidden), 16)
            bcc = min(max(16, C.next_pow2(v.C)), 64)
            cfg["wgrad"] = ((C.cdiv(hidden, bkw), C.cdiv(v.C, bcc)), (v.B, v.C, hidden, a1_off, dz1_off, dz2_off),
                            dict(ACC_DTYPE=acc_dtype, INTERPRET=C.INTERPRET, BLOCK_B=8, BLOCK_K=bkw, BLOCK_CC=bcc,
                                 num_warps=4))
        return cfg

    return C.cached(_cache, key, make)


def gate_network_forward(x, w1, b1, w2, b2, topology):
    B = x.shape[0]
    y = x.new_empty((B, 1, 1, 1) if topology == "cnn" else (B, 1, 1))
    if B == 0:
        return y
    cfg = _gate_cfg(x, w1, b1, w2, topology, False)
    buf = x
    if cfg["from_buf"]:
        v = cfg["v"]
        buf = torch.empty((v.B, v.C), dtype=cfg["acc_t"], device=x.device)
        grid, ints, kw = cfg["pool"]
        _pool_kernel[grid](x, buf, *ints, **kw)
    _gate_fwd_kernel[(B,)](x, buf, w1, b1, w2, b2, y, *cfg["ints"], **cfg["kw"])
    return y


def gate_network_backward(grad, x, w1, b1, w2, b2, topology, need):
    """(dx, dw1, db1, dw2, db2), None where not needed."""
    nx, nw1, nb1, nw2, nb2 = need
    dx = torch.empty_like(x) if nx else None
    dw1 = torch.empty(w1.shape, dtype=w1.dtype, device=w1.device) if nw1 else None
    db1 = torch.empty(b1.shape, dtype=b1.dtype, device=b1.device) if nb1 else None
    dw2 = torch.empty(w2.shape, dtype=w2.dtype, device=w2.device) if nw2 else None
    db2 = torch.empty(b2.shape, dtype=b2.dtype, device=b2.device) if nb2 else None
    B = x.shape[0]
    if B == 0:
        for t in (dw1, db1, dw2, db2):
            if t is not None:
                t.zero_()
        return dx, dw1, db1, dw2, db2
    need = (bool(nx), bool(nw1), bool(nb1), bool(nw2), bool(nb2))
    cfg = _gate_cfg(x, w1, b1, w2, topology, True, None if dx is None else dx.stride(), need)
    v = cfg["v"]
    scr = torch.empty((cfg["scratch"],), dtype=cfg["acc_t"], device=x.device) if cfg["scratch"] else x
    dp = None
    if cfg["from_buf"]:
        grid, ints, kw = cfg["pool"]
        _pool_kernel[grid](x, scr, *ints, **kw)  # pooled means land in scratch
        if nx:
            dp = torch.empty((v.B, v.C), dtype=cfg["acc_t"], device=x.device)
    _gate_bwd_kernel[(B,)](
        x, scr, grad, w1, b1, w2, b2, C.present_or(dx, x), scr, C.present_or(dp, x),
        *cfg["ints"], grad.stride(0), *cfg["bwd_ints"], **cfg["bwd_kw"])
    if dp is not None and dx.numel() > 0:
        grid, ints, kw = cfg["dx_pool"]
        _pool_bwd_kernel[grid](dp, dx, *ints, **kw)
    if cfg["need_w"]:
        grid, ints, kw = cfg["wgrad"]
        _gate_wgrad_kernel[grid](scr, *(C.present_or(d, scr) for d in (dw1, db1, dw2, db2)), *ints, **kw)
    return dx, dw1, db1, dw2, db2


# ---------------------------------------------------------------------------- effective alpha
def pair_device(alpha, gate):
    """The result's device: a 0-dim CPU scalar defers to the other operand's."""
    if alpha.dim() == 0 and alpha.device.type == "cpu":
        return gate.device
    return alpha.device


def _effective_alpha_plan(shape, alpha, gate, device, operands=()):
    """(n, plan, weight modes, weight kernel args, operands) of the effective-alpha kernels."""
    n = 1
    for v in shape:
        n *= v
    modes, args, strides = [], [], []
    for w in (alpha, gate):
        if w.device != device or (C.FORCE_VALUE_MODE and w.numel() == 1):
            if w.numel() == 1 and w.dtype != torch.float64 and w.device.type == "cpu":
                modes.append(C.WEIGHT_BY_VALUE)
                args.append(float(w.item()))
                strides.append((0,) * len(shape))
                continue
            w = w.to(device, non_blocking=True)
        modes.append(C.WEIGHT_PER_ELEMENT)
        args.append(w)
        strides.append(w.expand(shape).stride())
    ref = torch.empty(shape, device="meta").stride()
    p = C.plan(tuple(shape), ref, tuple(o.stride() for o in operands) + tuple(strides), False)
    if p is None:
        operands = tuple(o.contiguous() for o in operands)
        for k in range(2):
            if modes[k] == C.WEIGHT_PER_ELEMENT:
                args[k] = args[k].expand(shape).contiguous()
                strides[k] = ref
        p = C.plan(tuple(shape), ref, tuple(o.stride() for o in operands) + tuple(strides), False)
    return n, p, modes, args, operands


def gate_effective_alpha_forward(alpha, gate):
    shape = validation.broadcast_shape(alpha.shape, gate.shape)
    promoted = C.result_type(alpha, gate)
    device = pair_device(alpha, gate)
    out = torch.empty(shape, dtype=promoted, device=device)
    if out.numel() == 0:
        return out
    n, p, modes, args, _ = _effective_alpha_plan(shape, alpha, gate, device)
    block = min(1024, max(16, C.next_pow2(n)))
    strides = [o[1:4] for o in p.operands]
    _effective_alpha_kernel[(C.cdiv(n, block),)](
        out, args[0], args[1], n, p.d1, p.d2, *strides[0], *strides[1],
        NDIM=p.ndim, ALPHA_MODE=modes[0], GATE_MODE=modes[1], PROMOTED_DTYPE=C.tl_dtype(promoted),
        WEIGHT_DTYPE=C.compute_dtype(alpha.dtype, gate.dtype), INTERPRET=C.INTERPRET, BLOCK=block,
    )
    return out


def gate_effective_alpha_backward(grad, alpha, gate, need):
    shape = validation.broadcast_shape(alpha.shape, gate.shape)
    device = pair_device(alpha, gate)
    d_alpha = torch.empty(shape, dtype=torch.float64, device=device)
    d_gate = torch.empty(shape, dtype=torch.float64, device=device)
    if d_alpha.numel() > 0:
        n, p, modes, args, (grad,) = _effective_alpha_plan(shape, alpha, gate, device, (grad,))
        block = min(1024, max(16, C.next_pow2(n)))
        strides = [o[1:4] for o in p.operands]
        _effective_alpha_backward_kernel[(C.cdiv(n, block),)](
            d_alpha, d_gate, grad, args[0], args[1], n, p.d1, p.d2,
            *strides[0], *strides[1], *strides[2],
            NDIM=p.ndim, ALPHA_MODE=modes[0], GATE_MODE=modes[1],
            PROMOTED_DTYPE=C.tl_dtype(C.result_type(alpha, gate)),
            WEIGHT_DTYPE=C.compute_dtype(alpha.dtype, gate.dtype), INTERPRET=C.INTERPRET, BLOCK=block,
        )

    def reduce(d, w):
        d = d.sum_to_size(w.shape) if w.dim() else d.sum()
        return d.to(w.dtype).to(w.device)

    return (reduce(d_alpha, alpha) if need[0] else None), (reduce(d_gate, gate) if need[1] else None)
