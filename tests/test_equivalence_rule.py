"""The equivalence rule itself (`kasmina_kernels.equivalence`): what it accepts and what it
catches, on hand-made kernel outputs around one reference and one oracle."""

from __future__ import annotations

import pytest
import torch

from kasmina_kernels.equivalence import EquivalenceError, check_elementwise, ulp

F32 = torch.float32


def _setup():
    # a float64 "oracle", eager = the oracle rounded to float32 (within tolerance), scale 4
    gen = torch.Generator().manual_seed(7)
    oracle = (torch.rand(64, generator=gen, dtype=torch.float64) * 8 - 4)
    oracle[0] = 4.0
    oracle[3:8] = 0.0123  # small beside the scale: rtol adds nothing to the tolerance there
    eager = oracle.to(F32)
    atol = ulp(F32, 4.0)
    return oracle, eager, atol


def test_a_kernel_equal_to_eager_passes():
    oracle, eager, _ = _setup()
    check_elementwise("y", eager.clone(), eager, F32, oracle)


def test_a_well_conditioned_element_off_by_more_than_the_tolerance_fails():
    oracle, eager, atol = _setup()
    kernel = eager.clone()
    kernel[5] += 3 * atol  # eager is exact there: the kernel is wrong
    with pytest.raises(EquivalenceError):
        check_elementwise("y", kernel, eager, F32, oracle)
    with pytest.raises(EquivalenceError):  # and without an oracle, plain rule 1
        check_elementwise("y", kernel, eager, F32)


def test_an_ill_conditioned_element_is_judged_against_the_oracle():
    oracle, eager, atol = _setup()
    eager = eager.clone()
    eager[3] = float(oracle[3]) + 10 * atol  # eager's own rounding moved it far off
    kernel = eager.clone()
    kernel[3] = float(oracle[3]) + 2 * atol  # nearer the exact value: passes
    check_elementwise("ds", kernel, eager, F32, oracle)
    kernel[3] = float(oracle[3]) - 15 * atol  # within 2x eager's error: passes (rule 2)
    check_elementwise("ds", kernel, eager, F32, oracle)
    kernel[3] = float(oracle[3]) - 25 * atol  # beyond 2x eager's error + 1 ulp: fails
    with pytest.raises(EquivalenceError):
        check_elementwise("ds", kernel, eager, F32, oracle)


def test_an_element_at_least_as_accurate_as_eager_passes_where_eager_is_just_inside():
    oracle, eager, atol = _setup()
    eager = eager.clone()
    eager[7] = float(oracle[7]) + 0.9 * atol  # eager's error just inside the tolerance
    kernel = eager.clone()
    kernel[7] = float(oracle[7]) - 0.2 * atol  # 1.1 atol from eager, nearer the oracle
    check_elementwise("dh", kernel, eager, F32, oracle)
    kernel[7] = float(oracle[7]) - 1.5 * atol  # further from the oracle than eager: fails
    with pytest.raises(EquivalenceError):
        check_elementwise("dh", kernel, eager, F32, oracle)


def test_feature_outputs_are_judged_in_the_host_dtype():
    from kasmina_kernels.equivalence import computation_dtype, tolerance_dtype

    bf16 = torch.bfloat16
    # a float32 seed's gradient beside a bfloat16 host is a bfloat16 value widened to float32
    assert computation_dtype("blend_multiply", "ds", bf16) is bf16
    assert tolerance_dtype(F32, computation_dtype("blend_add", "ds", bf16)) is bf16
    # reductions and ops without the cast keep their own dtype
    assert computation_dtype("blend_gate", "dgate", bf16) is None
    assert computation_dtype("multiply_valve_multiplier", "dm", bf16) is None
    reference = torch.linspace(-2, 2, 50)
    kernel = reference.clone()
    kernel[10] += 4e-3  # far beyond float32's tolerance, inside bfloat16's
    with pytest.raises(EquivalenceError):
        check_elementwise("ds", kernel, reference, F32)
    check_elementwise("ds", kernel, reference, tolerance_dtype(F32, bf16))


def test_a_reduction_gets_sqrt_n_roundoff_slack_and_no_more():
    from kasmina_kernels.equivalence import check_against_oracle, reduction_slack

    oracle = torch.tensor([1000.0], dtype=torch.float64)  # one sum of n = 10000 terms
    eager = oracle.to(F32)                                 # eager happened to land exactly
    term_sums = torch.tensor([5000.0], dtype=torch.float64)
    slack = reduction_slack(F32, term_sums, 10000)          # 100 * 2^-24 * 5000 = 0.0298
    near = (oracle + 0.02).to(F32)                          # an honest float32 accumulation
    with pytest.raises(EquivalenceError):                   # the bare rule: 2 * 0 + 1 ulp
        check_against_oracle("dalpha", near, eager, oracle, F32)
    check_against_oracle("dalpha", near, eager, oracle, F32, slack=slack)
    far = (oracle + 0.1).to(F32)                             # a real error: beyond the slack
    with pytest.raises(EquivalenceError):
        check_against_oracle("dalpha", far, eager, oracle, F32, slack=slack)
