"""CUDA graphs and host synchronization (CUDA only; every test here skips without a GPU).

- Each op of each fused backend on CUDA (native, triton), forward and backward, is captured
  into a CUDA graph; replayed after fresh values are copied into its static inputs, it gives
  bit for bit what an eager call of the same backend gives on those values.
- No op synchronizes with the host, forward or backward: the calls run under
  torch.cuda.set_sync_debug_mode("error"), which raises on every synchronizing CUDA call torch
  makes (device-to-host copies, .item(), stream or device synchronization, pageable copies).

Alpha comes per sample on the device, or as a 0-dim CPU scalar beside the CUDA features
(Esper's schedule scalar) that does not require grad. A CPU scalar is read on the host when
the op is called, so a graph keeps the value it had at capture: the replays here change the
device tensors only. A CPU scalar that requires grad needs its gradient copied back to the
CPU, a synchronization by definition (eager PyTorch does the same), so it is not tested here.
"""

from __future__ import annotations

import pytest
import torch

from kasmina_kernels.opcases import make
from kasmina_kernels.optable import OPS

from cases import backend_device_params
from test_contracts import bits_equal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible to torch)")

SHAPE = (8, 16, 12, 12)
SHAPES = {"gated_pool": {"cnn": (8, 16, 12, 12), "transformer": (8, 24, 32)},
          "gate_network": {"cnn": (8, 16, 12, 12), "transformer": (8, 24, 32)}}
ALPHA_POSITION = {"blend_add": 2, "blend_with_isolation": 2, "blend_multiply": 2, "blend_gate": 2,
                  "multiply_valve_multiplier": 0, "gate_effective_alpha": 0}

def _variants():
    out = []
    for case in OPS:
        if case.name in SHAPES:
            forms = ("cnn", "transformer")
        elif case.name in ALPHA_POSITION:
            forms = ("device_alpha", "cpu_alpha")
        else:
            forms = ("plain",)
        out += [(case, form) for form in forms]
    return out


def _params():
    params = []
    for p in backend_device_params(devices=("cuda",)):
        backend = p.values[0]
        for case, form in _variants():
            params.append(pytest.param(backend, case, form, id=f"{p.id}-{case.name}-{form}", marks=p.marks))
    return params


def _inputs(case, form, seed: int):
    """(args, kwargs) on CUDA; float CUDA tensors are the leaves that require grad."""
    shape = SHAPES.get(case.name, {}).get(form, SHAPE)
    if case.name == "gate_effective_alpha":
        shape = (SHAPE[0], 1, 1, 1)
    args, kwargs = make(case, shape, torch.float32, "cuda", torch.Generator().manual_seed(seed))
    args = list(args)
    if form == "cpu_alpha":
        args[ALPHA_POSITION[case.name]] = torch.tensor(0.6)
    return args, kwargs


def _leaves(args, kwargs):
    return [t for t in list(args) + list(kwargs.values())
            if isinstance(t, torch.Tensor) and t.is_cuda and t.is_floating_point()]


def _step(fn, args, kwargs, grad_out):
    y = fn(*args, **kwargs)
    grads = torch.autograd.grad(y, _leaves(args, kwargs), grad_out)
    return (y,) + tuple(grads)


def _fresh_leaves(args, kwargs):
    for t in _leaves(args, kwargs):
        t.requires_grad_(True)
    return args, kwargs


def _op(case, backend):
    fn = case.public
    return lambda *a, **k: fn(*a, **k, backend=backend)


@pytest.mark.parametrize("backend,case,form", _params())
def test_capture_and_replay_with_fresh_inputs(backend, case, form):
    fn = _op(case, backend)
    args, kwargs = _fresh_leaves(*_inputs(case, form, seed=1))
    grad_out = torch.randn_like(fn(*args, **kwargs))
    # warm up on a side stream (Triton compiles and autotunes on first calls), as the docs ask
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(fn, args, kwargs, grad_out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(fn, args, kwargs, grad_out)
    for trial in range(2):
        new_args, new_kwargs = _inputs(case, form, seed=10 + trial)
        with torch.no_grad():
            for static, new in zip(_leaves(args, kwargs), _leaves(new_args, new_kwargs)):
                static.copy_(new)
            grad_out.copy_(torch.randn_like(grad_out))
        graph.replay()
        torch.cuda.synchronize()
        eager = _step(fn, *_fresh_leaves(new_args, new_kwargs), grad_out.clone())
        assert len(eager) == len(static_out)
        for k, (got, want) in enumerate(zip(static_out, eager)):
            assert bits_equal(got, want), f"replay {trial}: output {k} differs from an eager call"


@pytest.mark.parametrize("backend,case,form", _params())
def test_no_host_sync(backend, case, form):
    fn = _op(case, backend)
    args, kwargs = _fresh_leaves(*_inputs(case, form, seed=3))
    grad_out = torch.randn_like(fn(*args, **kwargs))  # first call outside: compilation may sync
    _step(fn, args, kwargs, grad_out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _step(fn, args, kwargs, grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.is_cuda for t in out)
