"""Autocast: every op called inside torch.autocast (CPU bfloat16; CUDA bfloat16 when a GPU is
present) matches the reference called inside the same autocast, by the equivalence rule
(docs/semantics.md#equivalence; the float64 oracle is the exact math, without autocast).

The inputs are what a training step under autocast hands the ops: bf16 activations beside fp32
ones (a bf16 host with an fp32 seed or seed_input, fp32 alpha and gate schedules), fp32
activations that autocast left alone, channels_last hosts; for the gate network bf16 features
with the module's fp32 parameters, and all-fp32 inputs (whose linear layers autocast runs in
bf16 in the reference).
"""

from __future__ import annotations

import pytest
import torch

from cases import BF16, F16, F32, Case, backend_device_params, run_case

AUTOCAST_DTYPE = BF16
SHAPE = (3, 5, 7, 11)


def _cases(device: str) -> list[Case]:
    out = []

    def add(**fields):
        out.append(Case(device=device, autocast=AUTOCAST_DTYPE, **fields))

    for op in ("blend_add", "blend_with_isolation", "blend_multiply", "blend_gate", "ste_forward"):
        extra = {"gate": "f32"} if op == "blend_gate" else {}
        add(op=op, dtype=BF16, shape=SHAPE, layout="cl_host", alpha="ps", seed_dtype=F32, **extra)
        add(op=op, dtype=BF16, shape=SHAPE, alpha="s32", **extra)
        add(op=op, dtype=F32, shape=SHAPE, layout="cl", alpha="ps", **extra)
    add(op="blend_multiply", dtype=BF16, shape=SHAPE, alpha="ps", seed_input="f32", seed_dtype=F32)
    add(op="multiply_valve_multiplier", dtype=BF16, shape=SHAPE, alpha="ps")
    add(op="multiply_valve_multiplier", dtype=F32, shape=SHAPE, alpha="s32")
    add(op="gate_effective_alpha", dtype=F32, shape=(8, 1, 1, 1), alpha="s32", gate="ps")
    add(op="gate_effective_alpha", dtype=BF16, shape=(8, 1, 1, 1), alpha="ps", gate="ps")
    add(op="gated_pool", dtype=BF16, shape=(4, 16, 5, 5), layout="cl", topology="cnn")
    add(op="gated_pool", dtype=F32, shape=(4, 9, 24), topology="transformer")
    # the gate network: bf16 features and fp32 parameters, as under autocast
    add(op="gate_network", dtype=BF16, shape=(4, 16, 5, 5), layout="cl", topology="cnn", seed_dtype=F32)
    add(op="gate_network", dtype=BF16, shape=(4, 9, 24), topology="transformer", seed_dtype=F32)
    add(op="gate_network", dtype=BF16, shape=(4, 16, 5, 5), topology="cnn")
    add(op="gate_network", dtype=F32, shape=(4, 16, 5, 5), topology="cnn")
    add(op="gate_network", dtype=F32, shape=(4, 9, 24), topology="transformer")
    add(op="gate_network", dtype=F16, shape=(4, 16, 5, 5), topology="cnn", seed_dtype=F32)
    return out


def _params():
    params = []
    for p in backend_device_params():
        backend, device = p.values
        for case in _cases(device):
            marks = list(p.marks)
            params.append(pytest.param(backend, case, id=f"{p.id}-{case.id}", marks=marks))
    return params


@pytest.mark.parametrize("backend,case", _params())
def test_matches_reference_under_autocast(backend, case):
    run_case(backend, case)
