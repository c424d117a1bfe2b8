"""Determinism: the same inputs give bitwise-identical outputs and gradients on every run and
for every `torch.set_num_threads` value, for every fused backend: native on CPU (large enough
shapes that at::parallel_for splits the work, and the per-sample alpha/gate sums run over many
blocks), Triton on CPU under its interpreter (small shapes), and both on CUDA when present.

Each op runs on the representative inputs of `kasmina_kernels.opcases` (per-sample alpha and
gate), the blend ops again with a 0-dim alpha (one long reduction for its gradient), and
Esper's calls in Esper's layouts (channels_last host beside NCHW seed and seed input: the
native CPU kernels' mixed-order tiles and their per-sample sums).
"""

from __future__ import annotations

import pytest
import torch

from kasmina_kernels.bench import esper
from kasmina_kernels.opcases import make, run_with_grads
from kasmina_kernels.optable import OPS

from cases import backend_device_params
from test_contracts import bits_equal

THREAD_COUNTS = (1, 2, 3, 4)
SHAPES = {  # (feature shape for the elementwise ops, pooling shapes) per (backend, device)
    ("native", "cpu"): ((16, 24, 24, 24), (16, 24, 24, 24), (16, 96, 48)),
    ("triton", "cpu"): ((2, 3, 4, 5), (2, 3, 4, 5), (2, 7, 12)),
    ("native", "cuda"): ((64, 32, 16, 16), (64, 32, 16, 16), (32, 256, 384)),
    ("triton", "cuda"): ((64, 32, 16, 16), (64, 32, 16, 16), (32, 256, 384)),
}
DTYPES = (torch.float32, torch.bfloat16)


def _inputs(case, alpha_form, backend, device, dtype):
    feature_shape, cnn_shape, transformer_shape = SHAPES[(backend, device)]
    shape = feature_shape
    if case.name == "gate_effective_alpha":
        shape = (feature_shape[0], 1, 1, 1)
    elif case.name in ("gated_pool", "gate_network"):
        shape = cnn_shape if alpha_form == "cnn" else transformer_shape
    gen = torch.Generator().manual_seed(7)
    if alpha_form == "esper":
        return esper.make_inputs(case.name, "esper", shape, dtype, device, gen)
    args, kwargs = make(case, shape, dtype, device, gen)
    if alpha_form == "scalar":
        args = (args[0], args[1], args[2].reshape(-1)[0].clone()) + tuple(args[3:])
    return args, kwargs


def _variants():
    out = []
    for case in OPS:
        if case.name in ("gated_pool", "gate_network"):
            forms = ("cnn", "transformer")
        elif case.name.startswith("blend_"):
            forms = ("per_sample", "scalar")
        else:
            forms = ("per_sample",)
        if case.name in esper.OPS:
            forms += ("esper",)
        out += [pytest.param(case, form, id=f"{case.name}-{form}") for form in forms]
    return out


def _run(case, args, kwargs, backend):
    fn = case.public
    return run_with_grads(case, lambda *a, **k: fn(*a, **k, backend=backend), args, kwargs)


def _assert_same(first: dict, again: dict, what: str):
    assert first.keys() == again.keys()
    for name in first:
        if first[name] is None:
            assert again[name] is None, f"{what}: {name} appeared"
            continue
        assert bits_equal(first[name], again[name]), f"{what}: {name} differs bitwise"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case,form", _variants())
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_bitwise_identical_across_runs_and_thread_counts(backend, device, case, form, dtype, restore_threads):
    args, kwargs = _inputs(case, form, backend, device, dtype)
    torch.set_num_threads(THREAD_COUNTS[0])
    first = _run(case, args, kwargs, backend)
    assert first["y"].numel() > 0
    _assert_same(first, _run(case, args, kwargs, backend), f"second run, {THREAD_COUNTS[0]} thread(s)")
    for n in THREAD_COUNTS[1:]:
        torch.set_num_threads(n)
        _assert_same(first, _run(case, args, kwargs, backend), f"{n} threads vs {THREAD_COUNTS[0]}")
