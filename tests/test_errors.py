"""Bad input gets a clear error, never a crash or a silently broadcast answer: shape, device,
topology and backend-name problems raise ValueError, dtype problems TypeError, and naming a
backend that cannot run raises BackendUnavailableError saying why and how.

A second device is simulated with the "meta" device (there is no GPU here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kasmina_kernels as kk
from kasmina_kernels.backends import ENV_VAR
from kasmina_kernels.validation import broadcast_shape

from cases import backend_params

BACKENDS = backend_params(include_reference=True)
SHAPE = (2, 3, 4, 5)


def t(shape=SHAPE, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device) if dtype.is_floating_point or dtype.is_complex \
        else torch.ones(shape, dtype=dtype, device=device)


def blend_calls(h, s, alpha, backend, gate=None):
    gate = torch.rand(SHAPE[0], 1, 1, 1) if gate is None else gate
    return {
        "blend_add": lambda: kk.blend_add(h, s, alpha, backend=backend),
        "blend_with_isolation": lambda: kk.blend_with_isolation(h, s, alpha, backend=backend),
        "blend_multiply": lambda: kk.blend_multiply(h, s, alpha, backend=backend),
        "blend_gate": lambda: kk.blend_gate(h, s, alpha, gate, backend=backend),
    }


BLEND_NAMES = ["blend_add", "blend_with_isolation", "blend_multiply", "blend_gate"]


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", BLEND_NAMES + ["ste_forward"])
def test_host_seed_shape_mismatch(backend, op):
    h, s = t(), t((2, 3, 4, 6))
    with pytest.raises(ValueError, match="shape"):
        if op == "ste_forward":
            kk.ste_forward(h, s, backend=backend)
        else:
            blend_calls(h, s, torch.tensor(0.5), backend)[op]()


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_broadcastable_to_host_is_still_rejected(backend):
    """s of shape (1,C,H,W) would broadcast against h: the ops require equal shapes."""
    with pytest.raises(ValueError, match="shape"):
        kk.blend_add(t(), t((1, 3, 4, 5)), torch.tensor(0.5), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_input_shape_mismatch(backend):
    with pytest.raises(ValueError, match="shape"):
        kk.blend_multiply(t(), t(), torch.tensor(0.5), seed_input=t((2, 3, 4, 1)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", BLEND_NAMES)
@pytest.mark.parametrize("alpha_shape", [(3,), (2, 2, 1, 1), (4, 1, 1, 1), (5, 4)], ids=str)
def test_alpha_not_broadcastable(backend, op, alpha_shape):
    with pytest.raises(ValueError, match="alpha"):
        blend_calls(t(), t(), torch.rand(alpha_shape), backend)[op]()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", BLEND_NAMES)
@pytest.mark.parametrize("case", ["extra_leading_dim", "batch_of_one_host"])
def test_alpha_that_would_enlarge_the_output(backend, op, case):
    if case == "extra_leading_dim":
        h, s, alpha = t(), t(), torch.rand((3,) + SHAPE)
    else:  # h has batch 1, alpha has batch 2: broadcasting would make the output bigger
        h, s, alpha = t((1, 3, 4, 5)), t((1, 3, 4, 5)), torch.rand(2, 1, 1, 1)
    gate = torch.rand(h.shape[0], 1, 1, 1)
    with pytest.raises(ValueError, match="alpha"):
        blend_calls(h, s, alpha, backend, gate=gate)[op]()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_shape", [(3, 1, 1, 1), (2, 2, 1, 1), (1, 2, 3, 4, 5), (5, 5)], ids=str)
def test_gate_not_broadcastable_or_enlarging(backend, gate_shape):
    with pytest.raises(ValueError, match="gate"):
        kk.blend_gate(t(), t(), torch.tensor(0.5), torch.rand(gate_shape), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_valve_alpha_enlarging_m(backend):
    with pytest.raises(ValueError, match="alpha"):
        kk.multiply_valve_multiplier(torch.rand(4, 1, 1, 1), t(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_effective_alpha_shapes_do_not_broadcast(backend):
    with pytest.raises(ValueError, match="broadcast"):
        kk.gate_effective_alpha(torch.rand(3, 1, 1, 1), torch.rand(2, 1, 1, 1), backend=backend)


_dims = st.integers(min_value=0, max_value=3)


@given(st.lists(_dims, max_size=4), st.lists(_dims, max_size=4))
def test_broadcast_shape_agrees_with_torch(a, b):
    """The eager checks' fast broadcast rule is torch's, zero-size dimensions included."""
    try:
        expected = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        expected = None
    assert broadcast_shape(a, b) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_features_are_accepted(backend):
    """Esper's eager functions take 0-dim features, so the ops do (tests/cases.py's
    scalar_cases judge them by the equivalence rule); a weight that would enlarge them is
    still refused."""
    h, s, a = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.5)
    assert kk.blend_add(h, s, a, backend=backend).shape == ()
    assert kk.multiply_valve_multiplier(a, s, backend=backend).shape == ()
    with pytest.raises(ValueError, match="alpha of shape \\(1,\\) does not broadcast"):
        kk.blend_add(h, s, torch.tensor([0.5]), backend=backend)
    with pytest.raises(ValueError, match="gate of shape \\(1, 1\\) does not broadcast"):
        kk.blend_gate(h, s, a, torch.ones(1, 1), backend=backend)
    with pytest.raises(ValueError, match="seed shape \\(1,\\) differs from the host shape"):
        kk.ste_forward(h, s.reshape(1), backend=backend)


# ----------------------------------------------------------------------------- devices
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["seed", "host"])
def test_host_and_seed_on_different_devices(backend, which):
    h, s = t(), t()
    if which == "seed":
        s = s.to("meta")
    else:
        h = h.to("meta")
    with pytest.raises(ValueError, match="meta"):
        kk.blend_add(h, s, torch.tensor(0.5), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [
    torch.rand(2, 1, 1, 1, device="meta"),  # per-sample alpha elsewhere
    torch.tensor(0.5, device="meta"),  # a 0-dim alpha that is not a CPU scalar
], ids=["per_sample_meta", "scalar_meta"])
def test_alpha_on_another_device(backend, alpha):
    with pytest.raises(ValueError, match="alpha"):
        kk.blend_add(t(), t(), alpha, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_and_seed_input_on_another_device(backend):
    with pytest.raises(ValueError, match="gate"):
        kk.blend_gate(t(), t(), torch.tensor(0.5), torch.rand(2, 1, 1, 1, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="seed_input"):
        kk.blend_multiply(t(), t(), torch.tensor(0.5), seed_input=t(device="meta"), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_network_weights_on_another_device(backend):
    x = t((2, 16, 3, 3))
    w1, b1, w2, b2 = torch.randn(8, 16), torch.randn(8), torch.randn(1, 8), torch.randn(1)
    with pytest.raises(ValueError, match="w1"):
        kk.gate_network(x, w1.to("meta"), b1, w2, b2, topology="cnn", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_effective_alpha_pair_on_different_devices(backend):
    with pytest.raises(ValueError):
        kk.gate_effective_alpha(torch.rand(2, 1, 1, 1, device="meta"), torch.rand(2, 1, 1, 1), backend=backend)


def test_zero_dim_cpu_alpha_is_allowed_beside_another_device():
    """A 0-dim CPU scalar may sit beside features on any device (Esper's schedule scalar)."""
    h, s = t(device="meta"), t(device="meta")
    y = kk.blend_add(h, s, torch.tensor(0.5), backend="reference")
    assert y.device.type == "meta" and y.shape == h.shape
    e = kk.gate_effective_alpha(torch.tensor(0.5), torch.rand(2, 1, 1, 1, device="meta"), backend="reference")
    assert e.device.type == "meta"


def test_native_on_a_device_it_has_no_kernels_for():
    with pytest.raises(kk.BackendUnavailableError, match="meta"):
        kk.blend_add(t(device="meta"), t(device="meta"), torch.tensor(0.5), backend="native")


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8],
                         ids=str)
@pytest.mark.parametrize("where", ["host", "seed"])
def test_unsupported_feature_dtypes(backend, dtype, where):
    h, s = t(), t()
    if where == "host":
        h = t(dtype=dtype)
    else:
        s = t(dtype=dtype)
    with pytest.raises(TypeError):
        kk.blend_add(h, s, torch.tensor(0.5), backend=backend)
    with pytest.raises(TypeError):
        kk.ste_forward(h, s, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [torch.tensor(True), torch.tensor(0.5 + 0.5j)], ids=["bool", "complex"])
def test_unsupported_alpha_dtypes(backend, alpha):
    with pytest.raises(TypeError):
        kk.blend_add(t(), t(), alpha, backend=backend)
    with pytest.raises(TypeError):
        kk.multiply_valve_multiplier(alpha, t(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_tensor_alpha(backend):
    with pytest.raises(TypeError):
        kk.blend_add(t(), t(), 0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_gate(backend):
    with pytest.raises(TypeError):
        kk.blend_gate(t(), t(), torch.tensor(0.5), torch.ones(2, 1, 1, 1, dtype=torch.int64), backend=backend)
    with pytest.raises(TypeError):
        kk.gate_effective_alpha(torch.tensor(1), torch.ones(2, 1, 1, 1, dtype=torch.int64), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_dtypes_for_pool_and_gate_network(backend):
    with pytest.raises(TypeError):
        kk.gated_pool(t((2, 3, 4, 5), dtype=torch.int32), "cnn", backend=backend)
    with pytest.raises(TypeError):
        kk.gated_pool(t((2, 3, 4), dtype=torch.complex64), "transformer", backend=backend)
    x = t((2, 16, 3, 3))
    w1 = torch.ones(8, 16, dtype=torch.int64)
    with pytest.raises(TypeError):
        kk.gate_network(x, w1, torch.randn(8), torch.randn(1, 8), torch.randn(1), topology="cnn", backend=backend)


# ----------------------------------------------------------------------------- topology
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topology,shape", [("cnn", (2, 3, 4)), ("cnn", (2, 3, 4, 5, 6)),
                                            ("transformer", (2, 3, 4, 5)), ("transformer", (2, 3))],
                         ids=str)
def test_wrong_rank_for_topology(backend, topology, shape):
    with pytest.raises(ValueError, match="rank|expects"):
        kk.gated_pool(t(shape), topology, backend=backend)
    c = shape[1] if topology == "cnn" else shape[-1]
    with pytest.raises(ValueError, match="rank|expects"):
        kk.gate_network(t(shape), torch.randn(8, c), torch.randn(8), torch.randn(1, 8), torch.randn(1),
                        topology=topology, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topology", ["rnn", "CNN", "", None])
def test_unknown_topology(backend, topology):
    with pytest.raises(ValueError, match="topology"):
        kk.gated_pool(t(), topology, backend=backend)
    with pytest.raises(ValueError, match="topology"):
        kk.gate_network(t(), torch.randn(8, 3), torch.randn(8), torch.randn(1, 8), torch.randn(1),
                        topology=topology, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["w1", "b1", "w2", "b2"])
def test_gate_network_weight_shapes(backend, bad):
    x = t((2, 16, 3, 3))
    w = {"w1": torch.randn(8, 16), "b1": torch.randn(8), "w2": torch.randn(1, 8), "b2": torch.randn(1)}
    w[bad] = torch.randn(*(n + 1 for n in w[bad].shape))
    with pytest.raises(ValueError, match=bad):
        kk.gate_network(x, w["w1"], w["b1"], w["w2"], w["b2"], topology="cnn", backend=backend)


# ----------------------------------------------------------------------------- backend names
@pytest.mark.parametrize("name", ["bogus", "Native ", "cuda", ""])
def test_unknown_backend_argument(name):
    with pytest.raises(ValueError, match="backend"):
        kk.blend_add(t(), t(), torch.tensor(0.5), backend=name)
    with pytest.raises(ValueError, match="backend"):
        kk.resolve_backend(t(), name)


def test_unknown_backend_in_use_backend():
    with pytest.raises(ValueError, match="backend"):
        with kk.use_backend("bogus"):
            pass


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        kk.blend_add(t(), t(), torch.tensor(0.5))
    with pytest.raises(ValueError, match="bogus"):
        kk.resolve_backend(t())


def _run_without_interpreter(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_triton_on_cpu_without_interpreter_says_why_and_how():
    """Run in a fresh interpreter without TRITON_INTERPRET (availability is settled at import)."""
    proc = _run_without_interpreter("""
        import torch, kasmina_kernels as kk
        h = torch.randn(2, 3, 4, 5)
        try:
            kk.blend_add(h, h.clone(), torch.tensor(0.5), backend="triton")
        except kk.BackendUnavailableError as exc:
            print("RAISED", type(exc).__name__)
            print(exc)
        else:
            print("NO ERROR")
        print("AVAILABLE", kk.available_backends("cpu"))
    """)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "RAISED BackendUnavailableError" in out, out
    assert "TRITON_INTERPRET=1" in out, f"the message should say how to enable it: {out}"
    assert "interpreter" in out.lower() or "cpu" in out.lower(), out
    assert "'triton'" not in out.split("AVAILABLE", 1)[1], "triton listed as available on CPU"
    assert issubclass(kk.BackendUnavailableError, RuntimeError)


# ----------------------------------------------------------------------------- the raw ops
def test_raw_ops_check_their_inputs():
    """A direct torch.ops.kasmina call gets a clear error from the C++ checks."""
    ops = torch.ops.kasmina
    with pytest.raises(RuntimeError, match="shape"):
        ops.blend_add(t(), t((2, 3, 4, 6)), torch.tensor(0.5))
    with pytest.raises(RuntimeError, match="float"):
        ops.blend_add(t(dtype=torch.int32), t(dtype=torch.int32), torch.tensor(0.5))
    with pytest.raises(RuntimeError, match="broadcast"):
        ops.blend_gate(t(), t(), torch.tensor(0.5), torch.rand(3, 1, 1, 1))
    with pytest.raises(RuntimeError, match="topology"):
        ops.gated_pool(t(), "rnn")
    with pytest.raises(RuntimeError, match="expects"):
        ops.gated_pool(t((2, 3, 4)), "cnn")
