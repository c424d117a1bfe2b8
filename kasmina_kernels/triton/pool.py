"""Triton kernels for gated pooling and the fused gate network, with their autograd glue.

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

from . import _common as C
from ._common import sigmoid, store, store_scalar, to_float

FUSED_MAX_C = 512
TILE = 65536 if C.INTERPRET else 4096  # elements of a 2-D tile held per step (interpreter: fewer, larger steps)


# ============================================================================ kernels
@triton.jit
def _spatial_offsets(ll, W, sh, sw, FLAT_L: tl.constexpr):
    if FLAT_L:
        return ll * sw
    else:
        return (ll // W) * sh + (ll % W) * sw


@triton.jit
def _pool_slice(x_ptr, base, cc, cm, L, W, sxc, sxh, sxw,
                FLAT_L: tl.constexpr, AD: tl.constexpr, I64: tl.constexpr, INTERP: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Mean over the L positions of channels cc of one sample, in AD (NaN when L == 0)."""
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=AD)
    for l0 in range(0, L, BLOCK_L):
        ll = l0 + tl.arange(0, BLOCK_L)
        if I64:
            ll = ll.to(tl.int64)
        lm = ll < L
        off = base + cc[:, None] * sxc + _spatial_offsets(ll, W, sxh, sxw, FLAT_L)[None, :]
        x = tl.load(x_ptr + off, mask=cm[:, None] & lm[None, :], other=0)
        acc += to_float(x, AD, INTERP)
    return tl.sum(acc, axis=1) / L


@triton.jit
def _pool_kernel(
    x_ptr, out_ptr, C, L, W, sxb, sxc, sxh, sxw, out_sb,
    FLAT_L: tl.constexpr, AD: tl.constexpr, I64: tl.constexpr, INTERP: tl.constexpr,
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
                       FLAT_L, AD, I64, INTERP, BLOCK_C, BLOCK_L)
    store(out_ptr + b * out_sb + cc, mean, cm, INTERP)


@triton.jit
def _pool_bwd_kernel(
    g_ptr, dx_ptr, C, L, W, CB, sgb, sgc, sdb, sdc, sdh, sdw,
    FLAT_L: tl.constexpr, AD: tl.constexpr, I64: tl.constexpr, INTERP: tl.constexpr,
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
    g = to_float(tl.load(g_ptr + b * sgb + cc * sgc, mask=cm, other=0), AD, INTERP) / L
    off = b * sdb + cc[:, None] * sdc + _spatial_offsets(ll, W, sdh, sdw, FLAT_L)[None, :]
    val = g[:, None] + tl.zeros([BLOCK_C, BLOCK_L], dtype=AD)
    store(dx_ptr + off, val, cm[:, None] & lm[None, :], INTERP)


@triton.jit
def _hidden_chunk(w1_ptr, b1_ptr, w2_ptr, pooled, cc, cm, k0, HID, sw1k, sw1c, sb1, sw2,
                  AD: tl.constexpr, INTERP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows k0..k0+BLOCK_K of the first layer: (W1 tile, z1, w2 chunk, row mask)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    km = kk < HID
    w1 = to_float(tl.load(w1_ptr + kk[:, None] * sw1k + cc[None, :] * sw1c,
                          mask=km[:, None] & cm[None, :], other=0), AD, INTERP)
    z1 = tl.sum(w1 * pooled[None, :], axis=1) + to_float(tl.load(b1_ptr + kk * sb1, mask=km, other=0), AD, INTERP)
    w2 = to_float(tl.load(w2_ptr + kk * sw2, mask=km, other=0), AD, INTERP)
    return w1, z1, w2, kk, km


@triton.jit
def _gate_out(w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled, cc, cm, HID, sw1k, sw1c, sb1, sw2,
              AD: tl.constexpr, INTERP: tl.constexpr, BLOCK_K: tl.constexpr):
    """z2 = w2 . relu(W1 pooled + b1) + b2 for one sample (fixed-order sums)."""
    zacc = tl.zeros([BLOCK_K], dtype=AD)
    for k0 in range(0, HID, BLOCK_K):
        w1, z1, w2, kk, km = _hidden_chunk(w1_ptr, b1_ptr, w2_ptr, pooled, cc, cm, k0, HID,
                                           sw1k, sw1c, sb1, sw2, AD, INTERP, BLOCK_K)
        a1 = tl.where(z1 < 0, 0.0, z1)  # relu keeping NaN
        zacc += tl.where(km, a1 * w2, 0.0)
    return tl.sum(zacc, axis=0) + to_float(tl.load(b2_ptr), AD, INTERP)


@triton.jit
def _sample_pooled(x_ptr, buf_ptr, b, cc, cm, C, L, W, sxb, sxc, sxh, sxw,
                   FROM_BUF: tl.constexpr, FLAT_L: tl.constexpr, AD: tl.constexpr,
                   I64: tl.constexpr, INTERP: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    if FROM_BUF:
        pooled = tl.load(buf_ptr + b * C + cc, mask=cm, other=0)
    else:
        pooled = _pool_slice(x_ptr, b * sxb, cc, cm, L, W, sxc, sxh, sxw,
                             FLAT_L, AD, I64, INTERP, BLOCK_C, BLOCK_L)
    return tl.where(cm, pooled, 0.0)


@triton.jit
def _gate_fwd_kernel(
    x_ptr, buf_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr,
    C, L, W, HID, sxb, sxc, sxh, sxw, sw1k, sw1c, sb1, sw2,
    FROM_BUF: tl.constexpr, FLAT_L: tl.constexpr, AD: tl.constexpr, I64: tl.constexpr,
    INTERP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    if I64:
        b = b.to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    if I64:
        cc = cc.to(tl.int64)
    cm = cc < C
    pooled = _sample_pooled(x_ptr, buf_ptr, b, cc, cm, C, L, W, sxb, sxc, sxh, sxw,
                            FROM_BUF, FLAT_L, AD, I64, INTERP, BLOCK_C, BLOCK_L)
    z2 = _gate_out(w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled, cc, cm, HID, sw1k, sw1c, sb1, sw2,
                   AD, INTERP, BLOCK_K)
    store_scalar(y_ptr + b, sigmoid(z2), INTERP)


@triton.jit
def _gate_bwd_kernel(
    x_ptr, buf_ptr, gy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dx_ptr, scr_ptr, dp_ptr,
    C, L, W, HID, sxb, sxc, sxh, sxw, sw1k, sw1c, sb1, sw2, sgy,
    sdb, sdc, sdh, sdw, A1_OFF, DZ1_OFF, DZ2_OFF,
    FROM_BUF: tl.constexpr, FLAT_L: tl.constexpr, DX_FLAT_L: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DP: tl.constexpr, NEED_W: tl.constexpr,
    AD: tl.constexpr, I64: tl.constexpr, INTERP: tl.constexpr,
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
                            FROM_BUF, FLAT_L, AD, I64, INTERP, BLOCK_C, BLOCK_L)
    if NEED_W:
        if not FROM_BUF:
            tl.store(scr_ptr + b * C + cc, pooled, mask=cm)
    z2 = _gate_out(w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled, cc, cm, HID, sw1k, sw1c, sb1, sw2,
                   AD, INTERP, BLOCK_K)
    y = sigmoid(z2)
    gy = to_float(tl.load(gy_ptr + b * sgy), AD, INTERP)
    dz2 = gy * y * (1.0 - y)
    if NEED_W:
        tl.store(scr_ptr + DZ2_OFF + b, dz2)
    dp = tl.zeros([BLOCK_C], dtype=AD)
    for k0 in range(0, HID, BLOCK_K):
        w1, z1, w2, kk, km = _hidden_chunk(w1_ptr, b1_ptr, w2_ptr, pooled, cc, cm, k0, HID,
                                           sw1k, sw1c, sb1, sw2, AD, INTERP, BLOCK_K)
        dz1 = tl.where(z1 > 0, dz2 * w2, 0.0)
        if NEED_W:
            tl.store(scr_ptr + A1_OFF + b * HID + kk, tl.where(z1 < 0, 0.0, z1), mask=km)
            tl.store(scr_ptr + DZ1_OFF + b * HID + kk, dz1, mask=km)
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
            val = g[:, None] + tl.zeros([BLOCK_C, BLOCK_L], dtype=AD)
            store(dx_ptr + off, val, cm[:, None] & lm[None, :], INTERP)


@triton.jit
def _gate_wgrad_kernel(
    scr_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, B, C, HID, A1_OFF, DZ1_OFF, DZ2_OFF,
    AD: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CC: tl.constexpr,
):
    """dW1 = dz1^T pooled, db1 = sum dz1, dW2 = dz2^T relu(z1), db2 = sum dz2: each program
    owns a (rows, cols) tile of dW1 and walks the batch in a fixed order."""
    pk = tl.program_id(0)
    pc = tl.program_id(1)
    kk = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    km = kk < HID
    cc = pc * BLOCK_CC + tl.arange(0, BLOCK_CC)
    cm = cc < C
    acc = tl.zeros([BLOCK_K, BLOCK_CC], dtype=AD)
    acc_b1 = tl.zeros([BLOCK_K], dtype=AD)
    acc_w2 = tl.zeros([BLOCK_K], dtype=AD)
    acc_b2 = tl.zeros([BLOCK_B], dtype=AD)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        bm = bb < B
        m_bk = bm[:, None] & km[None, :]
        dz1 = tl.load(scr_ptr + DZ1_OFF + bb[:, None] * HID + kk[None, :], mask=m_bk, other=0)
        pooled = tl.load(scr_ptr + bb[:, None] * C + cc[None, :], mask=bm[:, None] & cm[None, :], other=0)
        acc += tl.sum(dz1[:, :, None] * pooled[:, None, :], axis=0)
        a1 = tl.load(scr_ptr + A1_OFF + bb[:, None] * HID + kk[None, :], mask=m_bk, other=0)
        dz2 = tl.load(scr_ptr + DZ2_OFF + bb, mask=bm, other=0)
        acc_b1 += tl.sum(dz1, axis=0)
        acc_w2 += tl.sum(a1 * dz2[:, None], axis=0)
        acc_b2 += dz2
    store(dw1_ptr + kk[:, None] * C + cc[None, :], acc, km[:, None] & cm[None, :], INTERP)
    if pc == 0:
        store(db1_ptr + kk, acc_b1, km, INTERP)
        store(dw2_ptr + kk, acc_w2, km, INTERP)
        if pk == 0:
            store_scalar(db2_ptr, tl.sum(acc_b2, axis=0), INTERP)


# ============================================================================ host side
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    return max(span, n) + 2 * C.MAX_BLOCK >= C._I32_SAFE


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


def _gate_blocks(Cc, L, HID):
    bc = max(16, C.next_pow2(Cc))
    bl = max(1, min(C.next_pow2(max(L, 1)), TILE // bc))
    bk = max(1, min(C.next_pow2(HID), TILE // bc))
    return bc, bl, bk, (8 if bc >= 256 else 4)


_cache: dict = {}


def _cached(key, make):
    cfg = _cache.get(key)
    if cfg is None:
        if len(_cache) > 4096:
            _cache.clear()
        cfg = _cache[key] = make()
    return cfg


def _pool_cfg(shape, strides, dtype, topology, out_sb):
    """(grid, ints, kw) of the pooling kernel over x (means land at out[b * out_sb + c])."""
    def make():
        v = _view(shape, strides, topology)
        bc, bl, warps = _pool_blocks(v)
        AD, _ = _acc_dtypes(dtype)
        return ((v.B, _cdiv(v.C, bc)), (v.C, v.L, v.W, v.sb, v.sc, v.sh, v.sw, out_sb),
                dict(FLAT_L=v.flat, AD=AD, I64=_i64(shape, strides), INTERP=C.INTERPRET,
                     BLOCK_C=bc, BLOCK_L=bl, num_warps=warps))
    return _cached(("pool", shape, strides, dtype, topology, out_sb), make)


def _pool_bwd_cfg(shape, dx_strides, g_strides, dtype, topology):
    def make():
        v = _view(shape, dx_strides, topology)
        bc, bl, warps = _pool_blocks(v)
        AD, _ = _acc_dtypes(dtype)
        cb = _cdiv(v.C, bc)
        return ((v.B * cb, _cdiv(v.L, bl)),
                (v.C, v.L, v.W, cb, g_strides[0], g_strides[1], v.sb, v.sc, v.sh, v.sw),
                dict(FLAT_L=v.flat, AD=AD, I64=_i64(shape, dx_strides), INTERP=C.INTERPRET,
                     BLOCK_C=bc, BLOCK_L=bl, num_warps=warps))
    return _cached(("pool_bwd", shape, dx_strides, g_strides, dtype, topology), make)


def _pool_fwd(x, topology):
    B = x.shape[0]
    Cc = x.shape[1] if topology == "cnn" else x.shape[2]
    out = x.new_empty((B, Cc))
    if out.numel() == 0:
        return out
    grid, ints, kw = _pool_cfg(x.shape, x.stride(), x.dtype, topology, Cc)
    _pool_kernel[grid](x, out, *ints, **kw)
    return out


def _pool_bwd(grad, x, topology):
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx
    grid, ints, kw = _pool_bwd_cfg(x.shape, dx.stride(), grad.stride(), x.dtype, topology)
    _pool_bwd_kernel[grid](grad, dx, *ints, **kw)
    return dx


def _gate_shape(B, topology):
    return (B, 1, 1, 1) if topology == "cnn" else (B, 1, 1)


def _gate_cfg(x, w1, b1, w2, topology, backward, dx_strides=None, need=None):
    key = ("gate", backward, x.shape, x.stride(), x.dtype, w1.shape, w1.stride(), b1.stride(),
           w2.stride(), topology, dx_strides, need)

    def make():
        v = _view(x.shape, x.stride(), topology)
        HID = w1.shape[0]
        AD, acc_t = _acc_dtypes(x.dtype)
        i64 = _i64(x.shape, x.stride())
        bc, bl, bk, warps = _gate_blocks(v.C, v.L, HID)
        from_buf = v.C > FUSED_MAX_C
        ints = (v.C, v.L, v.W, HID, v.sb, v.sc, v.sh, v.sw,
                w1.stride(0), w1.stride(1), b1.stride(0), w2.stride(1))
        kw = dict(FROM_BUF=from_buf, FLAT_L=v.flat, AD=AD, I64=i64, INTERP=C.INTERPRET,
                  BLOCK_C=bc, BLOCK_L=bl, BLOCK_K=bk, num_warps=warps)
        cfg = {"v": v, "HID": HID, "acc_t": acc_t, "from_buf": from_buf, "ints": ints, "kw": kw,
               "pool": _pool_cfg(x.shape, x.stride(), x.dtype, topology, v.C) if from_buf else None}
        if backward:
            nx, nw1, nb1, nw2, nb2 = need
            need_w = nw1 or nb1 or nw2 or nb2
            a1_off = v.B * v.C
            dz1_off = a1_off + v.B * HID
            dz2_off = dz1_off + v.B * HID
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
            bkw = min(C.next_pow2(HID), 16)
            bcc = min(max(16, C.next_pow2(v.C)), 64)
            cfg["wgrad"] = ((_cdiv(HID, bkw), _cdiv(v.C, bcc)), (v.B, v.C, HID, a1_off, dz1_off, dz2_off),
                            dict(AD=AD, INTERP=C.INTERPRET, BLOCK_B=8, BLOCK_K=bkw, BLOCK_CC=bcc,
                                 num_warps=4))
        return cfg

    return _cached(key, make)


def _gate_fwd(x, w1, b1, w2, b2, topology):
    B = x.shape[0]
    y = x.new_empty(_gate_shape(B, topology))
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


def _gate_bwd(grad, x, w1, b1, w2, b2, topology, need):
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
        x, scr, grad, w1, b1, w2, b2, x if dx is None else dx, scr, x if dp is None else dp,
        *cfg["ints"], grad.stride(0), *cfg["bwd_ints"], **cfg["bwd_kw"])
    if dp is not None and dx.numel() > 0:
        grid, ints, kw = cfg["dx_pool"]
        _pool_bwd_kernel[grid](dp, dx, *ints, **kw)
    if cfg["need_w"]:
        grid, ints, kw = cfg["wgrad"]
        _gate_wgrad_kernel[grid](scr, _or(dw1, scr), _or(db1, scr), _or(dw2, scr), _or(db2, scr),
                                 *ints, **kw)
    return dx, dw1, db1, dw2, db2


def _or(t, fallback):
    return fallback if t is None else t


# ============================================================================ torch.library
def _pool_impl(x, topology):
    return _pool_fwd(x, topology)


def _pool_fake(x, topology):
    channels = x.shape[1] if topology == "cnn" else x.shape[2]
    return x.new_empty((x.shape[0], channels))


def _pool_bwd_impl(grad, x, topology):
    return _pool_bwd(grad, x, topology)


def _pool_bwd_fake(grad, x, topology):
    return torch.empty_like(x)


def _gate_impl(x, w1, b1, w2, b2, topology):
    return _gate_fwd(x, w1, b1, w2, b2, topology)


def _gate_fake(x, w1, b1, w2, b2, topology):
    return x.new_empty(_gate_shape(x.shape[0], topology))


def _gate_bwd_impl(grad, x, w1, b1, w2, b2, topology, need):
    out = _gate_bwd(grad, x, w1, b1, w2, b2, topology, need)
    likes = (x, w1, b1, w2, b2)
    return tuple(C.empty_placeholder(l) if t is None else t for t, l in zip(out, likes))


def _gate_bwd_fake(grad, x, w1, b1, w2, b2, topology, need):
    likes = (x, w1, b1, w2, b2)
    return tuple(
        (torch.empty_like(l) if k == 0 else l.new_empty(l.shape)) if n else C.empty_placeholder(l)
        for k, (n, l) in enumerate(zip(need, likes))
    )


def _define(name, schema, impl, fake):
    op = torch.library.custom_op(f"kasmina::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


_pool_op_def = _define("triton_gated_pool", "(Tensor x, str topology) -> Tensor", _pool_impl, _pool_fake)
_pool_bwd_op_def = _define(
    "triton_gated_pool_backward", "(Tensor grad, Tensor x, str topology) -> Tensor",
    _pool_bwd_impl, _pool_bwd_fake)
_gate_op_def = _define(
    "triton_gate_network",
    "(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, str topology) -> Tensor",
    _gate_impl, _gate_fake)
_gate_bwd_op_def = _define(
    "triton_gate_network_backward",
    "(Tensor grad, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, str topology,"
    " bool[] need) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _gate_bwd_impl, _gate_bwd_fake)

_ops = torch.ops.kasmina
pool_op = _ops.triton_gated_pool.default
pool_bwd_op = _ops.triton_gated_pool_backward.default
gate_op = _ops.triton_gate_network.default
gate_bwd_op = _ops.triton_gate_network_backward.default


_grads = C.select_grads


def _pool_save(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.topology = inputs[1]


def _pool_op_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return pool_bwd_op(grad, x, ctx.topology), None


def _gate_save(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.topology = inputs[5]


def _gate_op_backward(ctx, grad):
    x, w1, b1, w2, b2 = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:5])
    return _grads(need, gate_bwd_op(grad, x, w1, b1, w2, b2, ctx.topology, need)) + (None,)


_pool_op_def.register_autograd(_pool_op_backward, setup_context=_pool_save)
_gate_op_def.register_autograd(_gate_op_backward, setup_context=_gate_save)


class _PoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topology):
        ctx.save_for_backward(x)
        ctx.topology = topology
        return _pool_fwd(x, topology)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if C.eager_ok(grad):
            return C.first_order_only("kasmina::gated_pool", (_pool_bwd(grad, x, ctx.topology), None), (grad, x))
        return pool_bwd_op(grad, x, ctx.topology), None


class _GateFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, topology):
        ctx.save_for_backward(x, w1, b1, w2, b2)
        ctx.topology = topology
        return _gate_fwd(x, w1, b1, w2, b2, topology)

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad[:5]
        if C.eager_ok(grad):
            return C.first_order_only("kasmina::gate_network",
                                      _gate_bwd(grad, x, w1, b1, w2, b2, ctx.topology, need) + (None,),
                                      (grad, x, w1, b1, w2, b2))
        return _grads(need, gate_bwd_op(grad, x, w1, b1, w2, b2, ctx.topology, list(need))) + (None,)


# ============================================================================ public entry points
def gated_pool(x, topology):
    if C.eager_ok(x):
        if C.grad_wanted(x):
            return _PoolFn.apply(x, topology)
        return _pool_fwd(x, topology)
    return pool_op(x, topology)


def gate_network(x, w1, b1, w2, b2, *, topology):
    if C.eager_ok(x, w1, b1, w2, b2):
        if C.grad_wanted(x, w1, b1, w2, b2):
            return _GateFn.apply(x, w1, b1, w2, b2, topology)
        return _gate_fwd(x, w1, b1, w2, b2, topology)
    return gate_op(x, w1, b1, w2, b2, topology)
