"""A long-double oracle for float64 cases (see `equivalence.py` for why).

The math of docs/semantics.md#operators and its closed-form gradients, in numpy long double (a 64-bit
significand on x86-64, 11 bits more than float64), so that eager float64's own error against
it is measurable. Rounding points of the references do not exist in float64 (every cast is
exact), so plain math is the right oracle. `test_oracles.py` checks it against the float64
reference.
"""

from __future__ import annotations

import numpy as np
import torch

L = np.longdouble

__all__ = ["longdouble_oracle", "LONGDOUBLE_IS_EXTENDED"]

# Only meaningful where long double is wider than float64.
LONGDOUBLE_IS_EXTENDED = np.finfo(L).nmant > np.finfo(np.float64).nmant


def _a(t):
    if t is None:
        return None
    return t.detach().to(torch.float64).cpu().numpy().astype(L)


def _clamp01(x):
    return np.clip(x, L(0), L(1))


def _mask01(x):
    return ((x >= 0) & (x <= 1)).astype(L)


def _sum_to(x, shape):
    """Sums a broadcast array back to `shape` (torch's sum_to_size)."""
    shape = tuple(shape)
    x = np.asarray(x, dtype=L)
    lead = x.ndim - len(shape)
    if lead:
        x = x.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if axes:
        x = x.sum(axis=axes, keepdims=True)
    return x.reshape(shape)


def _lerp(h, s, w, g):
    y = h + w * (s - h)
    if g is None:
        return y, None
    return y, {"h": g * (1 - w), "s": g * w, "w": g * (s - h)}


def _op_grads(op, A, g, topology):
    """Forward value and per-argument gradients (None grads when g is None)."""
    if op in ("blend_add", "blend_with_isolation"):
        a = A["alpha"]
        y, d = _lerp(A["h"], A["s"], _clamp01(a), g)
        if d is None:
            return y, {}
        return y, {"h": d["h"], "s": d["s"], "alpha": _sum_to(d["w"] * _mask01(a), a.shape)}
    if op == "blend_gate":
        a, gt = A["alpha"], A["gate"]
        ca, cg = _clamp01(a), _clamp01(gt)
        p = ca * cg
        e = _clamp01(p)
        y, d = _lerp(A["h"], A["s"], e, g)
        if d is None:
            return y, {}
        de = _sum_to(d["w"], e.shape) * _mask01(p)
        eshape = np.broadcast_shapes(a.shape, gt.shape)
        return y, {
            "h": d["h"],
            "s": d["s"],
            "alpha": _sum_to(np.broadcast_to(de * cg * _mask01(a), eshape), a.shape),
            "gate": _sum_to(np.broadcast_to(de * ca * _mask01(gt), eshape), gt.shape),
        }
    if op == "gate_effective_alpha":
        a, gt = A["alpha"], A["gate"]
        ca, cg = _clamp01(a), _clamp01(gt)
        p = ca * cg
        y = _clamp01(p)
        if g is None:
            return y, {}
        dp = g * _mask01(p)
        return y, {
            "alpha": _sum_to(dp * cg * _mask01(a), a.shape),
            "gate": _sum_to(dp * ca * _mask01(gt), gt.shape),
        }
    if op == "blend_multiply":
        h, s, a, r = A["h"], A["s"], A["alpha"], A["seed_input"]
        r_is_h = r is None
        rr = h if r_is_h else r
        c = _clamp01(a)
        t = np.tanh(s - rr)
        y = h * (1 + c * t)
        if g is None:
            return y, {}
        ds = g * h * c * (1 - t * t)
        dh = g * (1 + c * t)
        out = {"h": dh - ds if r_is_h else dh, "s": ds,
               "alpha": _sum_to(g * h * t * _mask01(a), a.shape)}
        if not r_is_h:
            out["seed_input"] = -ds
        return y, out
    if op == "ste_forward":
        h, s = A["h"], A["s"]
        y = h + (s - s)
        return y, ({} if g is None else {"h": g, "s": g})
    if op == "multiply_valve_multiplier":
        a, m = A["alpha"], A["m"]
        c = _clamp01(a)
        t = np.tanh(m)
        y = 1 + c * t
        if g is None:
            return y, {}
        return y, {"m": g * c * (1 - t * t), "alpha": _sum_to(g * t * _mask01(a), a.shape)}
    if op == "gated_pool":
        x = A["x"]
        axes = (2, 3) if topology == "cnn" else (1,)
        n = int(np.prod([x.shape[i] for i in axes]))
        y = x.sum(axis=axes) / L(n)
        if g is None:
            return y, {}
        gx = np.expand_dims(g, axes) / L(n)
        return y, {"x": np.broadcast_to(gx, x.shape)}
    if op == "gate_network":
        x, w1, b1, w2, b2 = (A[k] for k in ("x", "w1", "b1", "w2", "b2"))
        axes = (2, 3) if topology == "cnn" else (1,)
        n = int(np.prod([x.shape[i] for i in axes]))
        pooled = x.sum(axis=axes) / L(n)  # (B, C)
        pre = pooled @ w1.T + b1  # (B, hidden)
        hid = np.maximum(pre, L(0))
        z = hid @ w2.T + b2  # (B, 1)
        y = 1 / (1 + np.exp(-z))
        yshape = (-1, 1, 1, 1) if topology == "cnn" else (-1, 1, 1)
        if g is None:
            return y.reshape(yshape), {}
        dz = g.reshape(-1, 1) * y * (1 - y)
        dhid = (dz @ w2) * (hid > 0)
        dpooled = dhid @ w1
        gx = np.expand_dims(dpooled, axes) / L(n)
        return y.reshape(yshape), {
            "x": np.broadcast_to(gx, x.shape),
            "w1": dhid.T @ pooled,
            "b1": dhid.sum(axis=0),
            "w2": dz.T @ hid,
            "b2": dz.sum(axis=0),
        }
    raise AssertionError(op)


def longdouble_oracle(op, leaves, requires, grad_out, *, topology=None, inference=False):
    """{"y": ..., "d<name>": ...} in long double for the leaves named in `requires`
    (gradients of aliased leaves summed, as autograd does)."""
    A = {n: (_a(t) if isinstance(t, torch.Tensor) else t) for n, t in leaves.items()}
    g = None if (inference or not requires) else _a(grad_out)
    with np.errstate(all="ignore"):
        y, grads = _op_grads(op, A, g, topology)
        out = {"y": np.asarray(y, dtype=L)}
        for n in requires:
            total = None
            for m, gm in grads.items():
                if leaves.get(m) is not None and leaves[m] is leaves[n]:
                    total = gm if total is None else total + gm
            out["d" + n] = np.asarray(total, dtype=L)
    return out
