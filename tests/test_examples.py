"""The end-to-end examples in python/: the done-means check of issue 5 (a model written
against the eager blend functions trains, with the drop-ins swapped in, to the same losses
and parameters with fewer kernels per training step) and each example run as a user runs
it, briefly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kasmina_kernels as kk

EXAMPLES = Path(__file__).resolve().parent.parent / "python"
sys.path.insert(0, str(EXAMPLES))

import esper_cnn  # noqa: E402
import esper_transformer  # noqa: E402
import example_harness  # noqa: E402
import seed_slots  # noqa: E402
from kasmina_kernels.reference import blend_gate as eager_blend_gate  # noqa: E402

STEPS = 20
MODELS = {"cnn": esper_cnn, "transformer": esper_transformer}


@pytest.fixture(scope="module", params=list(MODELS))
def runs(request):
    example = MODELS[request.param]
    results = example_harness.compare_backends(
        example.build_model, example.make_batches(STEPS), ["native"], autocast_dtype=None
    )
    return request.param, {r.backend: r for r in results}


def test_swapped_native_trains_to_the_same_losses(runs):
    name, results = runs
    eager, native = results[example_harness.EAGER], results["native"]
    assert len(eager.losses) == len(native.losses) == STEPS
    assert eager.losses[-1] < eager.losses[0], f"{name}: the eager run did not learn: {eager.losses}"
    for step, (a, b) in enumerate(zip(native.losses, eager.losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{name} step {step}: native loss {a} vs eager {b}"
    for key, value in eager.parameters.items():
        torch.testing.assert_close(native.parameters[key], value, msg=lambda m: f"{name} {key}: {m}")


def test_swapped_native_runs_fewer_kernels(runs):
    name, results = runs
    eager = results[example_harness.EAGER].kernels_per_step
    native = results["native"].kernels_per_step
    print(f"\n{name}: kernels per training step: eager {eager.total()}, native {native.total()}")
    assert not any(k.startswith("kasmina::") for k in eager)
    assert native["kasmina::blend_gate"] == native["kasmina::blend_gate_backward"] == 1
    assert native["kasmina::gate_network"] == native["kasmina::gate_network_backward"] == 1
    assert native.total() < eager.total()


def test_swap_is_undone_after_the_runs(runs):
    assert seed_slots.blend_gate is eager_blend_gate


def test_kernel_count_sees_every_kernel_call():
    """The counter is not vacuous: 3 elementwise ops and a reduction count 4, a view 0."""
    x = torch.randn(8, 8)

    def work():
        y = (x + 1).mul(2).view(64).relu()
        y.sum()

    assert example_harness.count_kernels(work, x.device).total() == 4


def _run_example(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("script", ["esper_cnn.py", "esper_transformer.py"])
def test_example_prints_its_per_backend_table(script):
    out = _run_example(script, "--steps", "4", "--backends", "reference,native")
    lines = out.splitlines()
    assert any(line.startswith("backend") and "kernels/step" in line for line in lines), out
    for backend in ("eager", "reference", "native"):
        row = [line for line in lines if line.split()[:1] == [backend]]
        assert len(row) == 1, out
        assert len(row[0].split()) == 6, row


@pytest.mark.skipif(
    "triton" not in kk.available_backends("cpu"),
    reason="the triton backend runs on CPU only under TRITON_INTERPRET=1 (tools/test.sh sets it)",
)
def test_cnn_example_on_triton_interpreter():
    out = _run_example("esper_cnn.py", "--steps", "2", "--backends", "triton", "--no-count")
    assert any(line.split()[:1] == ["triton"] for line in out.splitlines()), out


def test_example_rejects_a_backend_it_cannot_run():
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES.parent), TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "esper_cnn.py"), "--backends", "triton"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2 and "'triton' is not available on cpu" in proc.stderr


BF16_STEP_TOLERANCE = 2 * torch.finfo(torch.bfloat16).eps  # relative, per step: two bf16 ulps at 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 autocast training on GPU)")
@pytest.mark.parametrize("example", list(MODELS))
def test_cuda_bf16_autocast_training_matches_eager(example):
    """On a GPU: every fused CUDA backend trains under bf16 autocast to the eager run's losses
    within bf16 tolerance per step, with fewer device kernels per training step."""
    module = MODELS[example]
    device = torch.device("cuda")
    backends = [b for b in kk.available_backends(device) if b != "reference"]
    assert backends, "a CUDA device but no fused backend for it"
    results = example_harness.compare_backends(
        module.build_model, module.make_batches(STEPS, device=device), backends, autocast_dtype=torch.bfloat16
    )
    eager = results[0]
    for r in results[1:]:
        for step, (a, b) in enumerate(zip(r.losses, eager.losses)):
            assert abs(a - b) <= BF16_STEP_TOLERANCE * abs(b), f"{r.backend} step {step}: {a} vs eager {b}"
        print(f"\n{example} cuda {r.backend}: kernels/step {r.kernels_per_step.total()} "
              f"vs eager {eager.kernels_per_step.total()}")
        assert r.kernels_per_step.total() < eager.kernels_per_step.total()
