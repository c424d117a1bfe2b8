"""The equivalence rule of docs/semantics.md#equivalence, in one place: the tests and the
`check` and `bench` commands all judge kernels with `judge` (through `opcases.Check`).

Rule 1 (`check_elementwise`) judges elementwise outputs against the eager reference, rule 2
(`check_against_oracle`) every output against the float64 oracle (the tests use a long-double
oracle for float64 cases), rule 3 (`check_nonfinite`) NaN and Inf placement. An output is
judged in its computation dtype (`tolerance_dtype`). "One ulp of dtype at scale x" is
``2 ** floor(log2 x) * finfo(dtype).eps`` (never below the smallest subnormal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .optable import BY_NAME
from .validation import TOPOLOGIES

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


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    return max((d for d in dtypes if d.is_floating_point), key=lambda d: torch.finfo(d).eps)


def tolerance_dtype(output_dtype: torch.dtype, computation_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype an output is judged in: its computation dtype, the dtype the reference computes
    it in. Downstream of the blends' cast to the host's dtype that is the host's dtype (the
    gradient of a float32 seed beside a bfloat16 host is a bfloat16 value widened to float32,
    and is judged as bfloat16); otherwise the output's own."""
    return output_dtype if computation_dtype is None else least_precise(output_dtype, computation_dtype)


def computation_dtype(op: str, output: str, host_dtype: torch.dtype) -> torch.dtype | None:
    """The host's dtype for the feature outputs (y and the features' gradients) of an op that
    casts to the host's dtype (`optable.Op.host_dtype`), None (the output's own) otherwise."""
    entry = BY_NAME[op]
    if entry.host_dtype and (output == "y" or output[1:] in entry.features):
        return host_dtype
    return None


# torch.testing.assert_close's default rtol per dtype
_DEFAULT_RTOL = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float32: 1.3e-6, torch.float64: 1e-7}


# ----------------------------------------------------------------------------- comparing
def _finite_max_abs(t: torch.Tensor) -> float:
    t = t.detach().to(torch.float64)
    t = t[torch.isfinite(t)]
    return float(t.abs().max()) if t.numel() else 0.0


def describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} strides={t.stride()}"


def _first_mismatch(k: torch.Tensor, r: torch.Tensor, bad: torch.Tensor) -> str:
    idx = bad.nonzero()
    if idx.numel() == 0:
        return ""
    first = tuple(int(i) for i in idx[0])
    return (f"{int(bad.sum())} of {bad.numel()} elements; first at {first}: "
            f"kernel={k[first].item()!r} reference={r[first].item()!r}")


def check_nonfinite(name: str, k: torch.Tensor, r: torch.Tensor) -> None:
    """Rule 3: NaN, +Inf, -Inf in the same places."""
    k64, r64 = k.detach().to(torch.float64), r.detach().to(torch.float64)
    for label, pred in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        bad = pred(k64) != pred(r64)
        if bool(bad.any()):
            raise EquivalenceError(f"{name}: {label} placement differs: {_first_mismatch(k64, r64, bad)}")


def _as_float64(o, like: torch.Tensor) -> torch.Tensor:
    """The oracle (a float64 tensor, or a numpy long-double array) as a float64 tensor on
    `like`'s device, broadcast to its shape."""
    if not isinstance(o, torch.Tensor):
        import numpy as np  # only the long-double oracle needs it

        o = torch.from_numpy(np.asarray(o, dtype=np.float64))
    return o.detach().to(device=like.device, dtype=torch.float64).expand(like.shape)


def check_elementwise(name: str, k: torch.Tensor, r: torch.Tensor, tol_dtype: torch.dtype,
                      oracle=None) -> None:
    """Rule 1: assert_close with the dtype's rtol and atol = 1 ulp at max |reference|.

    Given the `oracle`, an element outside that tolerance passes when eager is itself further
    than the tolerance from the oracle (ill-conditioned) and the kernel meets rule 2 there,
    element by element, or when the kernel is at least as close to the oracle as eager (a
    kernel nearer the exact value than eager can sit just outside eager's tolerance)."""
    atol = ulp(tol_dtype, _finite_max_abs(r))
    rtol = _DEFAULT_RTOL[tol_dtype]
    if oracle is not None and k.shape == r.shape and k.dtype == r.dtype:
        k64, r64 = k.detach().to(torch.float64), r.detach().to(torch.float64)
        o64 = _as_float64(oracle, r)
        finite = torch.isfinite(k64) & torch.isfinite(r64) & torch.isfinite(o64)
        off = finite & ((k64 - r64).abs() > atol + rtol * r64.abs())
        if bool(off.any()):
            eager_error, kernel_error = (r64 - o64).abs(), (k64 - o64).abs()
            ill = eager_error > atol + rtol * o64.abs()
            bound = 2.0 * eager_error + ulp(tol_dtype, _finite_max_abs(o64[finite]))
            judged_by_oracle = off & ((ill & (kernel_error <= bound)) | (kernel_error <= eager_error))
            if bool(judged_by_oracle.any()):
                # those elements pass; rule 1 judges the rest against the reference
                k = torch.where(judged_by_oracle, r.detach(), k.detach())
    try:
        torch.testing.assert_close(k, r, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as exc:
        raise EquivalenceError(f"{name}: rule 1 (rtol={rtol}, atol=1 ulp of {tol_dtype} at "
                               f"{_finite_max_abs(r):.6g} = {atol:.3g}) failed:\n{exc}") from None


def reduction_slack(tol_dtype: torch.dtype, term_sums: torch.Tensor, n: int) -> torch.Tensor:
    """Rule 2's slack for outputs that each sum `n` terms: sqrt(n) units of roundoff of the
    accumulation dtype (float32 for 16-bit and float32 outputs, float64 for float64) times
    the sum of the terms' magnitudes (`term_sums`, per output element): the typical error of
    an honest accumulation, where eager's error on one sum is a single random draw."""
    unit = 2.0 ** -53 if tol_dtype == torch.float64 else 2.0 ** -24
    return math.sqrt(max(n, 1)) * unit * term_sums.detach().to(torch.float64)


def check_against_oracle(name: str, k: torch.Tensor, r: torch.Tensor, o, tol_dtype: torch.dtype, errors=None,
                         slack: torch.Tensor | None = None) -> None:
    """Rule 2: max|k - o| <= 2 max|r - o| + 1 ulp of tol_dtype at max|o|, over the elements
    where kernel, reference and oracle are all finite (rule 3 judges the others). `errors`:
    `oracle_errors(k, r, o)` if the caller has it; `slack`: a reduction's per-element slack
    (`reduction_slack`), which replaces the 1 ulp where it is larger."""
    err_k, err_r, scale, worst = errors if errors is not None else oracle_errors(k, r, o)
    if err_k is None:
        return
    bound = 2.0 * err_r + ulp(tol_dtype, scale)
    if not err_k <= bound and slack is not None:
        # element by element: |k - o| - max(1 ulp, slack) against twice eager's max error
        k64, o64 = k.detach().to(torch.float64), _as_float64(o, k)
        per_element = slack.to(k64.device).expand(k64.shape).clamp(min=ulp(tol_dtype, scale))
        excess = ((k64 - o64).abs() - per_element)[torch.isfinite(k64) & torch.isfinite(o64)]
        if excess.numel() == 0 or float(excess.max()) <= 2.0 * err_r:
            return
    if not err_k <= bound:
        raise EquivalenceError(
            f"{name}: rule 2 failed: max |kernel - oracle| = {err_k:.6g} > "
            f"2 * {err_r:.6g} (eager reference's error) + 1 ulp of {tol_dtype} at {scale:.6g} "
            f"= {bound:.6g}; worst element: kernel={worst[0]!r} reference={worst[1]!r} "
            f"oracle={worst[2]!r}"
        )


def oracle_errors(k: torch.Tensor, r: torch.Tensor, o):
    """(max |k - o|, max |r - o|, max |o|, worst element as (k, r, o)) over the elements where
    all three are finite, or Nones when there are none. `o` is a float64 tensor, or a numpy
    long-double array (the tests' float64 oracle)."""
    if isinstance(o, torch.Tensor):
        # on the kernel's device: moving Esper-sized GPU outputs to the host would dominate a
        # benchmark's check
        kn, rn, on = (x.detach().to(device=k.device, dtype=torch.float64).reshape(-1)
                      for x in (k, r, o.expand(r.shape)))
        isfinite = torch.isfinite
    else:
        import numpy as np  # only the long-double oracle needs it

        on = np.broadcast_to(o, tuple(r.shape)).astype(np.longdouble).reshape(-1)
        kn, rn = (x.detach().to(torch.float64).cpu().numpy().astype(np.longdouble).reshape(-1)
                  for x in (k, r))
        isfinite = np.isfinite
    mask = isfinite(kn) & isfinite(rn) & isfinite(on)
    if not bool(mask.any()):
        return None, None, None, None
    kk_, rr, oo = kn[mask], rn[mask], on[mask]
    dk = abs(kk_ - oo)
    w = int(dk.argmax())
    return (float(dk.max()), float(abs(rr - oo).max()), float(abs(oo).max()),
            (float(kk_[w]), float(rr[w]), float(oo[w])))


@dataclass
class Verdict:
    """One output of a kernel judged by rules 1-3, with the figures the `check` table shows."""

    name: str
    error_vs_reference: float
    kernel_error: float
    eager_error: float
    bound: float
    message: str  # what failed, one line per rule ("; "-joined); empty when the output passes
    details: str = ""  # the failures in full (assert_close's report included)

    @property
    def ok(self) -> bool:
        return not self.message


def compare(name: str, kernel: torch.Tensor, reference: torch.Tensor, oracle, *,
            elementwise: bool, computed_in: torch.dtype | None = None,
            slack: torch.Tensor | None = None) -> Verdict:
    """Rules 1-3 for one output, as a record; `computed_in`: its computation dtype where it
    differs from its own (`computation_dtype`); `slack`: a reduction's (`reduction_slack`)."""
    if kernel.shape != reference.shape or kernel.dtype != reference.dtype:
        return Verdict(name, math.inf, math.inf, 0.0, 0.0,
                       f"{name}: kernel {describe(kernel)} vs reference {describe(reference)}")
    problems = []
    tol = tolerance_dtype(reference.dtype, computed_in)
    errors = oracle_errors(kernel, reference, oracle)
    checks = [lambda: check_nonfinite(name, kernel, reference),
              lambda: check_against_oracle(name, kernel, reference, oracle, tol, errors, slack)]
    if elementwise:
        checks.insert(1, lambda: check_elementwise(name, kernel, reference, tol, oracle))
    for check in checks:
        try:
            check()
        except EquivalenceError as exc:
            problems.append(str(exc))
    err_k, err_r, scale, _ = errors
    err_k, err_r, scale = err_k or 0.0, err_r or 0.0, scale or 0.0
    diff = (kernel.detach().double() - reference.detach().double()).abs()
    diff = diff[torch.isfinite(diff)]
    return Verdict(name, float(diff.max()) if diff.numel() else 0.0, err_k, err_r,
                   2.0 * err_r + ulp(tol, scale), "; ".join(p.splitlines()[0] for p in problems),
                   "\n".join(problems))


def judge(kernel: dict, reference: dict, oracle: dict, *, elementwise, computed_in: dict | None = None,
          terms: dict | None = None) -> list[Verdict]:
    """Every output the reference produced ({"y": ..., "d<input>": ...}), judged by rules 1-3:
    elementwise for the names in `elementwise`, in its computation dtype (`computed_in[name]`,
    else its own), with a reduction's sqrt(n) slack where `terms` (`reduction_terms`) has it."""
    missing = [n for n in reference if n not in kernel] + [n for n in kernel if n not in reference]
    verdicts = [Verdict(n, math.inf, math.inf, 0.0, 0.0,
                        f"{n}: {'missing from' if n in reference else 'extra in'} the kernel's outputs")
                for n in missing]
    for name, r in reference.items():
        if name in kernel:
            dtype = (computed_in or {}).get(name)
            slack = (reduction_slack(tolerance_dtype(r.dtype, dtype), *terms[name])
                     if terms and name in terms else None)
            verdicts.append(compare(name, kernel[name], r, oracle[name], elementwise=name in elementwise,
                                    computed_in=dtype, slack=slack))
    return verdicts


# ----------------------------------------------------------------------------- reductions
def reduction_terms(op: str, leaves: dict, requires, grad_out: torch.Tensor | None, *,
                    topology: str | None = None) -> dict:
    """{output name: (sum of the magnitudes of the terms it sums, per element; terms per
    element)} for the outputs that are reductions (alpha and gate gradients, pooled means), in
    float64 from the inputs as the op reads them: rule 2's slack for sums (`reduction_slack`).
    Outputs that sum nothing are left out."""
    f = {n: (t.detach().to(torch.float64) if isinstance(t, torch.Tensor) else t)
         for n, t in leaves.items()}
    g = None if grad_out is None else grad_out.detach().to(torch.float64)
    out = {}

    def add(name, terms, shape, count=None):
        n = (terms.numel() if count is None else count) // max(1, math.prod(shape))
        if name in requires and n > 1:
            out["d" + name] = (terms.abs().sum_to_size(shape), n)

    if g is not None and op in ("blend_add", "blend_with_isolation", "blend_gate", "blend_multiply"):
        h, s = f["h"], f["s"]
        if op == "blend_multiply":
            r = h if f.get("seed_input") is None else f["seed_input"]
            add("alpha", g * h * torch.tanh(s - r), f["alpha"].shape)
        elif op == "blend_gate":
            a, gt = f["alpha"], f["gate"]
            eshape = torch.broadcast_shapes(a.shape, gt.shape)
            de = (g * (s - h)).abs().sum_to_size(eshape)
            n = (g.numel() // max(1, math.prod(eshape))) * math.prod(eshape)
            for name, other in (("alpha", gt), ("gate", a)):
                add(name, de * other.clamp(0, 1).abs().expand(eshape), f[name].shape, n)
        else:
            add("alpha", g * (s - h), f["alpha"].shape)
    if g is not None and op == "multiply_valve_multiplier":
        add("alpha", g * torch.tanh(f["m"]), f["alpha"].shape)
    if op == "gated_pool":
        x = f["x"]
        dims = TOPOLOGIES[topology].positions
        n = math.prod(x.shape[d] for d in dims)
        out["y"] = (x.abs().sum(dim=dims) / n, n)
    if g is not None and op == "gate_network":
        # the weights' gradients sum over the batch, x's over the hidden units (then spread
        # over the positions); NaN terms (nothing to pool) leave the 1 ulp alone
        x, w1, w2 = f["x"], f["w1"], f["w2"]
        dims = TOPOLOGIES[topology].positions
        pooled = x.mean(dim=dims)
        z1 = torch.nn.functional.linear(pooled, w1, f["b1"])
        a1 = z1.clamp(min=0)
        y = torch.sigmoid(torch.nn.functional.linear(a1, w2, f["b2"]))
        dz2 = (g.reshape(y.shape) * y * (1 - y)).nan_to_num(nan=0.0)
        dz1 = ((dz2 @ w2) * (z1 > 0)).nan_to_num(nan=0.0)
        a1, pooled = a1.nan_to_num(nan=0.0), pooled.nan_to_num(nan=0.0)
        add("w2", dz2[:, :, None] * a1[:, None, :], w2.shape)
        add("b2", dz2, f["b2"].shape)
        add("w1", dz1[:, :, None] * pooled[:, None, :], w1.shape)
        add("b1", dz1, f["b1"].shape)
        if "x" in requires and w1.shape[0] > 1:
            per_sample = (dz1.abs() @ w1.abs()) / max(1, math.prod(x.shape[d] for d in dims))
            for d in dims:
                per_sample = per_sample.unsqueeze(d)
            out["dx"] = (per_sample.expand(x.shape), w1.shape[0])
    return out
