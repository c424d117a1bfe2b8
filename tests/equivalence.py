"""The equivalence rule of docs/semantics.md#equivalence, implemented once.

A kernel output matches the reference when:

1. elementwise outputs (``y``, ``dh``, ``ds``, ``dr``, ``dm``, the pooled ``dx``) pass
   ``torch.testing.assert_close(kernel, reference)`` with the dtype's default ``rtol`` and
   ``atol`` = one ulp of the dtype at the output's scale, ``max |reference|``; elements where
   the reference itself is further than that from the oracle are judged by rule 2 alone,
   element by element (see `kasmina_kernels.equivalence.check_elementwise`);
2. every output, reductions included, has ``max |kernel - oracle|`` at most
   ``2 * max |eager reference - oracle| + 1 ulp`` (same ulp), where the oracle is the
   reference run on the same inputs upcast to float64;
3. NaN, +Inf and -Inf sit in exactly the same places as in the reference.

"One ulp of dtype at scale x" is the spacing of that dtype's numbers just below or at x:
``2 ** floor(log2 x) * finfo(dtype).eps`` (never less than the dtype's smallest subnormal).
``finfo.eps * x`` would be up to twice that; we use the exact spacing.

Which dtype: an output is judged in its computation dtype, the dtype the reference computes it
in: the host's dtype for the blends' feature outputs (a bf16 host's fp32 seed gradient is a
bf16 value widened to fp32, judged at bf16), the output's own otherwise.

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

import zlib
from typing import Callable

import torch

from kasmina_kernels.equivalence import (  # the rule itself lives in the package
    EquivalenceError,
    check_against_oracle,
    check_elementwise,
    check_nonfinite,
    describe,
    reduction_slack,
    least_precise,
    tolerance_dtype,
    ulp,
)
from kasmina_kernels.opcases import upcast  # floating tensors to float64, others unchanged

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



# ----------------------------------------------------------------------------- inputs
def case_generator(case_id: str) -> torch.Generator:
    """A generator seeded by the case id: every case draws fresh inputs, reproducibly."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(case_id.encode()))
    return g



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


def assert_equivalent(
    kernel: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    oracle: dict | None,
    *,
    elementwise: set[str] | frozenset[str],
    context: str = "",
    computed_in: dict[str, torch.dtype] | None = None,
    terms: dict | None = None,
) -> None:
    """Applies rules 1-3 to every output the reference produced, each judged in its
    computation dtype (`computed_in[name]`, else its own)."""
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
                    f"{name}: kernel {describe(k)} vs reference {describe(r)}"
                )
            tol = tolerance_dtype(r.dtype, (computed_in or {}).get(name))
            check_nonfinite(name, k, r)
            if name in elementwise:
                check_elementwise(name, k, r, tol, None if oracle is None else oracle[name])
            if oracle is not None:
                slack = None
                if terms and name in terms:  # a reduction: rule 2's sqrt(n) slack
                    slack = reduction_slack(tol, *terms[name])
                check_against_oracle(name, k, r, oracle[name], tol, slack=slack)
        except EquivalenceError as exc:
            errors.append(str(exc))
    if errors:
        raise EquivalenceError(f"{context}\n" + "\n".join(errors))
