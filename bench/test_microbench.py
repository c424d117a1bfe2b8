"""Microbenchmarks (pytest-benchmark): op x backend x dtype (float32, bfloat16) x shape, forward
and forward+backward, each backend checked against the eager reference before it is timed.

    pytest bench/ --benchmark-only                                  # everything
    pytest bench/ --benchmark-only -k "blend_add and float32"       # a slice
    pytest bench/ --benchmark-only --benchmark-autosave             # save JSON (.benchmarks/)
    pytest bench/ --benchmark-only --benchmark-compare              # against the last save

Each benchmark group (op, dtype, shape, mode) holds the backends side by side, "reference"
being eager PyTorch. Inputs are random (never zero) and rotate through copies that span more
than twice the GPU's L2 cache (64 MiB on CPU). pytest-benchmark times wall clock, so on CUDA
each timed call ends with a synchronize (host overhead included); device-event timings, the
torch.compile peer and the byte-count bandwidth figures are in `kasmina-kernels bench`.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

from kasmina_kernels import backends  # noqa: E402
from kasmina_kernels.optable import BY_NAME  # noqa: E402
from kasmina_kernels.bench import bytemodel, sweep, workload  # noqa: E402
from kasmina_kernels.bench.plan import ALL_OPS, ESPER_SHAPES, SMALL_SHAPES, default_device  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("forward", "forward+backward")
SHAPES = {"small": SMALL_SHAPES, "esper": ESPER_SHAPES, "all": SMALL_SHAPES + ESPER_SHAPES}


def _shape_id(shape) -> str:
    return "x".join(str(v) for v in shape)


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    shapes = SHAPES[metafunc.config.getoption("--bench-shapes")]
    params, ids = [], []
    # backend innermost, so consecutive benchmarks share one workload (see _workload)
    for dtype in DTYPES:
        for shape in shapes:
            for op in ALL_OPS:
                for mode in MODES:
                    for backend in backends.BACKENDS:
                        params.append((op, shape, dtype, mode, backend))
                        ids.append(f"{op}-{_shape_id(shape)}-{dtype}-{mode}-{backend}")
    metafunc.parametrize("bench_case", params, ids=ids)


_cache: dict = {}


def _workload(op, shape, dtype, device):
    """The last (op, shape, dtype) workload, kept while its backends run; checks are cached."""
    key = (op, shape, dtype, device)
    if _cache.get("key") != key:
        _cache.clear()
        gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
        w = workload.build(BY_NAME[op], shape, DTYPES[dtype], device, gen, sweep.rotate_bytes(device))
        _cache.update(key=key, w=w, checked={}, check=None)
    return _cache


def _check(entry, backend, impl):
    """Judges the backend once per workload by the equivalence rule; fails the test if any
    output or gradient does not match the reference."""
    if backend not in entry["checked"]:
        entry["check"] = entry["check"] or entry["w"].check()
        entry["checked"][backend] = sweep._check(impl, entry["check"])["problems"]
    return entry["checked"][backend]


def test_op(benchmark, bench_case, request):
    op, shape, dtype, mode, backend = bench_case
    device = default_device(request.config.getoption("--bench-device"))
    if backend == "triton" and device.type == "cpu":
        pytest.skip("triton on CPU runs only in its interpreter (TRITON_INTERPRET=1), far too slow "
                    "to say anything about the kernels; it is benchmarked on CUDA")
    why = backends.backend_status(backend, device.type)
    if why is not None:
        pytest.skip(f"backend {backend} unavailable on {device.type}: {why}")
    entry = _workload(op, shape, dtype, device)
    w = entry["w"]
    impl = workload.eager_impl(op) if backend == "reference" else workload.backend_impl(op, backend)
    if backend != "reference":
        bad = _check(entry, backend, impl)
        assert not bad, f"{backend} does not match the reference: " + "; ".join(bad)

    step = (workload.forward_step if mode == "forward" else workload.forward_backward_step)(w, impl)
    state = {"i": -1}

    def call():
        state["i"] = (state["i"] + 1) % w.n_sets
        step.run(state["i"], None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fwd_bytes, bwd_bytes = bytemodel.bytes_moved(op, w.base_args, w.base_kwargs)
    benchmark.group = f"{op} {_shape_id(shape)} {dtype} {mode}"
    benchmark.extra_info.update(op=op, shape=list(shape), dtype=dtype, mode=mode, backend=backend,
                                device=str(device), rotation_sets=w.n_sets,
                                bytes=fwd_bytes + (bwd_bytes if mode != "forward" else 0))
    benchmark.pedantic(call, rounds=15 if device.type == "cpu" else 50, iterations=1,
                       warmup_rounds=3)
