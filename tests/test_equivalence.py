"""Every kernel backend against the reference (docs/semantics.md#equivalence): op x backend x dtype x
shape x layout x alpha form x which inputs require grad, forward and every gradient.

The matrix lives in `cases.py`; `cases_for(backend)` gives a slow backend (Triton under its
CPU interpreter) a reduced set automatically. The Esper-sized cases are marked ``big`` and run
for the native backend only.
"""

from __future__ import annotations

import pytest

from cases import TEST_DEVICE, backends_under_test, big_cases, cases_for, run_case


def _params():
    params = []
    big_ids = {c.id for c in big_cases()}
    for backend, why in backends_under_test():
        if why is not None:
            params.append(
                pytest.param(
                    backend, None, id=f"{backend}-unavailable",
                    marks=pytest.mark.skip(reason=f"backend {backend!r} cannot run on {TEST_DEVICE.type} here: {why}"),
                )
            )
            continue
        for case in cases_for(backend):
            marks = [pytest.mark.big] if case.id in big_ids else []
            params.append(pytest.param(backend, case, id=f"{backend}-{case.id}", marks=marks))
    return params


@pytest.mark.equivalence
@pytest.mark.parametrize("backend,case", _params())
def test_equivalence(backend, case):
    run_case(backend, case)


def _residual_params():
    """MULTIPLY's native cases again with kk.keep_residuals(): the forward keeps its tanh's
    complement for float32 hosts and the backward reads it (where alpha wants no gradient)."""
    if dict(backends_under_test()).get("native", "absent") is not None:
        return [pytest.param("native+residuals", None, id="native+residuals-unavailable",
                             marks=pytest.mark.skip(reason="the native backend cannot run here"))]
    big_ids = {c.id for c in big_cases()}
    return [pytest.param("native+residuals", case, id=f"native+residuals-{case.id}",
                         marks=[pytest.mark.big] if case.id in big_ids else [])
            for case in cases_for("native") if case.op == "blend_multiply"]


@pytest.mark.equivalence
@pytest.mark.parametrize("backend,case", _residual_params())
def test_equivalence_keeping_residuals(backend, case):
    import kasmina_kernels as kk

    with kk.keep_residuals():
        run_case("native", case)
