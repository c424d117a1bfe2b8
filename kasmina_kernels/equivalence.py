"""The equivalence rule of DESIGN.md section 5, in one place for the tests and the `check`
command: how a kernel's output is judged against the eager reference and a float64 oracle.

- `ulp(dtype, scale)`: one unit in the last place of `dtype` at magnitude `scale`.
- `oracle_bound(...)`: the largest error against the float64 oracle a kernel may show:
  2 x the eager reference's own error in that dtype + 1 ulp at the output's scale.
- `compare(...)`: both rules (elementwise assert_close with atol = 1 ulp at scale, and the
  oracle bound), plus NaN/Inf placement, as a record a table or a test can use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def ulp(dtype: torch.dtype, scale: float) -> float:
    """Spacing of `dtype` values at magnitude `scale` (the smallest normal's at 0)."""
    info = torch.finfo(dtype)
    scale = abs(float(scale))
    if not math.isfinite(scale) or scale < info.tiny:
        return info.eps * info.tiny
    return info.eps * 2.0 ** math.floor(math.log2(scale))


def finite_max_abs(t: torch.Tensor) -> float:
    t = t.detach()
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def max_error(t: torch.Tensor, oracle: torch.Tensor) -> float:
    """Max |t - oracle| over elements where the oracle is finite (NaN/Inf judged apart)."""
    t64 = t.detach().to(torch.float64)
    o = oracle.detach().to(torch.float64)
    mask = torch.isfinite(o)
    if not bool(mask.any()):
        return 0.0
    diff = (t64[mask] - o[mask]).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    return float(diff.max())


def oracle_bound(dtype: torch.dtype, eager_error: float, scale: float) -> float:
    return 2.0 * eager_error + ulp(dtype, scale)


def same_nonfinite(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = a.detach()
    b = b.detach().to(a.dtype) if b.dtype != a.dtype else b.detach()
    return bool(
        torch.equal(torch.isnan(a), torch.isnan(b))
        and torch.equal(torch.isposinf(a), torch.isposinf(b))
        and torch.equal(torch.isneginf(a), torch.isneginf(b))
    )


@dataclass
class Verdict:
    """How one output of a kernel compares with the eager reference and the float64 oracle."""

    name: str
    dtype: torch.dtype
    error_vs_reference: float
    kernel_error: float  # against the float64 oracle
    eager_error: float  # the eager reference's own error against the oracle
    bound: float  # oracle_bound(...)
    elementwise_ok: bool | None  # rule 1 (None when not an elementwise output)
    nonfinite_ok: bool
    message: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.kernel_error <= self.bound
            and self.nonfinite_ok
            and self.elementwise_ok is not False
        )


def compare(
    name: str,
    kernel: torch.Tensor,
    reference: torch.Tensor,
    oracle: torch.Tensor,
    *,
    elementwise: bool,
) -> Verdict:
    """Judge `kernel` (same dtype/shape as `reference`) by rules 1-3 of DESIGN section 5."""
    if kernel.shape != reference.shape or kernel.dtype != reference.dtype:
        return Verdict(name, reference.dtype, math.inf, math.inf, 0.0, 0.0, False, False,
                       f"shape/dtype {tuple(kernel.shape)}/{kernel.dtype} != "
                       f"{tuple(reference.shape)}/{reference.dtype}")
    dtype = reference.dtype
    scale = finite_max_abs(oracle)
    kernel_error = max_error(kernel, oracle)
    eager_error = max_error(reference, oracle)
    bound = oracle_bound(dtype, eager_error, scale)
    nonfinite_ok = same_nonfinite(kernel, reference)
    elementwise_ok = None
    message = ""
    if elementwise:
        try:
            torch.testing.assert_close(
                kernel.detach(), reference.detach(), atol=ulp(dtype, finite_max_abs(reference)),
                rtol=None if dtype not in _RTOL else _RTOL[dtype], equal_nan=True,
            )
            elementwise_ok = True
        except AssertionError as exc:
            elementwise_ok = False
            message = str(exc).splitlines()[0] if str(exc) else "assert_close failed"
    if kernel_error > bound:
        message = (message + "; " if message else "") + (
            f"error vs float64 oracle {kernel_error:.3g} > bound {bound:.3g} "
            f"(2 x eager {eager_error:.3g} + 1 ulp)"
        )
    if not nonfinite_ok:
        message = (message + "; " if message else "") + "NaN/Inf in different places"
    return Verdict(name, dtype, max_error(kernel, reference.to(torch.float64)), kernel_error,
                   eager_error, bound, elementwise_ok, nonfinite_ok, message)


# torch.testing's default rtol per dtype (its atol is replaced by one ulp at scale).
_RTOL = {
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 1.3e-6,
    torch.float64: 1e-7,
}
