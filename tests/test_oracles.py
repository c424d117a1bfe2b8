"""Sanity of the test oracles themselves.

The long-double oracle (used for float64 cases) is an independent implementation of the
section-2 math, so it must agree with the float64 eager reference to within float64 rounding:
a wrong formula shows up as an error of the order of the values. The bound here (64 ulps of
the computing dtype at the output's scale) only guards the oracle; kernels are judged by the rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cases import F64, case_check, full_cases
from equivalence import least_precise, ulp
from oracles import LONGDOUBLE_IS_EXTENDED

F64_CASES = [c for c in full_cases() if c.dtype == F64 and not c.specials]


def test_longdouble_is_wider_than_float64():
    if not LONGDOUBLE_IS_EXTENDED:
        pytest.skip("numpy long double is float64 on this platform: the float64 oracle "
                    "cannot be more precise than the dtype it judges")
    assert np.finfo(np.longdouble).nmant >= 63


@pytest.mark.parametrize("case", F64_CASES, ids=lambda c: c.id)
def test_longdouble_oracle_agrees_with_float64_reference(case):
    check = case_check(case)
    ref, oracle = check.expected
    assert set(oracle) == set(ref)
    for name, r in ref.items():
        o = np.broadcast_to(oracle[name], tuple(r.shape)).astype(np.float64)
        rn = r.detach().to(torch.float64).numpy()
        finite = np.isfinite(o) & np.isfinite(rn)
        assert np.array_equal(np.isfinite(o), np.isfinite(rn)), name
        if not finite.any():
            continue
        scale = float(np.abs(o[finite]).max())
        err = float(np.abs(rn[finite] - o[finite]).max())
        # judged at the precision the reference computed in (a 0-dim float64 gate beside an
        # fp32 alpha tensor promotes to fp32; GATE's effective alpha is rounded to the
        # promoted dtype of alpha and gate before it meets float64 features)
        computed_in = [r.dtype, ref["y"].dtype]
        if case.op == "blend_gate":
            computed_in.append(torch.result_type(check.leaves["alpha"], check.leaves["gate"]))
        tol = least_precise(*computed_in)
        assert err <= 64 * ulp(tol, scale), (name, err, scale)
