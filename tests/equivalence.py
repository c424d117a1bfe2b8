"""The equivalence rule of DESIGN.md section 5, implemented once.

A kernel output matches the reference when:

1. elementwise outputs (``y``, ``dh``, ``ds``, ``dr``, ``dm``, the pooled ``dx``) pass
   ``torch.testing.assert_close(kernel, reference)`` with the dtype's default ``rtol`` and
   ``atol`` = one ulp of the dtype at the output's scale, ``max |reference|``;
2. every output, reductions included, has ``max |kernel - oracle|`` at most
   ``2 * max |eager reference - oracle| + 1 ulp`` (same ulp), where the oracle is the
   reference run on the same inputs upcast to float64;
3. NaN, +Inf and -Inf sit in exactly the same places as in the reference.

"One ulp of dtype at scale x" is the spacing of that dtype's numbers just below or at x:
``2 ** floor(log2 x) * finfo(dtype).eps`` (never less than the dtype's smallest subnormal).
``finfo.eps * x`` would be up to twice that; we use the exact spacing.

Which dtype: an output is judged in its own dtype (a bf16 host's fp32 seed gradient at fp32
precision: the references round through the host's dtype at fixed points, and DESIGN section 2
says those rounding points matter, so a kernel must reproduce them).

float64: the oracle of rule 2 is "the reference on inputs upcast to float64", which for float64
inputs is the eager reference itself; eager's own error would then be 0 by construction and the
rule would demand agreement with eager to 1 ulp, i.e. the same summation order and the same
tanh. That is not what the rule measures for the other dtypes (an oracle far more precise than
the dtype under test), so for float64 cases the oracle is `longdouble_oracle` in
`oracles.py`: the section-2 math and its closed-form gradients in numpy long double (64-bit
significand on x86-64), against which eager float64's own error is measurable.

Poisoning: no public op or ``torch.ops.kasmina`` op takes an ``out=`` tensor, and gradients
come out of autograd, so the test cannot pre-fill the buffers a kernel writes. Instead
``test_poisoned.py`` runs every case's kernel again in a subprocess under glibc's
``MALLOC_PERTURB_`` (``poison_check.py``): every fresh allocation is then filled with 0x7F
bytes (3.4e38 in float32/bfloat16, NaN in float16, 1.4e306 in float64), and an output element
still holding them was never written.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

import numpy as np
import torch

__all__ = [
    "ulp",
    "least_precise",
    "tolerance_dtype",
    "case_generator",
    "upcast",
    "run_forward_backward",
    "assert_equivalent",
    "EquivalenceError",
]


class EquivalenceError(AssertionError):
    pass


# ----------------------------------------------------------------------------- ulps
def ulp(dtype: torch.dtype, scale: float) -> float:
    """One ulp of `dtype` at magnitude `scale`: 2**floor(log2 scale) * eps, floored at the
    dtype's smallest subnormal (so a zero scale still demands an exact match)."""
    fi = torch.finfo(dtype)
    smallest = fi.tiny * fi.eps  # smallest subnormal
    scale = abs(float(scale))
    if not math.isfinite(scale):
        raise ValueError(f"ulp at a non-finite scale {scale}")
    if scale == 0.0:
        return smallest
    _, exp = math.frexp(scale)  # scale = m * 2**exp, 0.5 <= m < 1
    return max(math.ldexp(fi.eps, exp - 1), smallest)


def _precision_key(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    floats = [d for d in dtypes if d.is_floating_point]
    return max(floats, key=_precision_key)


def tolerance_dtype(output_dtype: torch.dtype) -> torch.dtype:
    return output_dtype


_DEFAULT_RTOL = {
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 1.3e-6,
    torch.float64: 1e-7,
}


# ----------------------------------------------------------------------------- inputs
def case_generator(case_id: str) -> torch.Generator:
    """A generator seeded by the case id: every case draws fresh inputs, reproducibly."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(case_id.encode()))
    return g


def upcast(t):
    """Floating tensors to float64 (aliasing is handled by the caller); others unchanged."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().to(torch.float64)
    return t


# ----------------------------------------------------------------------------- running
def run_forward_backward(
    fn: Callable,
    leaves: dict[str, torch.Tensor],
    call: Callable[[Callable, dict[str, torch.Tensor]], torch.Tensor],
    requires: tuple[str, ...],
    grad_out: torch.Tensor | None,
    *,
    inference: bool = False,
    upcast_inputs: bool = False,
) -> dict[str, torch.Tensor]:
    """Runs `call(fn, leaves')` where leaves' are fresh leaf tensors (float64 copies when
    `upcast_inputs`), then the gradient of every leaf named in `requires` for the upstream
    gradient `grad_out`. Aliased leaves (the same tensor object under two names) stay aliased.
    Returns {"y": output, "d<name>": gradient, ...}."""
    made: dict[int, torch.Tensor] = {}
    fresh: dict[str, torch.Tensor] = {}
    for name, t in leaves.items():
        if t is None or not isinstance(t, torch.Tensor):
            fresh[name] = t
            continue
        key = id(t)
        if key not in made:
            base = upcast(t) if upcast_inputs else t.detach()
            wants = any(leaves[n] is t for n in requires)
            if wants and not inference:
                base = base.requires_grad_(True)
            made[key] = base
        fresh[name] = made[key]
    if inference:
        with torch.inference_mode():
            y = call(fn, fresh)
        return {"y": y}
    y = call(fn, fresh)
    out = {"y": y.detach()}
    names = [n for n in requires if fresh.get(n) is not None]
    unique: list[torch.Tensor] = []
    for n in names:
        if not any(fresh[n] is u for u in unique):
            unique.append(fresh[n])
    if unique:
        g = grad_out.to(torch.float64) if upcast_inputs else grad_out
        grads = torch.autograd.grad(y, unique, g, allow_unused=False)
        for n in names:
            for u, gr in zip(unique, grads):
                if fresh[n] is u:
                    out["d" + n] = gr
    return out


# ----------------------------------------------------------------------------- comparing
def _finite_max_abs(t: torch.Tensor) -> float:
    t = t.detach().to(torch.float64)
    t = t[torch.isfinite(t)]
    return float(t.abs().max()) if t.numel() else 0.0


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} strides={t.stride()}"


def _first_mismatch(k: torch.Tensor, r: torch.Tensor, bad: torch.Tensor) -> str:
    idx = bad.nonzero()
    if idx.numel() == 0:
        return ""
    first = tuple(int(i) for i in idx[0])
    return (
        f"{int(bad.sum())} of {bad.numel()} elements; first at {first}: "
        f"kernel={k[first].item()!r} reference={r[first].item()!r}"
    )


def check_nonfinite(name: str, k: torch.Tensor, r: torch.Tensor) -> None:
    """Rule 3: NaN, +Inf, -Inf in the same places."""
    k64, r64 = k.detach().to(torch.float64), r.detach().to(torch.float64)
    for label, pred in (
        ("NaN", torch.isnan),
        ("+Inf", lambda t: torch.isposinf(t)),
        ("-Inf", lambda t: torch.isneginf(t)),
    ):
        bad = pred(k64) != pred(r64)
        if bool(bad.any()):
            raise EquivalenceError(f"{name}: {label} placement differs: {_first_mismatch(k64, r64, bad)}")


def check_elementwise(name: str, k: torch.Tensor, r: torch.Tensor, tol_dtype: torch.dtype) -> None:
    """Rule 1: assert_close with the dtype's rtol and atol = 1 ulp at max |reference|."""
    atol = ulp(tol_dtype, _finite_max_abs(r))
    rtol = _DEFAULT_RTOL[tol_dtype]
    try:
        torch.testing.assert_close(
            k, r, rtol=rtol, atol=atol, equal_nan=True, check_dtype=True,
            check_device=True, check_layout=True, check_stride=False,
        )
    except AssertionError as exc:
        raise EquivalenceError(
            f"{name}: rule 1 (rtol={rtol}, atol=1 ulp of {tol_dtype} at "
            f"{_finite_max_abs(r):.6g} = {atol:.3g}) failed:\n{exc}"
        ) from None


def check_against_oracle(
    name: str, k: torch.Tensor, r: torch.Tensor, o, tol_dtype: torch.dtype
) -> None:
    """Rule 2: max|k - o| <= 2 max|r - o| + 1 ulp of tol_dtype at max|o|, over the elements
    where kernel, reference and oracle are all finite (rule 3 judges the others). The oracle
    is a float64 tensor, or a numpy long-double array (float64 cases)."""
    if isinstance(o, np.ndarray):
        o = np.broadcast_to(o, tuple(r.shape)).astype(np.longdouble)
        kn = k.detach().to(torch.float64).cpu().numpy().astype(np.longdouble)
        rn = r.detach().to(torch.float64).cpu().numpy().astype(np.longdouble)
    else:
        o = o.detach().to(torch.float64).cpu().numpy()
        kn = k.detach().to(torch.float64).cpu().numpy()
        rn = r.detach().to(torch.float64).cpu().numpy()
    mask = np.isfinite(kn) & np.isfinite(rn) & np.isfinite(o)
    if not mask.any():
        return
    kk_, rr, oo = kn[mask], rn[mask], o[mask]
    scale = float(np.abs(oo).max())
    err_k = float(np.abs(kk_ - oo).max())
    err_r = float(np.abs(rr - oo).max())
    bound = 2.0 * err_r + ulp(tol_dtype, scale)
    if not err_k <= bound:
        worst = int(np.abs(kk_ - oo).argmax())
        raise EquivalenceError(
            f"{name}: rule 2 failed: max |kernel - oracle| = {err_k:.6g} > "
            f"2 * {err_r:.6g} (eager reference's error) + 1 ulp of {tol_dtype} at {scale:.6g} "
            f"= {bound:.6g}; worst element: kernel={float(kk_[worst])!r} "
            f"reference={float(rr[worst])!r} oracle={float(oo[worst])!r}"
        )


def assert_equivalent(
    kernel: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    oracle: dict | None,
    *,
    elementwise: set[str] | frozenset[str],
    context: str = "",
) -> None:
    """Applies rules 1-3 to every output the reference produced."""
    missing = set(ref) - set(kernel)
    extra = set(kernel) - set(ref)
    if missing or extra:
        raise EquivalenceError(f"{context}: outputs differ: missing {missing}, extra {extra}")
    errors = []
    for name, r in ref.items():
        k = kernel[name]
        try:
            if k.shape != r.shape or k.dtype != r.dtype:
                raise EquivalenceError(
                    f"{name}: kernel {_describe(k)} vs reference {_describe(r)}"
                )
            tol = tolerance_dtype(r.dtype)
            check_nonfinite(name, k, r)
            if name in elementwise:
                check_elementwise(name, k, r, tol)
            if oracle is not None:
                check_against_oracle(name, k, r, oracle[name], tol)
        except EquivalenceError as exc:
            errors.append(str(exc))
    if errors:
        raise EquivalenceError(f"{context}\n" + "\n".join(errors))
