"""Property-based equivalence: Hypothesis draws cases over the whole input space the ops
accept (`fuzz.py`) and each runs through `cases.run_case`, the equivalence matrix's own runner:
forward and every gradient judged by docs/semantics.md#equivalence, inputs unchanged afterwards, no
output sharing an input's storage.

Every op, every fused backend: on CPU (Triton under its interpreter, with fewer and smaller
examples) and on CUDA when a GPU is present. Example counts: the Hypothesis profile "ci"
(default) or "thorough" (KASMINA_HYPOTHESIS_PROFILE=thorough); see conftest.py. A failure
prints the failing Case (its `id` names every choice) and a reproduction blob.
"""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="the property-based tests need hypothesis (pip install hypothesis)")

from hypothesis import given, settings  # noqa: E402

from cases import backend_device_params, run_case  # noqa: E402
from fuzz import OPS, cases, examples_for  # noqa: E402


@pytest.mark.fuzz
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_matches_reference(backend, device, op):
    @settings(max_examples=examples_for(backend, device))
    @given(case=cases(op, backend, device))
    def check(case):
        run_case(backend, case)

    check()
