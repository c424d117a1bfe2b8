"""Streaming (non-temporal) stores: the native CPU kernels write outputs that total at least
KASMINA_KERNELS_STREAM_BYTES (read once per process; by default a quarter of the L3, at most
4 MiB) with streaming stores, and smaller ones with plain stores. Test-sized tensors never
reach the default threshold, so two child processes run the same ops, one streaming every
aligned output (threshold 0) and one never streaming: outputs and gradients must agree bit for
bit, NaN/inf inputs included, for aligned blocks and for a shape whose blocks are not aligned
(those fall back to plain stores inside the streaming process), and in Esper's mixed layouts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kasmina_kernels import backends
from kasmina_kernels.opcases import make, run_forward_backward, run_with_grads
from kasmina_kernels.optable import BY_NAME

from test_contracts import bits_equal

OPS = ("blend_add", "blend_gate", "blend_multiply", "multiply_valve_multiplier")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (4,16,8,8): 1024 elements per sample, every block 32-byte aligned; (3,5,7,3): blocks of 105
# elements, most of them misaligned
SHAPES = ((4, 16, 8, 8), (3, 5, 7, 3))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(backends.backend_status("native", "cpu") is not None,
                                reason="the native extension is not available")


def _results(op: str, shape, dtype) -> dict:
    case = BY_NAME[op]
    gen = torch.Generator().manual_seed(11)
    args, kwargs = make(case, shape, dtype, torch.device("cpu"), gen)
    features = max((a for a in args if isinstance(a, torch.Tensor)), key=torch.Tensor.numel)
    flat = features.view(-1)
    flat[3], flat[17], flat[40] = float("nan"), float("inf"), float("-inf")

    def fn(*a, **k):
        return case.public(*a, backend="native", **k)

    return run_with_grads(case, fn, args, kwargs)


def _esper_results(op: str, shape, dtype) -> dict:
    """Esper's layouts (channels_last h, NCHW seed and seed input) with a 0-dim alpha that
    needs no gradient: ADD's backward then writes ds, in the seed's order, through the mixed
    layout tiles' streamed transposes (MULTIPLY's, which gathers s, never streams); STE's
    value is h + 0, streamed in h's order."""
    case = BY_NAME[op]
    gen = torch.Generator().manual_seed(12)
    values = {n: torch.randn(shape, generator=gen, dtype=dtype) for n in ("h", "s", "seed_input")}
    values["h"] = values["h"].contiguous(memory_format=torch.channels_last)
    values["alpha"] = torch.tensor(0.3, dtype=dtype)
    leaves = {n: values[n] for n in case.inputs}

    def fn(*a, **k):
        return case.public(*a, backend="native", **k)

    grad = torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return run_forward_backward(fn, leaves, case.call, ("h", "s"), grad)


def all_results() -> dict:
    results = {f"{op}/{tuple(shape)}/{dtype}": _results(op, shape, dtype)
               for op in OPS for shape in SHAPES for dtype in DTYPES}
    results.update({f"esper/{op}/{tuple(shape)}/{dtype}": _esper_results(op, shape, dtype)
                    for op in ("blend_add", "blend_multiply", "ste_forward") for shape in SHAPES
                    for dtype in DTYPES})
    return results


_CHILD = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_streaming import all_results
torch.save(all_results(), {out!r})
"""


def _run_child(threshold: str, out) -> dict:
    env = dict(os.environ, KASMINA_KERNELS_STREAM_BYTES=threshold)
    subprocess.run([sys.executable, "-c", _CHILD.format(tests=TESTS_DIR, out=str(out))],
                   env=env, check=True, timeout=300)
    return torch.load(out)


def test_streamed_outputs_equal_plain_stores(tmp_path):
    streamed = _run_child("0", tmp_path / "streamed.pt")
    plain = _run_child(str(1 << 60), tmp_path / "plain.pt")
    assert streamed.keys() == plain.keys()
    bad = [f"{key}: {name}" for key, res in plain.items() for name, t in res.items()
           if t is not None and not bits_equal(t, streamed[key][name])]
    assert not bad, "streaming changed bits: " + ", ".join(bad)
