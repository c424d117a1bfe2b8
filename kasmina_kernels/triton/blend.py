"""Triton kernels of the blend family (ADD, GATE, MULTIPLY, STE, the valve multiplier and the
gate's effective alpha) and their autograd glue, one file for the family (Liger-Kernel style).

Every forward is one pass over the features (one launch). Every backward is one pass that
writes each feature gradient and, for alpha/gate, one partial sum per program; a
single-program kernel then sums the partials in a fixed order in float64 and chains them
through the clamps (deterministic: no atomics; two launches). Weights of other broadcast
shapes, and gate_effective_alpha's tiny tensors, reduce per-element terms with torch's
deterministic sum instead. Nothing but the inputs is saved for backward, and no kernel
writes into an input.

Rounding points follow the native backend (csrc/cpu/blend_cpu.cpp): the seed is read in its
own dtype and rounded to the host's dtype inside the kernel; math runs in float32 (float64
for double); the output is rounded once; weights are rounded where the references round
them. The alpha/gate gradient terms and partial sums are float64 for float32/float64
features (float32 for half types), which keeps those reductions well inside rule 2 of docs/semantics.md#equivalence.

Iteration: the kernels walk the output's storage order (it follows the host's memory
format), split per sample when a weight is per-sample, so alpha/gate cost one scalar load per
program and the partial sums are per-sample; every other operand is addressed by its own
strides (a channels_last host with an NCHW seed costs no copy). Inner dims are coalesced to
at most three; layouts that need more (rare, rank >= 5) are copied into the output's layout.
Mixed memory formats (Esper's channels_last host beside an NCHW seed and seed_input: every
operand a dense (B,C,H,W) tensor in one of the two formats, weights scalar or per-sample)
take a tiled path instead: one program per [positions x channels] tile of one sample, each
operand loaded and stored along its own contiguous dim, so both formats are read coalesced.
A backward reads only what its closed forms need (the lerp without a weight gradient reads
g alone) and writes only the gradients asked for.
64-bit offsets switch on when a tensor spans 2^31 elements. alpha/gate are read on the device
(a 0-dim CPU scalar beside device features is passed by value: no copy, no sync).

Dispatch: each op is a torch.library custom op ``kasmina::triton_<name>`` (fake kernel and
register_autograd included), which is what torch.compile and every other tracer sees. Plain
eager calls (no tracing, no dispatch modes, plain tensors) skip the dispatcher round trip and
go straight to an autograd.Function that launches the same kernels. All host-side planning is
cached per (shape, strides, dtypes, devices), so a call does no planning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import validation
from . import _common as C
from ._common import (
    clamp01,
    coords,
    in01,
    lerp,
    offset,
    round_to,
    store,
    store_scalar,
    tanh,
    tanh_grad,
    to_float,
)

OP_ADD, OP_GATE, OP_MUL, OP_STE, OP_VALVE = 0, 1, 2, 3, 4
MODE_VALUE, MODE_PTR, MODE_SAMPLE, MODE_ELEM = 0, 1, 2, 3

# Tests set this to route numel-1 weights through the by-value path that a 0-dim CPU alpha
# beside CUDA features takes (so the interpreter exercises it too).
FORCE_VALUE_MODE = False
# Per-sample weights use the per-sample split only when a sample has at least this many
# elements; smaller samples read the weight per element (one program covers many samples).
MIN_SPLIT_INNER = 64
# Elements per tile of the mixed-layout path (a power of two). The interpreter runs one
# program at a time, so it gets larger tiles; tests lower it to exercise edge tiles.
TILE_ELEMS = 32768 if C.INTERPRET else 2048


# ============================================================================ kernels
@triton.jit
def _weight(ptr, b, off, mask, MODE: tl.constexpr, SB, WD: tl.constexpr, INTERP: tl.constexpr):
    """A weight (alpha or gate) as WD: by value, one scalar, per sample, or per element."""
    if MODE == 0:
        return tl.cast(ptr, WD)
    elif MODE == 1:
        return to_float(tl.load(ptr), WD, INTERP)
    elif MODE == 2:
        return to_float(tl.load(ptr + b * SB), WD, INTERP)
    else:
        return to_float(tl.load(ptr + off, mask=mask, other=0), WD, INTERP)


@triton.jit
def _effective_weight(a, g, OP: tl.constexpr, H: tl.constexpr, P: tl.constexpr, CD: tl.constexpr,
                      INTERP: tl.constexpr):
    """The per-element weight of each op, rounded where the reference rounds it."""
    if OP == 0:  # ADD: clamp01(alpha) cast to h's dtype
        w = round_to(clamp01(a), H, INTERP)
    elif OP == 1:  # GATE: clamp01(clamp01(a) * clamp01(g)) in the promoted dtype P, then h's
        w = round_to(clamp01(round_to(clamp01(a) * clamp01(g), P, INTERP)), H, INTERP)
    elif OP == 2:  # MULTIPLY: clamp01(alpha cast to h's dtype)
        w = clamp01(round_to(a, H, INTERP))
    else:  # VALVE: clamp01(alpha) in the result dtype (H is the result dtype here)
        w = round_to(clamp01(a), H, INTERP)
    return w.to(CD)


@triton.jit
def _seed(x, H: tl.constexpr, CD: tl.constexpr, INTERP: tl.constexpr):
    """A seed value read in its own dtype, cast to the host's dtype H, then to CD."""
    if x.dtype == H:
        return to_float(x, CD, INTERP)
    else:
        if x.dtype == tl.float64:
            xf = x
        else:
            xf = to_float(x, tl.float32, INTERP)
        return round_to(xf, H, INTERP).to(CD)


@triton.jit
def _fwd_math(h, s, r, w, OP: tl.constexpr, INTERP: tl.constexpr):
    """The forward value of ADD/GATE (lerp), MULTIPLY (r is h without seed_input) and STE,
    on compute-dtype values of any block shape."""
    if OP <= 1:
        y = lerp(h, s, w)
    elif OP == 2:
        y = h * (1.0 + w * tanh(s - r, INTERP))
    else:
        y = h + (s - s)
    return y


@triton.jit
def _bwd_math(go, h, s, r, w, OP: tl.constexpr, R_IS_H: tl.constexpr, NEED_W: tl.constexpr,
              H: tl.constexpr, CD: tl.constexpr, RD: tl.constexpr, INTERP: tl.constexpr):
    """(dh, ds rounded to H, the alpha/gate gradient term in RD) of ADD/GATE/MULTIPLY. Without
    NEED_W the lerp reads neither h nor s (the caller may pass placeholders); the term is then
    a placeholder too."""
    dwt = go
    if OP <= 1:
        dh = go * (1.0 - w)
        ds = go * w
        if NEED_W:
            dwt = go.to(RD) * (s.to(RD) - h.to(RD))
    else:
        # The reference autograd's rounding points (as the native kernels): s - r and
        # its saved tanh rounded to the host dtype H; g*h, g*h*c, c*t and 1 + c*t rounded
        # to H; 1 - t^2 as the device's tanh_backward forms it (tanh_grad). A tanh that
        # saturates to +-1 in H so gives exactly zero, as in the reference.
        dx = s - r
        d = round_to(dx, H, INTERP)
        tr = tanh(d, INTERP)
        tg = round_to(tr, H, INTERP)
        gh = round_to(go * h, H, INTERP)
        ds = round_to(gh * w, H, INTERP) * tanh_grad(tg, H, INTERP)
        dh = round_to(go * round_to(1.0 + round_to(w * tg, H, INTERP), H, INTERP), H, INTERP)
        if R_IS_H:
            dh = dh - round_to(ds, H, INTERP)
        if NEED_W:
            if RD == CD:
                # the alpha term wants tanh of the unrounded s - r: first-order correction
                e = dx - d
                e = tl.where(e == e, e, 0.0)  # an infinite d rounds to itself
                dwt = go * h * (tr + (1.0 - tr * tr) * e)
            else:
                dwt = go.to(RD) * h.to(RD) * tanh(s.to(RD) - r.to(RD), INTERP)
    # the gradient of s.to(h.dtype) is rounded to h's dtype, then (by the store) to s's
    return dh, round_to(ds, H, INTERP), dwt


@triton.jit
def _blend_fwd_kernel(
    out_ptr, x0_ptr, x1_ptr, x2_ptr, a_ptr, g_ptr,
    INNER, D1, D2, CHUNKS,
    x0_sb, x0_s0, x0_s1, x0_s2,
    x1_sb, x1_s0, x1_s1, x1_s2,
    x2_sb, x2_s0, x2_s1, x2_s2,
    a_sb, a_s0, a_s1, a_s2,
    g_sb, g_s0, g_s1, g_s2,
    OP: tl.constexpr, NDIM: tl.constexpr,
    X0_FLAT: tl.constexpr, X1_FLAT: tl.constexpr, X2_FLAT: tl.constexpr,
    A_MODE: tl.constexpr, G_MODE: tl.constexpr, R_IS_H: tl.constexpr,
    H: tl.constexpr, P: tl.constexpr, WD: tl.constexpr, CD: tl.constexpr, TD: tl.constexpr,
    I64: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    b = pid // CHUNKS
    j = (pid - b * CHUNKS) * BLOCK + tl.arange(0, BLOCK)
    mask = j < INNER
    i0, i1, i2 = coords(j, D1, D2, NDIM)
    x0 = tl.load(x0_ptr + offset(b, j, i0, i1, i2, x0_sb, x0_s0, x0_s1, x0_s2, X0_FLAT), mask=mask, other=0)
    if OP != 3:
        a = _weight(a_ptr, b, offset(b, j, i0, i1, i2, a_sb, a_s0, a_s1, a_s2, False), mask, A_MODE, a_sb, WD, INTERP)
        if OP == 1:
            g = _weight(g_ptr, b, offset(b, j, i0, i1, i2, g_sb, g_s0, g_s1, g_s2, False), mask, G_MODE, g_sb, WD, INTERP)
        else:
            g = a
        w = _effective_weight(a, g, OP, H, P, CD, INTERP)
    if OP == 4:
        # VALVE: x0 is m (its own dtype TD's opmath); tanh rounded to m's dtype
        t = round_to(tanh(to_float(x0, TD, INTERP), INTERP), x0_ptr.dtype.element_ty, INTERP).to(CD)
        y = 1.0 + w * t
    else:
        h = to_float(x0, CD, INTERP)
        x1 = tl.load(x1_ptr + offset(b, j, i0, i1, i2, x1_sb, x1_s0, x1_s1, x1_s2, X1_FLAT), mask=mask, other=0)
        s = _seed(x1, H, CD, INTERP)
        r = h
        if OP == 2:
            if not R_IS_H:
                x2 = tl.load(x2_ptr + offset(b, j, i0, i1, i2, x2_sb, x2_s0, x2_s1, x2_s2, X2_FLAT), mask=mask, other=0)
                r = _seed(x2, H, CD, INTERP)
        if OP == 3:
            w = h  # unused
        y = _fwd_math(h, s, r, w, OP, INTERP)
    store(out_ptr + (b * INNER + j), y, mask, INTERP)


@triton.jit
def _blend_bwd_kernel(
    dx0_ptr, dx1_ptr, dx2_ptr, dwe_ptr, part_ptr,
    go_ptr, x0_ptr, x1_ptr, x2_ptr, a_ptr, g_ptr,
    INNER, D1, D2, CHUNKS,
    go_sb, go_s0, go_s1, go_s2,
    x0_sb, x0_s0, x0_s1, x0_s2,
    x1_sb, x1_s0, x1_s1, x1_s2,
    x2_sb, x2_s0, x2_s1, x2_s2,
    a_sb, a_s0, a_s1, a_s2,
    g_sb, g_s0, g_s1, g_s2,
    OP: tl.constexpr, NDIM: tl.constexpr, GO_FLAT: tl.constexpr,
    X0_FLAT: tl.constexpr, X1_FLAT: tl.constexpr, X2_FLAT: tl.constexpr,
    A_MODE: tl.constexpr, G_MODE: tl.constexpr, R_IS_H: tl.constexpr,
    W_DX0: tl.constexpr, W_DX1: tl.constexpr, W_DX2: tl.constexpr,
    NEED_W: tl.constexpr, W_ELEM: tl.constexpr, LOAD_H: tl.constexpr, LOAD_S: tl.constexpr,
    H: tl.constexpr, P: tl.constexpr, WD: tl.constexpr, CD: tl.constexpr, TD: tl.constexpr,
    RD: tl.constexpr, I64: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr,
):
    # RD: dtype of the alpha/gate gradient terms and partial sums (float64 for float32 and
    # float64 features, so the reduction error stays well under eager's; float32 for halves).
    # LOAD_H / LOAD_S: whether the closed forms need h / s at all (the lerp without a weight
    # gradient reads only g).
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    b = pid // CHUNKS
    j = (pid - b * CHUNKS) * BLOCK + tl.arange(0, BLOCK)
    mask = j < INNER
    i0, i1, i2 = coords(j, D1, D2, NDIM)
    ref = b * INNER + j
    go = to_float(tl.load(go_ptr + offset(b, j, i0, i1, i2, go_sb, go_s0, go_s1, go_s2, GO_FLAT), mask=mask, other=0), CD, INTERP)
    x0_off = offset(b, j, i0, i1, i2, x0_sb, x0_s0, x0_s1, x0_s2, X0_FLAT)
    a = _weight(a_ptr, b, offset(b, j, i0, i1, i2, a_sb, a_s0, a_s1, a_s2, False), mask, A_MODE, a_sb, WD, INTERP)
    if OP == 1:
        g = _weight(g_ptr, b, offset(b, j, i0, i1, i2, g_sb, g_s0, g_s1, g_s2, False), mask, G_MODE, g_sb, WD, INTERP)
    else:
        g = a
    w = _effective_weight(a, g, OP, H, P, CD, INTERP)
    if OP == 4:
        # dm at the reference's rounding points (torch's tanh_backward in m's dtype: the
        # saved tanh rounded to m's dtype, g*c rounded to it, 1 - t^2 as that device forms
        # it); dc with the unrounded tanh
        x0 = tl.load(x0_ptr + x0_off, mask=mask, other=0)
        tx = tanh(to_float(x0, TD, INTERP), INTERP).to(CD)
        t = round_to(tx, x0_ptr.dtype.element_ty, INTERP)
        dm = round_to(go * w, x0_ptr.dtype.element_ty, INTERP) * tanh_grad(t, x0_ptr.dtype.element_ty, INTERP)
        dwt = go.to(RD) * tx.to(RD)
        if W_DX0:
            store(dx0_ptr + ref, dm, mask, INTERP)
    else:
        h = go
        s = go
        r = go
        if LOAD_H:
            h = to_float(tl.load(x0_ptr + x0_off, mask=mask, other=0), CD, INTERP)
        x1_off = offset(b, j, i0, i1, i2, x1_sb, x1_s0, x1_s1, x1_s2, X1_FLAT)
        if LOAD_S:
            s = _seed(tl.load(x1_ptr + x1_off, mask=mask, other=0), H, CD, INTERP)
        if OP == 2:
            x2_off = offset(b, j, i0, i1, i2, x2_sb, x2_s0, x2_s1, x2_s2, X2_FLAT)
            if R_IS_H:
                r = h
            else:
                r = _seed(tl.load(x2_ptr + x2_off, mask=mask, other=0), H, CD, INTERP)
        dh, ds_h, dwt = _bwd_math(go, h, s, r, w, OP, R_IS_H, NEED_W, H, CD, RD, INTERP)
        if W_DX0:
            store(dx0_ptr + ref, dh, mask, INTERP)
        if W_DX1:
            store(dx1_ptr + x1_off, ds_h, mask, INTERP)
        if OP == 2:
            if W_DX2:
                store(dx2_ptr + x2_off, -ds_h, mask, INTERP)
    if NEED_W:
        dwt = tl.where(mask, dwt, 0.0)
        if W_ELEM:
            tl.store(dwe_ptr + ref, dwt, mask=mask)
        else:
            tl.store(part_ptr + pid, tl.sum(dwt, axis=0))


# ---------------------------------------------------------------------------- mixed layouts
# A channels_last operand beside NCHW operands of one (B,C,H,W) shape: one program per tile
# of [BLOCK_P positions x BLOCK_C channels] of one sample. Each operand is addressed along its
# own contiguous dim (p*C + c channels_last, c*HW + p NCHW), so every load and store is
# coalesced and Triton's compiler converts between the two register layouts through shared
# memory. The per-element math is the flat kernels' (_fwd_math, _bwd_math).
@triton.jit
def _tile_offsets(b, pp, cc, C, HW, CL: tl.constexpr):
    if CL:
        return b * (C * HW) + (pp[:, None] * C + cc[None, :])
    else:
        return b * (C * HW) + (cc[None, :] * HW + pp[:, None])


@triton.jit
def _tile_coords(C, HW, TILES, CT, I64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(pid, sample, positions, channels, mask) of this program's tile."""
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    b = pid // TILES
    t = pid - b * TILES
    pt = t // CT
    ct = t - pt * CT
    pp = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    cc = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    if I64:
        pp = pp.to(tl.int64)
        cc = cc.to(tl.int64)
    mask = (pp < HW)[:, None] & (cc < C)[None, :]
    return pid, b, pp, cc, mask


@triton.jit
def _blend_tile_fwd_kernel(
    out_ptr, x0_ptr, x1_ptr, x2_ptr, a_ptr, g_ptr,
    C, HW, TILES, CT, a_sb, g_sb,
    OP: tl.constexpr, OUT_CL: tl.constexpr,
    X0_CL: tl.constexpr, X1_CL: tl.constexpr, X2_CL: tl.constexpr,
    A_MODE: tl.constexpr, G_MODE: tl.constexpr, R_IS_H: tl.constexpr,
    H: tl.constexpr, P: tl.constexpr, WD: tl.constexpr, CD: tl.constexpr,
    I64: tl.constexpr, INTERP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid, b, pp, cc, mask = _tile_coords(C, HW, TILES, CT, I64, BLOCK_P, BLOCK_C)
    h = to_float(tl.load(x0_ptr + _tile_offsets(b, pp, cc, C, HW, X0_CL), mask=mask, other=0), CD, INTERP)
    s = _seed(tl.load(x1_ptr + _tile_offsets(b, pp, cc, C, HW, X1_CL), mask=mask, other=0), H, CD, INTERP)
    r = h
    if OP == 2:
        if not R_IS_H:
            r = _seed(tl.load(x2_ptr + _tile_offsets(b, pp, cc, C, HW, X2_CL), mask=mask, other=0), H, CD, INTERP)
    w = h  # STE: unused
    if OP != 3:
        a = _weight(a_ptr, b, 0, mask, A_MODE, a_sb, WD, INTERP)
        g = a
        if OP == 1:
            g = _weight(g_ptr, b, 0, mask, G_MODE, g_sb, WD, INTERP)
        w = _effective_weight(a, g, OP, H, P, CD, INTERP)
    y = _fwd_math(h, s, r, w, OP, INTERP)
    store(out_ptr + _tile_offsets(b, pp, cc, C, HW, OUT_CL), y, mask, INTERP)


@triton.jit
def _blend_tile_bwd_kernel(
    dx0_ptr, dx1_ptr, dx2_ptr, part_ptr,
    go_ptr, x0_ptr, x1_ptr, x2_ptr, a_ptr, g_ptr,
    C, HW, TILES, CT, a_sb, g_sb,
    OP: tl.constexpr, GO_CL: tl.constexpr,
    X0_CL: tl.constexpr, X1_CL: tl.constexpr, X2_CL: tl.constexpr,
    A_MODE: tl.constexpr, G_MODE: tl.constexpr, R_IS_H: tl.constexpr,
    W_DX0: tl.constexpr, W_DX1: tl.constexpr, W_DX2: tl.constexpr, NEED_W: tl.constexpr,
    LOAD_H: tl.constexpr, LOAD_S: tl.constexpr,
    H: tl.constexpr, P: tl.constexpr, WD: tl.constexpr, CD: tl.constexpr, RD: tl.constexpr,
    I64: tl.constexpr, INTERP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dx0, dx1, dx2 share the layouts of x0, x1, x2 (empty_like of dense operands).
    pid, b, pp, cc, mask = _tile_coords(C, HW, TILES, CT, I64, BLOCK_P, BLOCK_C)
    x0_off = _tile_offsets(b, pp, cc, C, HW, X0_CL)
    x1_off = _tile_offsets(b, pp, cc, C, HW, X1_CL)
    x2_off = _tile_offsets(b, pp, cc, C, HW, X2_CL)
    go = to_float(tl.load(go_ptr + _tile_offsets(b, pp, cc, C, HW, GO_CL), mask=mask, other=0), CD, INTERP)
    # operands the closed forms do not need are not read (placeholders keep the names bound)
    h = go
    s = go
    r = go
    if LOAD_H:
        h = to_float(tl.load(x0_ptr + x0_off, mask=mask, other=0), CD, INTERP)
    if LOAD_S:
        s = _seed(tl.load(x1_ptr + x1_off, mask=mask, other=0), H, CD, INTERP)
    if OP == 2:
        if R_IS_H:
            r = h
        else:
            r = _seed(tl.load(x2_ptr + x2_off, mask=mask, other=0), H, CD, INTERP)
    a = _weight(a_ptr, b, 0, mask, A_MODE, a_sb, WD, INTERP)
    g = a
    if OP == 1:
        g = _weight(g_ptr, b, 0, mask, G_MODE, g_sb, WD, INTERP)
    w = _effective_weight(a, g, OP, H, P, CD, INTERP)
    dh, ds_h, dwt = _bwd_math(go, h, s, r, w, OP, R_IS_H, NEED_W, H, CD, RD, INTERP)
    if W_DX0:
        store(dx0_ptr + x0_off, dh, mask, INTERP)
    if W_DX1:
        store(dx1_ptr + x1_off, ds_h, mask, INTERP)
    if OP == 2:
        if W_DX2:
            store(dx2_ptr + x2_off, -ds_h, mask, INTERP)
    if NEED_W:
        dwt = tl.where(mask, dwt, 0.0)
        tl.store(part_ptr + pid, tl.sum(tl.sum(dwt, axis=1), axis=0))


@triton.jit
def _weight_rows(ptr, bb, bm, MODE: tl.constexpr, SB, WD: tl.constexpr, INTERP: tl.constexpr):
    if MODE == 0:
        return tl.cast(ptr, WD)
    elif MODE == 1:
        return to_float(tl.load(ptr), WD, INTERP)
    else:
        return to_float(tl.load(ptr + bb * SB, mask=bm, other=0), WD, INTERP)


@triton.jit
def _finish_kernel(
    part_ptr, da_ptr, dg_ptr, a_ptr, g_ptr,
    B, CHUNKS, a_sb, g_sb,
    OP: tl.constexpr, A_MODE: tl.constexpr, G_MODE: tl.constexpr,
    H: tl.constexpr, P: tl.constexpr, WD: tl.constexpr,
    NEED_A: tl.constexpr, NEED_G: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: per-sample sums of the partials (float64, fixed order), chained through
    the clamps to alpha and gate; summed over samples for a scalar weight."""
    tot_a = tl.zeros([BLOCK_B], dtype=tl.float64)
    tot_g = tl.zeros([BLOCK_B], dtype=tl.float64)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        bm = bb < B
        acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float64)
        for k0 in range(0, CHUNKS, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            m2 = bm[:, None] & (kk[None, :] < CHUNKS)
            acc += tl.load(part_ptr + bb[:, None] * CHUNKS + kk[None, :], mask=m2, other=0).to(tl.float64)
        de = tl.sum(acc, axis=1)
        a = _weight_rows(a_ptr, bb, bm, A_MODE, a_sb, WD, INTERP)
        if OP == 1:
            g = _weight_rows(g_ptr, bb, bm, G_MODE, g_sb, WD, INTERP)
            ca = clamp01(a)
            cg = clamp01(g)
            p = round_to(ca * cg, P, INTERP)
            dp = tl.where(in01(p), de, 0.0)
            da = tl.where(in01(a), dp * cg.to(tl.float64), 0.0)
            dg = tl.where(in01(g), dp * ca.to(tl.float64), 0.0)
            if NEED_G:
                if G_MODE == 2:
                    store(dg_ptr + bb, dg, bm, INTERP)
                else:
                    tot_g += tl.where(bm, dg, 0.0)
        elif OP == 2:
            da = tl.where(in01(round_to(a, H, INTERP)), de, 0.0)
        else:
            da = tl.where(in01(a), de, 0.0)
        if NEED_A:
            if A_MODE == 2:
                store(da_ptr + bb, da, bm, INTERP)
            else:
                tot_a += tl.where(bm, da, 0.0)
    if NEED_A:
        if A_MODE != 2:
            store_scalar(da_ptr, tl.sum(tot_a, axis=0), INTERP)
    if NEED_G:
        if G_MODE != 2:
            store_scalar(dg_ptr, tl.sum(tot_g, axis=0), INTERP)


@triton.jit
def _gea_fwd_kernel(
    out_ptr, a_ptr, g_ptr, N, D1, D2,
    a_s0, a_s1, a_s2, g_s0, g_s1, g_s2,
    NDIM: tl.constexpr, A_MODE: tl.constexpr, G_MODE: tl.constexpr,
    P: tl.constexpr, WD: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N
    i0, i1, i2 = coords(j, D1, D2, NDIM)
    a = _weight(a_ptr, 0, i0 * a_s0 + i1 * a_s1 + i2 * a_s2, mask, A_MODE, 0, WD, INTERP)
    g = _weight(g_ptr, 0, i0 * g_s0 + i1 * g_s1 + i2 * g_s2, mask, G_MODE, 0, WD, INTERP)
    e = clamp01(round_to(clamp01(a) * clamp01(g), P, INTERP))
    store(out_ptr + j, e + tl.zeros([BLOCK], dtype=e.dtype), mask, INTERP)


@triton.jit
def _gea_bwd_kernel(
    da_ptr, dg_ptr, go_ptr, a_ptr, g_ptr, N, D1, D2,
    go_s0, go_s1, go_s2, a_s0, a_s1, a_s2, g_s0, g_s1, g_s2,
    NDIM: tl.constexpr, A_MODE: tl.constexpr, G_MODE: tl.constexpr,
    P: tl.constexpr, WD: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-element d(alpha) and d(gate) terms in float64 (summed to each shape on the host)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N
    i0, i1, i2 = coords(j, D1, D2, NDIM)
    go = to_float(tl.load(go_ptr + i0 * go_s0 + i1 * go_s1 + i2 * go_s2, mask=mask, other=0), tl.float64, INTERP)
    a = _weight(a_ptr, 0, i0 * a_s0 + i1 * a_s1 + i2 * a_s2, mask, A_MODE, 0, WD, INTERP)
    g = _weight(g_ptr, 0, i0 * g_s0 + i1 * g_s1 + i2 * g_s2, mask, G_MODE, 0, WD, INTERP)
    ca = clamp01(a)
    cg = clamp01(g)
    dp = tl.where(in01(round_to(ca * cg, P, INTERP)), go, 0.0)
    da = tl.where(in01(a), dp * cg.to(tl.float64), 0.0)
    dg = tl.where(in01(g), dp * ca.to(tl.float64), 0.0)
    tl.store(da_ptr + j, da, mask=mask)
    tl.store(dg_ptr + j, dg, mask=mask)


# ============================================================================ host side
_result_type_cache: dict = {}


def _result_type(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    key = (a.dtype, a.dim() == 0, b.dtype, b.dim() == 0)
    r = _result_type_cache.get(key)
    if r is None:
        ta = torch.empty(() if key[1] else (1,), dtype=a.dtype, device="meta")
        tb = torch.empty(() if key[3] else (1,), dtype=b.dtype, device="meta")
        r = _result_type_cache[key] = torch.result_type(ta, tb)
    return r


def _weight_mode(w: torch.Tensor, dev: torch.device) -> int:
    if w.numel() == 1:
        if w.device != dev or FORCE_VALUE_MODE:
            if w.dtype != torch.float64 and w.device.type == "cpu":
                return MODE_VALUE  # a CPU scalar beside device features: by value, no copy
        return MODE_PTR
    if w.dim() >= 2 and all(d == 1 for d in w.shape[1:]):
        return MODE_SAMPLE  # confirmed against the features' shape in _make_cfg
    return MODE_ELEM


def _weight_arg(w, mode, dev):
    if w is None:
        return None
    if mode == MODE_VALUE:
        return float(w.item())  # a CPU tensor: no device sync
    if w.device != dev:
        return w.to(dev, non_blocking=True)
    return w


def _warg(arg, fallback):
    return fallback if arg is None else arg


class _Cfg:
    """Everything about a launch that depends only on shapes, strides, dtypes and devices:
    built once per configuration and cached, so a call does no planning."""

    __slots__ = ("fallback", "tiled", "modes", "grid", "ints", "kw", "w_elem", "part_dtype", "fin_ints",
                 "fin_kw")


_cfg_cache: dict = {}


def _to_layout(x: torch.Tensor, shape, strides) -> torch.Tensor:
    out = torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device)
    out.copy_(x.expand(shape))
    return out


def _make_cfg(backward, op, shape, ref_strides, operands, weights, dev, H, P, M, need):
    cfg = _Cfg()
    modes = [MODE_PTR if w is None else _weight_mode(w, dev) for w in weights]
    nd = len(shape)
    for k, (m, w) in enumerate(zip(modes, weights)):
        if m == MODE_SAMPLE and not (w.dim() == nd and w.shape[0] == shape[0]):
            modes[k] = MODE_ELEM
    cfg.fallback = cfg.tiled = False
    if _make_tile_cfg(cfg, backward, op, shape, ref_strides, operands, weights, modes, H, P, M, need):
        return cfg
    n = 1
    for v in shape:
        n *= v
    split = False
    if MODE_SAMPLE in modes:
        split = C.batch_outermost(shape, ref_strides) and n // shape[0] >= MIN_SPLIT_INNER
        if not split:
            modes = [MODE_ELEM if m == MODE_SAMPLE else m for m in modes]
    welem = [w.expand(shape).stride() for m, w in zip(modes, weights) if m == MODE_ELEM]
    op_strides = tuple(ref_strides if x is None else x.stride() for x in operands) + tuple(welem)
    p = C.plan(shape, ref_strides, op_strides, split)
    cfg.fallback = p is None
    if p is None:
        return cfg
    block, warps = C.elementwise_block(p.inner)
    chunks = -(-p.inner // block)
    cfg.modes = modes
    cfg.grid = (p.B * chunks,)
    nops = len(operands)
    quads = [o[:4] for o in p.ops[:nops]]
    flats = [o[4] for o in p.ops[:nops]]
    k = nops
    wq = []
    for m, w in zip(modes, weights):
        if m == MODE_ELEM:
            wq.append(p.ops[k][:4])
            k += 1
        elif m == MODE_SAMPLE:
            wq.append((w.stride(0), 0, 0, 0))
        else:
            wq.append((0, 0, 0, 0))
    ints = [p.inner, p.d1, p.d2, chunks]
    for q in quads + wq:
        ints.extend(q)
    cfg.ints = tuple(ints)
    wdts = [w.dtype for w in weights if w is not None]
    CD = C.compute_dtype(H, *([M] if M is not None else []))
    WD = C.compute_dtype(*wdts, H, P)
    TD = C.compute_dtype(operands[1 if backward else 0].dtype)  # m's dtype (VALVE)
    kw = dict(
        OP=op, NDIM=p.ndim, A_MODE=modes[0], G_MODE=modes[1], R_IS_H=operands[-1] is None,
        H=C.tl_dtype(H), P=C.tl_dtype(P), WD=WD, CD=CD, TD=TD,
        I64=p.i64, INTERP=C.INTERPRET, BLOCK=block, num_warps=warps,
    )
    names = ("GO_FLAT", "X0_FLAT", "X1_FLAT", "X2_FLAT") if backward else ("X0_FLAT", "X1_FLAT", "X2_FLAT")
    kw.update(zip(names, flats))
    if backward:
        n0, n1, n2, na, ng = need
        need_w = bool(na or ng)
        cfg.w_elem = need_w and MODE_ELEM in modes
        RD = tl.float64 if H in (torch.float32, torch.float64) else tl.float32
        cfg.part_dtype = torch.float64 if RD == tl.float64 else torch.float32
        w_dx1 = bool(n1) and operands[2] is not None
        w_dx2 = bool(n2) and operands[3] is not None
        load_h, load_s = _backward_reads(op, operands[-1] is None, w_dx1, w_dx2, need_w)
        kw.update(W_DX0=bool(n0), W_DX1=w_dx1, W_DX2=w_dx2,
                  NEED_W=need_w, W_ELEM=cfg.w_elem, LOAD_H=load_h, LOAD_S=load_s, RD=RD)
        bk = min(C.next_pow2(chunks), 1024)
        bb = max(1, min(C.next_pow2(p.B), 4096 // bk))
        cfg.fin_ints = (p.B, chunks, wq[0][0], wq[1][0])
        cfg.fin_kw = dict(OP=op, A_MODE=modes[0], G_MODE=modes[1], H=C.tl_dtype(H), P=C.tl_dtype(P),
                          WD=WD, NEED_A=bool(na), NEED_G=bool(ng), INTERP=C.INTERPRET,
                          BLOCK_B=bb, BLOCK_K=bk)
    cfg.kw = kw
    return cfg


def _backward_reads(op, r_is_h, w_dx1, w_dx2, need_w):
    """(read h, read s): what a backward's closed forms need. The lerp's dh = g*(1-w) and
    ds = g*w need neither without a weight gradient; MULTIPLY needs s (and r) for tanh, and h
    only for ds, dr, the alpha term, or when r is h."""
    if op in (OP_ADD, OP_GATE):
        return need_w, need_w
    if op == OP_MUL:
        return bool(r_is_h or w_dx1 or w_dx2 or need_w), True
    return True, True


def _tile_blocks(channels, hw):
    """(BLOCK_P, BLOCK_C, num_warps) of the mixed-layout path: powers of two, about
    TILE_ELEMS elements, neither side starved (each operand's contiguous run is a whole row
    of the tile)."""
    bp0 = min(C.next_pow2(hw), 64)
    bc = min(C.next_pow2(channels), max(1, TILE_ELEMS // bp0))
    bp = min(C.next_pow2(hw), max(1, TILE_ELEMS // bc))
    return bp, bc, (4 if bp * bc <= 1024 else 8)


def _make_tile_cfg(cfg, backward, op, shape, ref_strides, operands, weights, modes, H, P, M, need):
    """The mixed-layout path (channels_last beside NCHW operands of one (B,C,H,W) shape, weights
    scalar or per-sample): fills `cfg` and returns True, or returns False to leave the call to
    the flat path (one layout everywhere, other layouts, ranks or weight shapes)."""
    if op not in (OP_ADD, OP_GATE, OP_MUL, OP_STE) or len(shape) != 4 or MODE_ELEM in modes:
        return False
    B, Cn, HW = shape[0], shape[1], shape[2] * shape[3]
    if B == 0 or Cn < 2 or HW < 2 or Cn * HW < MIN_SPLIT_INNER:
        return False
    ref = C.layout_4d(shape, ref_strides)
    classes = [None if x is None else C.layout_4d(shape, x.stride()) for x in operands]
    if ref is None or any(x is not None and c is None for x, c in zip(operands, classes)):
        return False
    if backward and classes[1] != ref:  # dx0 is written at x0's offsets
        return False
    if all(c is None or c == ref for c in classes):
        return False  # one layout: the flat path is already coalesced
    bp, bc, warps = _tile_blocks(Cn, HW)
    ct = -(-Cn // bc)
    tiles = -(-HW // bp) * ct
    cfg.tiled = True
    cfg.modes = modes
    cfg.w_elem = False
    cfg.grid = (B * tiles,)
    wsb = [w.stride(0) if m == MODE_SAMPLE else 0 for m, w in zip(modes, weights)]
    cfg.ints = (Cn, HW, tiles, ct, wsb[0], wsb[1])
    wdts = [w.dtype for w in weights if w is not None]
    CD = C.compute_dtype(H, *([M] if M is not None else []))
    WD = C.compute_dtype(*wdts, H, P)
    r_is_h = operands[-1] is None
    cl = [c == "cl" for c in classes]
    kw = dict(
        OP=op, A_MODE=modes[0], G_MODE=modes[1], R_IS_H=r_is_h,
        H=C.tl_dtype(H), P=C.tl_dtype(P), WD=WD, CD=CD,
        I64=B * Cn * HW + TILE_ELEMS >= C._I32_SAFE, INTERP=C.INTERPRET,
        BLOCK_P=bp, BLOCK_C=bc, num_warps=warps,
    )
    if backward:
        n0, n1, n2, na, ng = need
        need_w = bool(na or ng)
        RD = tl.float64 if H in (torch.float32, torch.float64) else tl.float32
        cfg.part_dtype = torch.float64 if RD == tl.float64 else torch.float32
        w_dx1 = bool(n1) and operands[2] is not None
        w_dx2 = bool(n2) and operands[3] is not None
        load_h, load_s = _backward_reads(op, r_is_h, w_dx1, w_dx2, need_w)
        kw.update(GO_CL=cl[0], X0_CL=cl[1], X1_CL=cl[2], X2_CL=cl[3],
                  W_DX0=bool(n0), W_DX1=w_dx1, W_DX2=w_dx2, NEED_W=need_w,
                  LOAD_H=load_h, LOAD_S=load_s, RD=RD)
        bk = min(C.next_pow2(tiles), 1024)
        bb = max(1, min(C.next_pow2(B), 4096 // bk))
        cfg.fin_ints = (B, tiles, wsb[0], wsb[1])
        cfg.fin_kw = dict(OP=op, A_MODE=modes[0], G_MODE=modes[1], H=C.tl_dtype(H), P=C.tl_dtype(P),
                          WD=WD, NEED_A=bool(na), NEED_G=bool(ng), INTERP=C.INTERPRET,
                          BLOCK_B=bb, BLOCK_K=bk)
    else:
        kw.update(OUT_CL=ref == "cl", X0_CL=cl[0], X1_CL=cl[1], X2_CL=cl[2])
    cfg.kw = kw
    return True


def _desc(t):
    return None if t is None else (t.stride(), t.dtype)


def _wdesc(w):
    return None if w is None else (w.shape, w.stride(), w.dtype, w.device)


def _get_cfg(backward, op, shape, ref_strides, operands, weights, dev, H, P, M, need=None):
    key = (backward, op, shape, ref_strides, tuple(_desc(x) for x in operands), _wdesc(weights[0]),
           _wdesc(weights[1]), dev, H, P, need, FORCE_VALUE_MODE)
    cfg = _cfg_cache.get(key)
    if cfg is None:
        if len(_cfg_cache) > 4096:
            _cfg_cache.clear()
        cfg = _cfg_cache[key] = _make_cfg(backward, op, shape, ref_strides, operands, weights,
                                          dev, H, P, M, need)
    return cfg


def _materialize(weights, shape, strides, dev):
    """Weights of general shapes as full tensors in the iteration layout (fallback only)."""
    out = []
    for w in weights:
        per_sample = w is not None and w.dim() == len(shape) and w.shape[0] == shape[0] and all(
            d == 1 for d in w.shape[1:])
        if w is None or w.numel() == 1 or per_sample:
            out.append(w)
        else:
            out.append(_to_layout(w.to(dev), shape, strides))
    return out


# ---------------------------------------------------------------------------- forward
def _forward(op, out, x0, x1, x2, alpha, gate, H, P, M=None):
    """Launch the forward kernel of `op` writing `out` (whose layout is the iteration's)."""
    if out.numel() == 0:
        return out
    dev = x0.device
    shape, rs = out.shape, out.stride()
    cfg = _get_cfg(False, op, shape, rs, (x0, x1, x2), (alpha, gate), dev, H, P, M)
    if cfg.fallback:
        # more than 3 inner dims no stride pattern coalesces: copy into the iteration layout
        x0, x1, x2 = (None if x is None else _to_layout(x, shape, rs) for x in (x0, x1, x2))
        alpha, gate = _materialize((alpha, gate), shape, rs, dev)
        cfg = _get_cfg(False, op, shape, rs, (x0, x1, x2), (alpha, gate), dev, H, P, M)
    a = _weight_arg(alpha, cfg.modes[0], dev)
    g = _weight_arg(gate, cfg.modes[1], dev)
    if cfg.tiled:
        _blend_tile_fwd_kernel[cfg.grid](
            out, x0, x0 if x1 is None else x1, x0 if x2 is None else x2,
            x0 if a is None else a, x0 if g is None else g, *cfg.ints, **cfg.kw)
        return out
    _blend_fwd_kernel[cfg.grid](
        out, x0, x0 if x1 is None else x1, x0 if x2 is None else x2,
        x0 if a is None else a, x0 if g is None else g, *cfg.ints, **cfg.kw)
    return out


# ---------------------------------------------------------------------------- backward
def _feature_grad_buffer(x: torch.Tensor, needed: bool):
    """(kernel operand, gradient buffer): the gradient shares the operand's strides, so a
    non-dense operand is first copied into the layout empty_like gives."""
    if C.is_dense(x):
        return x, (torch.empty_like(x) if needed else None)
    return torch.empty_like(x).copy_(x), (torch.empty_like(x) if needed else None)


def _backward(op, grad, x0, x1, x2, alpha, gate, need, H, P, M=None, red=None):
    """Launch the backward of `op`; need = (dx0, dx1, dx2, dalpha, dgate) flags. Returns the
    five gradients, None where not needed. `red`: the original (alpha, gate) when the
    fallback materialized them (their gradients are summed back to the original shapes)."""
    n0, n1, n2, na, ng = need
    if grad.dtype != H:
        grad = grad.to(H)
    dev = x0.device
    shape = x0.shape
    dx0 = torch.empty_like(x0) if (n0 or not C.is_dense(x0)) else None
    rs = x0.stride() if dx0 is None else dx0.stride()
    dx1 = dx2 = None
    if x1 is not None:
        x1, dx1 = _feature_grad_buffer(x1, n1)
    if x2 is not None:
        x2, dx2 = _feature_grad_buffer(x2, n2)
    ra, rg = (alpha, gate) if red is None else red
    if x0.numel() == 0:
        da = torch.zeros(ra.shape, dtype=ra.dtype, device=ra.device) if na else None
        dg = torch.zeros(rg.shape, dtype=rg.dtype, device=rg.device) if ng else None
        return (dx0 if n0 else None), dx1, dx2, da, dg
    need = (bool(n0), dx1 is not None, dx2 is not None, bool(na), bool(ng))
    cfg = _get_cfg(True, op, shape, rs, (grad, x0, x1, x2), (alpha, gate), dev, H, P, M, need)
    if cfg.fallback:
        cp = [None if x is None else _to_layout(x, shape, rs) for x in (grad, x0, x1, x2)]
        wa, wg = _materialize((alpha, gate), shape, rs, dev)
        r = _backward(op, cp[0], cp[1], cp[2], cp[3], wa, wg, need, H, P, M, red=(ra, rg))
        if dx1 is not None:
            dx1.copy_(r[1])
        if dx2 is not None:
            dx2.copy_(r[2])
        return (dx0.copy_(r[0]) if n0 else None), dx1, dx2, r[3], r[4]
    a = _weight_arg(alpha, cfg.modes[0], dev)
    g = _weight_arg(gate, cfg.modes[1], dev)
    dwe = part = None
    if na or ng:
        if cfg.w_elem:
            dwe = torch.empty_strided(shape, rs, dtype=cfg.part_dtype, device=dev)
        else:
            part = torch.empty(cfg.grid, dtype=cfg.part_dtype, device=dev)
    d = x0
    if cfg.tiled:
        _blend_tile_bwd_kernel[cfg.grid](
            d if dx0 is None else dx0, d if dx1 is None else dx1, d if dx2 is None else dx2,
            d if part is None else part,
            grad, x0, d if x1 is None else x1, d if x2 is None else x2,
            d if a is None else a, d if g is None else g, *cfg.ints, **cfg.kw)
    else:
        _blend_bwd_kernel[cfg.grid](
            d if dx0 is None else dx0, d if dx1 is None else dx1, d if dx2 is None else dx2,
            d if dwe is None else dwe, d if part is None else part,
            grad, x0, d if x1 is None else x1, d if x2 is None else x2,
            d if a is None else a, d if g is None else g, *cfg.ints, **cfg.kw)
    da = dg = None
    if na or ng:
        if cfg.w_elem:
            da, dg = _weight_grads_from_elements(op, dwe, ra, rg, na, ng, H=H, P=P)
        else:
            da = torch.empty(ra.shape, dtype=ra.dtype, device=dev) if na else None
            dg = torch.empty(rg.shape, dtype=rg.dtype, device=dev) if ng else None
            _finish_kernel[(1,)](
                part, part if da is None else da, part if dg is None else dg,
                part if a is None else a, part if g is None else g, *cfg.fin_ints, **cfg.fin_kw)
            if da is not None and da.device != ra.device:
                da = da.to(ra.device)
            if dg is not None and dg.device != rg.device:
                dg = dg.to(rg.device)
    return (dx0 if n0 else None), dx1, dx2, da, dg


def _in01(x):
    return (x >= 0) & (x <= 1)


def _weight_grads_from_elements(op, dwe, alpha, gate, na, ng, *, H, P):
    """Slow path for weights of general broadcast shapes: per-element terms summed to the
    weight's shape in float64 by torch (deterministic), then chained through the clamps."""
    dev = dwe.device
    zero = torch.zeros((), dtype=torch.float64, device=dev)

    def to_shape(x, w):
        return (x.sum_to_size(w.shape) if w.dim() else x.sum()).to(w.dtype).to(w.device)

    if op != OP_GATE:
        d = dwe.to(torch.float64)
        d = d.sum_to_size(alpha.shape) if alpha.dim() else d.sum()
        a = alpha.to(dev)
        masked_on = a.to(H) if op == OP_MUL else a
        return torch.where(_in01(masked_on), d, zero).to(alpha.dtype).to(alpha.device), None
    eshape = validation.broadcast_shape(alpha.shape, gate.shape)
    de = dwe.to(torch.float64)
    de = de.sum_to_size(eshape) if len(eshape) else de.sum()
    a, g = alpha.to(dev), gate.to(dev)
    wd = torch.float64 if torch.float64 in (alpha.dtype, gate.dtype, H) else torch.float32
    ca, cg = a.to(wd).clamp(0, 1), g.to(wd).clamp(0, 1)
    dp = torch.where(_in01((ca * cg).to(P)), de, zero)
    da = to_shape(torch.where(_in01(a), dp * cg.double(), zero), alpha) if na else None
    dg = to_shape(torch.where(_in01(g), dp * ca.double(), zero), gate) if ng else None
    return da, dg


# ============================================================================ op bodies
def _add_fwd(h, s, alpha):
    return _forward(OP_ADD, torch.empty_like(h), h, s, None, alpha, None, h.dtype, h.dtype)


def _gate_fwd(h, s, alpha, gate):
    return _forward(OP_GATE, torch.empty_like(h), h, s, None, alpha, gate, h.dtype, _result_type(alpha, gate))


def _mul_fwd(h, s, alpha, r):
    return _forward(OP_MUL, torch.empty_like(h), h, s, r, alpha, None, h.dtype, h.dtype)


def _ste_fwd(h, s):
    return _forward(OP_STE, torch.empty_like(h), h, s, None, None, None, h.dtype, h.dtype)


def _valve_fwd(alpha, m):
    U = _result_type(alpha, m)
    return _forward(OP_VALVE, torch.empty_like(m, dtype=U), m, None, None, alpha, None, U, U, m.dtype)


def _add_bwd(grad, h, s, alpha, need):
    dh, ds, _, da, _ = _backward(OP_ADD, grad, h, s, None, alpha, None,
                                 (need[0], need[1], False, need[2], False), h.dtype, h.dtype)
    return dh, ds, da


def _gate_bwd(grad, h, s, alpha, gate, need):
    dh, ds, _, da, dg = _backward(OP_GATE, grad, h, s, None, alpha, gate,
                                  (need[0], need[1], False, need[2], need[3]), h.dtype,
                                  _result_type(alpha, gate))
    return dh, ds, da, dg


def _mul_bwd(grad, h, s, alpha, r, need):
    dh, ds, dr, da, _ = _backward(OP_MUL, grad, h, s, r, alpha, None,
                                  (need[0], need[1], r is not None and need[3], need[2], False),
                                  h.dtype, h.dtype)
    return dh, ds, da, dr


def _valve_bwd(grad, alpha, m, need):
    U = _result_type(alpha, m)
    dm, _, _, da, _ = _backward(OP_VALVE, grad, m, None, None, alpha, None,
                                (need[1], False, False, need[0], False), U, U, m.dtype)
    return da, dm


def _pair_device(alpha, gate):
    if alpha.dim() == 0 and alpha.device.type == "cpu":
        return gate.device
    return alpha.device


def _gea_setup(shape, alpha, gate, dev, operands=()):
    n = 1
    for v in shape:
        n *= v
    modes, args, strides = [], [], []
    for w in (alpha, gate):
        if w.device != dev or (FORCE_VALUE_MODE and w.numel() == 1):
            if w.numel() == 1 and w.dtype != torch.float64 and w.device.type == "cpu":
                modes.append(MODE_VALUE)
                args.append(float(w.item()))
                strides.append((0,) * len(shape))
                continue
            w = w.to(dev, non_blocking=True)
        modes.append(MODE_ELEM)
        args.append(w)
        strides.append(w.expand(shape).stride())
    ref = torch.empty(shape, device="meta").stride()
    p = C.plan(tuple(shape), ref, tuple(o.stride() for o in operands) + tuple(strides), False)
    if p is None:
        operands = tuple(o.contiguous() for o in operands)
        for k in range(2):
            if modes[k] == MODE_ELEM:
                args[k] = args[k].expand(shape).contiguous()
                strides[k] = ref
        p = C.plan(tuple(shape), ref, tuple(o.stride() for o in operands) + tuple(strides), False)
    return n, p, modes, args, operands


def _gea_fwd(alpha, gate):
    shape = validation.broadcast_shape(alpha.shape, gate.shape)
    P = _result_type(alpha, gate)
    dev = _pair_device(alpha, gate)
    out = torch.empty(shape, dtype=P, device=dev)
    if out.numel() == 0:
        return out
    n, p, modes, args, _ = _gea_setup(shape, alpha, gate, dev)
    WD = C.compute_dtype(alpha.dtype, gate.dtype)
    block = min(1024, max(16, C.next_pow2(n)))
    qs = [o[1:4] for o in p.ops]
    _gea_fwd_kernel[(-(-n // block),)](
        out, _warg(args[0], out), _warg(args[1], out), n, p.d1, p.d2, *qs[0], *qs[1],
        NDIM=p.ndim, A_MODE=modes[0], G_MODE=modes[1], P=C.tl_dtype(P), WD=WD,
        INTERP=C.INTERPRET, BLOCK=block,
    )
    return out


def _gea_bwd(grad, alpha, gate, need):
    shape = validation.broadcast_shape(alpha.shape, gate.shape)
    P = _result_type(alpha, gate)
    dev = _pair_device(alpha, gate)
    da_e = torch.empty(shape, dtype=torch.float64, device=dev)
    dg_e = torch.empty(shape, dtype=torch.float64, device=dev)
    if da_e.numel() > 0:
        n, p, modes, args, (gk,) = _gea_setup(shape, alpha, gate, dev, (grad,))
        WD = C.compute_dtype(alpha.dtype, gate.dtype)
        block = min(1024, max(16, C.next_pow2(n)))
        qs = [o[1:4] for o in p.ops]
        _gea_bwd_kernel[(-(-n // block),)](
            da_e, dg_e, gk, _warg(args[0], gk), _warg(args[1], gk), n, p.d1, p.d2,
            *qs[0], *qs[1], *qs[2],
            NDIM=p.ndim, A_MODE=modes[0], G_MODE=modes[1], P=C.tl_dtype(P), WD=WD,
            INTERP=C.INTERPRET, BLOCK=block,
        )
    else:
        da_e.zero_()
        dg_e.zero_()

    def reduce(d, w):
        d = d.sum_to_size(w.shape) if w.dim() else d.sum()
        return d.to(w.dtype).to(w.device)

    da = reduce(da_e, alpha) if need[0] else None
    dg = reduce(dg_e, gate) if need[1] else None
    return da, dg


# ============================================================================ torch.library
def _define(name, schema, impl, fake):
    op = torch.library.custom_op(f"kasmina::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _none_to_empty(t, like):
    return C.empty_placeholder(like) if t is None else t


def _like_h3(h, s, alpha):
    return torch.empty_like(h)


def _like_h4(h, s, alpha, w):
    return torch.empty_like(h)


# ---- ADD
def _add_impl(h, s, alpha):
    return _add_fwd(h, s, alpha)


def _add_bwd_impl(grad, h, s, alpha, need):
    dh, ds, da = _add_bwd(grad, h, s, alpha, need)
    return _none_to_empty(dh, h), _none_to_empty(ds, s), _none_to_empty(da, alpha)


def _add_bwd_fake(grad, h, s, alpha, need):
    return (
        torch.empty_like(h) if need[0] else C.empty_placeholder(h),
        torch.empty_like(s) if need[1] else C.empty_placeholder(s),
        alpha.new_empty(alpha.shape) if need[2] else C.empty_placeholder(alpha),
    )


_add_op_def = _define(
    "triton_blend_add", "(Tensor h, Tensor s, Tensor alpha) -> Tensor", _add_impl, _like_h3)
_add_bwd_op_def = _define(
    "triton_blend_add_backward",
    "(Tensor grad, Tensor h, Tensor s, Tensor alpha, bool[] need) -> (Tensor, Tensor, Tensor)",
    _add_bwd_impl, _add_bwd_fake)


# ---- GATE
def _gate_impl(h, s, alpha, gate):
    return _gate_fwd(h, s, alpha, gate)


def _gate_bwd_impl(grad, h, s, alpha, gate, need):
    dh, ds, da, dg = _gate_bwd(grad, h, s, alpha, gate, need)
    return (_none_to_empty(dh, h), _none_to_empty(ds, s), _none_to_empty(da, alpha),
            _none_to_empty(dg, gate))


def _gate_bwd_fake(grad, h, s, alpha, gate, need):
    return (
        torch.empty_like(h) if need[0] else C.empty_placeholder(h),
        torch.empty_like(s) if need[1] else C.empty_placeholder(s),
        alpha.new_empty(alpha.shape) if need[2] else C.empty_placeholder(alpha),
        gate.new_empty(gate.shape) if need[3] else C.empty_placeholder(gate),
    )


_gate_op_def = _define(
    "triton_blend_gate", "(Tensor h, Tensor s, Tensor alpha, Tensor gate) -> Tensor",
    _gate_impl, _like_h4)
_gate_bwd_op_def = _define(
    "triton_blend_gate_backward",
    "(Tensor grad, Tensor h, Tensor s, Tensor alpha, Tensor gate, bool[] need)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    _gate_bwd_impl, _gate_bwd_fake)


# ---- MULTIPLY
def _mul_impl(h, s, alpha, seed_input):
    return _mul_fwd(h, s, alpha, seed_input)


def _mul_bwd_impl(grad, h, s, alpha, seed_input, need):
    dh, ds, da, dr = _mul_bwd(grad, h, s, alpha, seed_input, need)
    return (_none_to_empty(dh, h), _none_to_empty(ds, s), _none_to_empty(da, alpha),
            _none_to_empty(dr, h if seed_input is None else seed_input))


def _mul_bwd_fake(grad, h, s, alpha, seed_input, need):
    r = seed_input
    return (
        torch.empty_like(h) if need[0] else C.empty_placeholder(h),
        torch.empty_like(s) if need[1] else C.empty_placeholder(s),
        alpha.new_empty(alpha.shape) if need[2] else C.empty_placeholder(alpha),
        torch.empty_like(r) if (r is not None and need[3]) else C.empty_placeholder(h if r is None else r),
    )


_mul_op_def = _define(
    "triton_blend_multiply",
    "(Tensor h, Tensor s, Tensor alpha, Tensor? seed_input) -> Tensor",
    _mul_impl, _like_h4)
_mul_bwd_op_def = _define(
    "triton_blend_multiply_backward",
    "(Tensor grad, Tensor h, Tensor s, Tensor alpha, Tensor? seed_input, bool[] need)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    _mul_bwd_impl, _mul_bwd_fake)


# ---- STE
def _ste_impl(h, s):
    return _ste_fwd(h, s)


def _ste_fake(h, s):
    return torch.empty_like(h)


_ste_op_def = _define("triton_ste_forward", "(Tensor h, Tensor s) -> Tensor", _ste_impl, _ste_fake)


# ---- valve multiplier
def _valve_bwd_impl(grad, alpha, m, need):
    da, dm = _valve_bwd(grad, alpha, m, need)
    return _none_to_empty(da, alpha), _none_to_empty(dm, m)


def _valve_fake(alpha, m):
    return torch.empty_like(m, dtype=_result_type(alpha, m))


def _valve_bwd_fake(grad, alpha, m, need):
    return (
        alpha.new_empty(alpha.shape) if need[0] else C.empty_placeholder(alpha),
        torch.empty_like(m) if need[1] else C.empty_placeholder(m),
    )


def _valve_impl(alpha, m):
    return _valve_fwd(alpha, m)


_valve_op_def = _define(
    "triton_multiply_valve_multiplier", "(Tensor alpha, Tensor m) -> Tensor", _valve_impl, _valve_fake)
_valve_bwd_op_def = _define(
    "triton_multiply_valve_multiplier_backward",
    "(Tensor grad, Tensor alpha, Tensor m, bool[] need) -> (Tensor, Tensor)",
    _valve_bwd_impl, _valve_bwd_fake)


# ---- gate effective alpha
def _gea_fake(alpha, gate):
    shape = torch.broadcast_shapes(alpha.shape, gate.shape)
    return torch.empty(shape, dtype=_result_type(alpha, gate), device=_pair_device(alpha, gate))


def _gea_bwd_impl(grad, alpha, gate, need):
    da, dg = _gea_bwd(grad, alpha, gate, need)
    return _none_to_empty(da, alpha), _none_to_empty(dg, gate)


def _gea_bwd_fake(grad, alpha, gate, need):
    return (
        alpha.new_empty(alpha.shape) if need[0] else C.empty_placeholder(alpha),
        gate.new_empty(gate.shape) if need[1] else C.empty_placeholder(gate),
    )


def _gea_impl(alpha, gate):
    return _gea_fwd(alpha, gate)


_gea_op_def = _define(
    "triton_gate_effective_alpha", "(Tensor alpha, Tensor gate) -> Tensor", _gea_impl, _gea_fake)
_gea_bwd_op_def = _define(
    "triton_gate_effective_alpha_backward",
    "(Tensor grad, Tensor alpha, Tensor gate, bool[] need) -> (Tensor, Tensor)",
    _gea_bwd_impl, _gea_bwd_fake)


# Bound once: an OpOverload call is the cheapest way into the dispatcher.
_ops = torch.ops.kasmina
add_op = _ops.triton_blend_add.default
add_bwd_op = _ops.triton_blend_add_backward.default
gate_op = _ops.triton_blend_gate.default
gate_bwd_op = _ops.triton_blend_gate_backward.default
mul_op = _ops.triton_blend_multiply.default
mul_bwd_op = _ops.triton_blend_multiply_backward.default
ste_op = _ops.triton_ste_forward.default
valve_op = _ops.triton_multiply_valve_multiplier.default
valve_bwd_op = _ops.triton_multiply_valve_multiplier_backward.default
gea_op = _ops.triton_gate_effective_alpha.default
gea_bwd_op = _ops.triton_gate_effective_alpha_backward.default


_grads = C.select_grads


# ---- autograd for the registered ops (what torch.compile and other tracers see)
def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _add_op_backward(ctx, grad):
    h, s, alpha = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:3])
    return _grads(need, add_bwd_op(grad, h, s, alpha, need))


def _gate_op_backward(ctx, grad):
    h, s, alpha, gate = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:4])
    return _grads(need, gate_bwd_op(grad, h, s, alpha, gate, need))


def _mul_op_backward(ctx, grad):
    h, s, alpha, r = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:4])
    return _grads(need, mul_bwd_op(grad, h, s, alpha, r, need))


def _mul_save(ctx, inputs, output):
    h, s, alpha, r = inputs
    ctx.save_for_backward(h, s, alpha, r)


def _ste_save(ctx, inputs, output):
    ctx.seed_dtype = inputs[1].dtype


def _ste_op_backward(ctx, grad):
    ds = grad if grad.dtype == ctx.seed_dtype else grad.to(ctx.seed_dtype)
    return grad, ds


def _valve_op_backward(ctx, grad):
    alpha, m = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:2])
    return _grads(need, valve_bwd_op(grad, alpha, m, need))


def _gea_op_backward(ctx, grad):
    alpha, gate = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:2])
    return _grads(need, gea_bwd_op(grad, alpha, gate, need))


_add_op_def.register_autograd(_add_op_backward, setup_context=_save_inputs)
_gate_op_def.register_autograd(_gate_op_backward, setup_context=_save_inputs)
_mul_op_def.register_autograd(_mul_op_backward, setup_context=_mul_save)
_ste_op_def.register_autograd(_ste_op_backward, setup_context=_ste_save)
_valve_op_def.register_autograd(_valve_op_backward, setup_context=_save_inputs)
_gea_op_def.register_autograd(_gea_op_backward, setup_context=_save_inputs)


# ---- eager autograd: the same kernels without a dispatcher round trip per call
_AddFn = C.saving_function("_AddFn", _add_fwd, _add_bwd, add_bwd_op)
_GateFn = C.saving_function("_GateFn", _gate_fwd, _gate_bwd, gate_bwd_op)
_MulFn = C.saving_function("_MulFn", _mul_fwd, _mul_bwd, mul_bwd_op)
_ValveFn = C.saving_function("_ValveFn", _valve_fwd, _valve_bwd, valve_bwd_op)
_GeaFn = C.saving_function("_GeaFn", _gea_fwd, _gea_bwd, gea_bwd_op)


class _SteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, s):
        ctx.seed_dtype = s.dtype
        return _ste_fwd(h, s)

    @staticmethod
    def backward(ctx, grad):
        return _ste_op_backward(ctx, grad)


# ============================================================================ public entry points
def blend_add(h, s, alpha):
    return C.call_fused(_AddFn, _add_fwd, add_op, h, s, alpha)


def blend_with_isolation(h, s, alpha):
    return blend_add(h, s, alpha)


def blend_gate(h, s, alpha, gate):
    return C.call_fused(_GateFn, _gate_fwd, gate_op, h, s, alpha, gate)


def blend_multiply(h, s, alpha, *, seed_input=None):
    return C.call_fused(_MulFn, _mul_fwd, mul_op, h, s, alpha, seed_input)


def ste_forward(h, s):
    return C.call_fused(_SteFn, _ste_fwd, ste_op, h, s)


def multiply_valve_multiplier(alpha, m):
    return C.call_fused(_ValveFn, _valve_fwd, valve_op, alpha, m)


def gate_effective_alpha(alpha, gate):
    return C.call_fused(_GeaFn, _gea_fwd, gea_op, alpha, gate)
