"""`kasmina_kernels.nn.GatedBlend` against the eager module (`EagerGatedBlend`, Esper's
computation): constructor and errors, parameter names, checkpoints both ways with
strict=True, forward and every gradient (input and all four parameters) on each backend,
wrong input rank, step/reset_cache, no cached state across threads, torch.compile."""

from __future__ import annotations

import copy
import re
import threading

import pytest
import torch
from torch import nn

import kasmina_kernels as kk
from kasmina_kernels.nn import EagerGatedBlend, GatedBlend

from cases import backend_params
from equivalence import assert_equivalent, case_generator

F32, BF16 = torch.float32, torch.bfloat16
EXPECTED_KEYS = ["gate.0.weight", "gate.0.bias", "gate.2.weight", "gate.2.bias"]


def _rnd(shape, key, dtype=F32, *, cl=False):
    t = torch.randn(shape, generator=case_generator(key)).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _randomized(module: nn.Module, key: str) -> nn.Module:
    """Fresh random parameters (not the default init), so every case sees different weights."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(_rnd(tuple(p.shape), f"{key}/{name}") * 0.5)
    return module


# ----------------------------------------------------------------------------- construction
def test_constructor_matches_esper():
    m = GatedBlend(64)
    assert m.algorithm_id == GatedBlend.algorithm_id == "gated"
    assert (m.topology, m.total_steps, m._current_step) == ("cnn", 10, 0)
    assert [type(layer) for layer in m.gate] == [nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid]
    assert (m.gate[0].in_features, m.gate[0].out_features) == (64, 16)
    assert (m.gate[2].in_features, m.gate[2].out_features) == (16, 1)
    assert list(m.state_dict()) == EXPECTED_KEYS
    assert [n for n, _ in m.named_parameters()] == EXPECTED_KEYS
    t = GatedBlend(3, topology="transformer", total_steps=4)
    assert (t.topology, t.total_steps, t.gate[0].out_features) == ("transformer", 4, 8)  # hidden max(8, C//4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"channels": 0}, "channels > 0"),
        ({"channels": -3}, "channels > 0"),
        ({"channels": 8, "topology": "rnn"}, "Unknown topology 'rnn'"),
        ({"channels": 8, "total_steps": 0}, "total_steps > 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedBlend(**kwargs)
    with pytest.raises(ValueError, match=match):
        EagerGatedBlend(**kwargs)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_checkpoint_round_trip_both_ways_strict(topology):
    x = _rnd((4, 12, 5, 3) if topology == "cnn" else (4, 7, 12), f"ckpt/{topology}/x")
    eager = _randomized(EagerGatedBlend(12, topology=topology), f"ckpt/{topology}/eager")
    fused = GatedBlend(12, topology=topology)
    loaded = fused.load_state_dict(eager.state_dict(), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    torch.testing.assert_close(fused(x), eager.get_alpha_for_blend(x))
    # and back: a checkpoint of the fused module into a fresh eager module
    fused2 = _randomized(GatedBlend(12, topology=topology), f"ckpt/{topology}/fused")
    eager2 = EagerGatedBlend(12, topology=topology)
    eager2.load_state_dict(fused2.state_dict(), strict=True)
    for key, value in fused2.state_dict().items():
        assert torch.equal(eager2.state_dict()[key], value)
    torch.testing.assert_close(eager2.get_alpha_for_blend(x), fused2.get_alpha_for_blend(x))
    # a plain Esper-shaped module (the Sequential under the name "gate") loads too
    holder = nn.Module()
    holder.gate = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    GatedBlend(12, topology=topology).load_state_dict(holder.state_dict(), strict=True)
    # a checkpoint for other channels is refused
    with pytest.raises(RuntimeError, match="size mismatch"):
        GatedBlend(16, topology=topology).load_state_dict(eager.state_dict(), strict=True)


# ----------------------------------------------------------------------------- equivalence
def _forward_backward(module: nn.Module, x: torch.Tensor, g: torch.Tensor, *, upcast=False) -> dict:
    module = copy.deepcopy(module)
    if upcast:
        module = module.double()
        x = x.double()
    x = x.detach().requires_grad_(True)
    y = module.get_alpha_for_blend(x)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(y, [x, *params.values()], g.to(y.dtype))
    out = {"y": y.detach(), "dx": grads[0]}
    out.update({"d" + name: gr for name, gr in zip(params, grads[1:])})
    return out


CASES = {
    "cnn-f32-channels_last": ("cnn", (5, 24, 7, 3), F32, True),
    "cnn-bf16": ("cnn", (4, 40, 3, 5), BF16, False),
    "transformer-f32": ("transformer", (3, 11, 36), F32, False),
    "transformer-bf16": ("transformer", (2, 9, 20), BF16, False),
}


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("case", list(CASES))
def test_gated_blend_matches_eager_module(case, backend):
    topology, shape, dtype, cl = CASES[case]
    channels = shape[1] if topology == "cnn" else shape[2]
    eager = _randomized(EagerGatedBlend(channels, topology=topology), f"eq/{case}").to(dtype)
    fused = GatedBlend(channels, topology=topology).to(dtype)
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = _rnd(shape, f"eq/{case}/x", dtype, cl=cl)
    g = _rnd((shape[0],) + (1,) * (len(shape) - 1), f"eq/{case}/g", dtype)
    with kk.use_backend(backend):
        got = _forward_backward(fused, x, g)
    ref = _forward_backward(eager, x, g)
    oracle = _forward_backward(eager, x, g, upcast=True)
    assert got["y"].shape == ((shape[0], 1, 1, 1) if topology == "cnn" else (shape[0], 1, 1))
    assert bool(((got["y"] >= 0) & (got["y"] <= 1)).all())
    assert set(got) == {"y", "dx"} | {"d" + k for k in EXPECTED_KEYS}
    assert_equivalent(got, ref, oracle, elementwise={"dx"}, context=f"GatedBlend {case} on {backend}")


def test_forward_runs_the_fused_gate_network():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    m, x = GatedBlend(16), _rnd((2, 16, 4, 4), "rec/x")
    with kk.use_backend("native"), Recorder() as rec:
        m(x)
    assert rec.names == ["kasmina::gate_network"]


@pytest.mark.parametrize(
    "topology,shape",
    [("cnn", (2, 8, 4)), ("cnn", (2, 8, 4, 4, 1)), ("transformer", (2, 3, 4, 8)), ("transformer", (8,)),
     ("cnn", ()), ("transformer", ())],
)
@pytest.mark.parametrize("cls", [GatedBlend, EagerGatedBlend])
def test_wrong_rank_is_an_assertion_error_as_in_esper(cls, topology, shape):
    """Esper's GatedBlend asserts the rank: the same exception type, the message opening with
    Esper's words."""
    m = cls(8, topology=topology)
    opening = "CNN topology expects 4D input" if topology == "cnn" else "Transformer topology expects 3D input"
    with pytest.raises(AssertionError) as info:
        m.get_alpha_for_blend(torch.randn(shape))
    assert str(info.value).startswith(opening), str(info.value)
    assert str(tuple(shape)) in str(info.value)


@pytest.mark.parametrize("topology,shape", [("cnn", (2, 9, 4, 4)), ("transformer", (2, 5, 7))])
@pytest.mark.parametrize("cls", [GatedBlend, EagerGatedBlend])
def test_wrong_channels_is_a_clear_error(cls, topology, shape):
    """Esper's Linear raises RuntimeError for the wrong channel count: the same type, a clearer
    message."""
    m = cls(8, topology=topology)
    layout = "(B,C,H,W)" if topology == "cnn" else "(B,T,C)"
    message = f"expects x of shape {layout} with 8 channels, got shape {tuple(shape)}"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        m.get_alpha_for_blend(torch.randn(shape))


# ----------------------------------------------------------------------------- step, cache
def test_step_records_the_schedule_step_and_does_not_change_the_gate():
    """Esper's BlendAlgorithm.step(step): sets _current_step to the value given, whatever it is;
    the argument is required."""
    m, x = GatedBlend(8, total_steps=2), _rnd((3, 8, 2, 2), "step/x")
    before = m(x)
    for value in (7, 0, 1.5, -1):
        m.step(value)
        assert m._current_step == value
    assert torch.equal(m(x), before)
    with pytest.raises(TypeError):
        m.step()


def test_no_cached_state_anywhere():
    """Only parameters and plain settings live on the module: no tensors outside the
    parameters, no thread-local or other cache objects; reset_cache changes nothing."""
    m = GatedBlend(8)
    x = _rnd((3, 8, 2, 2), "cache/x")
    y = m(x)
    for module in m.modules():
        assert not module._buffers
        for value in vars(module).values():
            assert not isinstance(value, (torch.Tensor, threading.local)), value
    m.reset_cache()
    assert torch.equal(m(x), y)
    with torch.no_grad():  # a parameter update is seen by the very next call
        m.gate[2].bias += 1.0
    assert not torch.equal(m(x), y)


def test_threads_each_see_their_own_replica():
    """DataParallel-style: replicas with different weights called from several threads at
    once each give their own eager result."""
    replicas = [_randomized(GatedBlend(16), f"thr/{i}") for i in range(4)]
    xs = [_rnd((3, 16, 4, 4), f"thr/x{i}") for i in range(4)]
    expected = []
    for r, x in zip(replicas, xs):
        e = EagerGatedBlend(16)
        e.load_state_dict(r.state_dict(), strict=True)
        expected.append(e(x).detach())
    results = [None] * 4
    barrier = threading.Barrier(4)

    def work(i):
        barrier.wait()
        for _ in range(20):
            results[i] = replicas[i](xs[i]).detach()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- compile
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_gated_blend_compiles_fullgraph(topology, backend):
    shape = (3, 16, 4, 5) if topology == "cnn" else (3, 6, 16)
    m = _randomized(GatedBlend(16, topology=topology), f"comp/{topology}")
    x = _rnd(shape, f"comp/{topology}/x", cl=topology == "cnn")
    g = _rnd((3,) + (1,) * (len(shape) - 1), f"comp/{topology}/g")
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with kk.use_backend(backend):
        xc = x.clone().requires_grad_(True)
        yc = compiled(xc)
        grads_c = torch.autograd.grad(yc, [xc, *m.parameters()], g)
        xe = x.clone().requires_grad_(True)
        ye = m(xe)
        grads_e = torch.autograd.grad(ye, [xe, *m.parameters()], g)
    assert torch.equal(yc, ye)
    for a, b in zip(grads_c, grads_e):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- autocast
def _autocast_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _autocast_devices())
@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("dtype", [F32, BF16, torch.float16], ids=str)
@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_gated_blend_under_autocast_returns_the_eager_dtype(topology, dtype, backend, device):
    """Under autocast Esper's Linear layers run in the autocast dtype, so its gate has that
    dtype whatever the features' dtype; the fused module's gate has it too, and it and every
    gradient are judged by the equivalence rule (the oracle: the exact math, no autocast)."""
    shape = (4, 16, 5, 3) if topology == "cnn" else (3, 7, 16)
    key = f"autocast/{topology}/{dtype}"
    eager = _randomized(EagerGatedBlend(16, topology=topology), key).to(device)
    fused = GatedBlend(16, topology=topology).to(device)
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = _rnd(shape, key + "/x", dtype, cl=topology == "cnn").to(device)
    amp = torch.get_autocast_dtype(device)

    def run(module, upcast=False):
        if upcast:
            return _forward_backward(module, x, g, upcast=True)
        with torch.autocast(device, dtype=amp):
            return _forward_backward(module, x, g)

    with torch.autocast(device, dtype=amp):
        want_dtype = eager.get_alpha_for_blend(x).dtype
    assert want_dtype == amp
    g = _rnd((shape[0],) + (1,) * (len(shape) - 1), key + "/g", amp).to(device)
    with kk.use_backend(backend):
        got = run(fused)
    ref = run(eager)
    assert got["y"].dtype == ref["y"].dtype == amp
    for k in got:
        assert got[k].dtype == ref[k].dtype, k
    oracle = run(eager, upcast=True)
    assert_equivalent(got, ref, oracle, elementwise={"dx"}, context=f"GatedBlend under autocast {key} on {backend}")
