"""Microbenchmarks (pytest-benchmark, bench/README.md): op x backend x dtype (float32, bfloat16)
x shape, forward and forward+backward, each backend checked against the eager reference before
it is timed; one benchmark group per (op, shape, dtype, mode), "reference" being eager PyTorch.
Inputs rotate like `kasmina-kernels bench`'s; pytest-benchmark times wall clock, so on CUDA each
timed call ends with a synchronize (device-event times and bandwidth are the report's job).
"""

from __future__ import annotations

import functools
import itertools
import zlib

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

from kasmina_kernels import backends  # noqa: E402
from kasmina_kernels.bench import bytemodel, sweep, workload  # noqa: E402
from kasmina_kernels.bench.plan import ALL_OPS, ESPER_SHAPES, SMALL_SHAPES, default_device  # noqa: E402
from kasmina_kernels.bench.timing import synchronize  # noqa: E402
from kasmina_kernels.optable import BY_NAME  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("forward", "forward+backward")
SHAPES = {"small": SMALL_SHAPES, "esper": ESPER_SHAPES, "all": SMALL_SHAPES + ESPER_SHAPES}


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        shapes = SHAPES[metafunc.config.getoption("--bench-shapes")]
        # backend innermost, so consecutive benchmarks share one workload (see _workload)
        params = list(itertools.product(DTYPES, shapes, ALL_OPS, MODES, backends.BACKENDS))
        metafunc.parametrize("bench_case", params, ids=["-".join([op, "x".join(map(str, shape)), dt, mode, b])
                                                        for dt, shape, op, mode, b in params])


@functools.lru_cache(maxsize=1)
def _workload(op, shape, dtype, device):
    """The last (op, shape, dtype) workload, kept while its backends run, with each backend's
    check (by the equivalence rule) done once."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((op, shape, dtype, device)).encode()))
    w = workload.build(BY_NAME[op], shape, DTYPES[dtype], device, gen, sweep.rotate_bytes(device))
    return {"w": w, "checked": {}, "judge": None}


def test_op(benchmark, bench_case, request):
    dtype, shape, op, mode, backend = bench_case
    device = default_device(request.config.getoption("--bench-device"))
    why = backend != "reference" and sweep.select_backends(device, [backend])[1].get(backend)
    if why:  # unavailable, or triton on CPU (its interpreter says nothing about the kernels)
        pytest.skip(f"backend {backend} not benchmarked on {device.type}: {why}")
    entry = _workload(op, shape, dtype, device)
    w = entry["w"]
    impl = workload.eager_impl(w) if backend == "reference" else workload.backend_impl(w, backend)
    if backend != "reference":
        if backend not in entry["checked"]:
            entry["judge"] = entry["judge"] or w.check()
            entry["checked"][backend] = sweep.check(impl, entry["judge"])["problems"]
        bad = entry["checked"][backend]
        assert not bad, f"{backend} does not match the reference: " + "; ".join(bad)

    step = (workload.forward_step if mode == "forward" else workload.forward_backward_step)(w, impl)
    rotor = itertools.cycle(range(w.n_sets))

    def call():
        step.run(next(rotor), None)
        synchronize(device)  # pytest-benchmark times wall clock

    _, fwd_bytes, bwd_bytes, _ = bytemodel.traffic(op, w.base_args, w.base_kwargs)
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {dtype} {mode}"
    benchmark.extra_info.update(op=op, shape=list(shape), dtype=dtype, mode=mode, backend=backend,
                                device=str(device), rotation_sets=w.n_sets,
                                bytes=fwd_bytes + (bwd_bytes if mode != "forward" else 0))
    benchmark.pedantic(call, rounds=15 if device.type == "cpu" else 50, iterations=1, warmup_rounds=3)
