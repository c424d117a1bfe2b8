"""The tests' side of the equivalence rule of docs/semantics.md#equivalence: the rule, its
runner and its verdicts live in the package (`kasmina_kernels.equivalence.judge`,
`kasmina_kernels.opcases`), shared with the `check` and `bench` commands. What only the tests
add:

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

import torch

from kasmina_kernels.equivalence import (  # the rule itself lives in the package
    EquivalenceError,
    judge,
    least_precise,
    tolerance_dtype,
    ulp,
)
# the runner the tests share with the `check` and `bench` commands
from kasmina_kernels.opcases import run_forward_backward

__all__ = [
    "ulp",
    "least_precise",
    "tolerance_dtype",
    "case_generator",
    "run_forward_backward",
    "assert_equivalent",
    "assert_verdicts",
    "EquivalenceError",
]


# ----------------------------------------------------------------------------- inputs
def case_generator(case_id: str) -> torch.Generator:
    """A generator seeded by the case id: every case draws fresh inputs, reproducibly."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(case_id.encode()))
    return g



# ----------------------------------------------------------------------------- judging
def assert_equivalent(kernel: dict, ref: dict, oracle: dict, *, elementwise, context: str = "",
                      computed_in: dict | None = None, terms: dict | None = None) -> None:
    """Rules 1-3 for every output the reference produced (`equivalence.judge`)."""
    assert_verdicts(judge(kernel, ref, oracle, elementwise=elementwise, computed_in=computed_in,
                          terms=terms), context)


def assert_verdicts(verdicts, context: str) -> None:
    """Raises with every failing output's reasons."""
    bad = [v.details or v.message for v in verdicts if not v.ok]
    if bad:
        raise EquivalenceError(f"{context}\n" + "\n".join(bad))
