"""Backend selection (docs/semantics.md#backends-and-dispatch): `use_backend` blocks nest and win over the
KASMINA_KERNELS_BACKEND environment variable, which wins over "auto"; an explicit `backend=`
argument wins over all; "auto" on CPU is "native" and observable with `resolve_backend`.

Which implementation actually ran is read off the autograd node: the reference's ADD ends in
torch.lerp (LerpBackward0), the native op in its C++ autograd function (a CppNode).
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels.backends import ENV_VAR, backend_status


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _inputs():
    h = torch.randn(2, 3, 4, 5, requires_grad=True)
    return h, torch.randn(2, 3, 4, 5), torch.tensor(0.5)


def ran(**kw) -> str:
    """Which backend an ADD call ran on, from its autograd node."""
    y = kk.blend_add(*_inputs(), **kw)
    name = y.grad_fn.name()
    if "Lerp" in name:
        return "reference"
    if "CppNode" in name:
        return "native"
    return name


def test_the_probe_tells_backends_apart():
    assert ran(backend="reference") == "reference"
    assert ran(backend="native") == "native"


def test_default_is_auto_and_auto_on_cpu_is_native():
    assert kk.current_backend() == "auto"
    cpu = torch.zeros(1)
    assert kk.resolve_backend(cpu) == "native"
    assert kk.resolve_backend(cpu, "auto") == "native"
    assert ran() == "native"
    assert ran(backend="auto") == "native"


def test_use_backend_nests_and_restores():
    cpu = torch.zeros(1)
    with kk.use_backend("reference") as name:
        assert name == "reference"
        assert kk.current_backend() == "reference"
        assert kk.resolve_backend(cpu) == "reference"
        assert ran() == "reference"
        with kk.use_backend("native"):
            assert kk.current_backend() == "native"
            assert ran() == "native"
            with kk.use_backend("auto"):
                assert kk.resolve_backend(cpu) == "native"
            assert kk.current_backend() == "native"
        assert kk.current_backend() == "reference"
        assert ran() == "reference"
    assert kk.current_backend() == "auto"
    assert ran() == "native"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with kk.use_backend("reference"):
            raise RuntimeError("boom")
    assert kk.current_backend() == "auto"


def test_explicit_argument_wins_over_context_and_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    with kk.use_backend("reference"):
        assert ran(backend="native") == "native"
    monkeypatch.setenv(ENV_VAR, "native")
    with kk.use_backend("native"):
        assert ran(backend="reference") == "reference"


def test_environment_variable_is_read_at_each_call(monkeypatch):
    assert ran() == "native"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert kk.current_backend() == "reference"
    assert ran() == "reference"
    monkeypatch.setenv(ENV_VAR, "native")
    assert ran() == "native"
    monkeypatch.setenv(ENV_VAR, "auto")
    assert kk.resolve_backend(torch.zeros(1)) == "native"


def test_use_backend_wins_over_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    with kk.use_backend("native"):
        assert ran() == "native"
    assert ran() == "reference"


def test_use_backend_is_per_thread():
    seen = {}

    def other():
        seen["current"] = kk.current_backend()
        seen["ran"] = ran()

    with kk.use_backend("reference"):
        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert kk.current_backend() == "reference"
    assert seen == {"current": "auto", "ran": "native"}


def test_available_backends():
    cpu = kk.available_backends("cpu")
    assert "reference" in cpu and "native" in cpu
    assert set(cpu) <= set(kk.BACKENDS)
    assert list(cpu) == [b for b in kk.BACKENDS if b in cpu], "listed in a stable order"
    assert set(cpu) <= set(kk.available_backends())
    assert kk.available_backends(torch.device("cpu")) == cpu
    triton_expected = backend_status("triton", "cpu") is None
    assert ("triton" in cpu) == triton_expected
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "triton" not in cpu


def test_every_available_backend_resolves_to_itself():
    cpu = torch.zeros(1)
    for name in kk.available_backends("cpu"):
        assert kk.resolve_backend(cpu, name) == name


def test_unavailable_backend_does_not_fall_back():
    """Naming a backend that cannot run raises; it never runs something else instead."""
    meta = torch.zeros(1, device="meta")
    with pytest.raises(kk.BackendUnavailableError):
        kk.resolve_backend(meta, "native")
    for name in kk.BACKENDS:
        why = backend_status(name, "cpu")
        if why is not None:
            with pytest.raises(kk.BackendUnavailableError) as info:
                kk.resolve_backend(torch.zeros(1), name)
            assert why in str(info.value)


def test_triton_without_the_extension_says_it_needs_it(monkeypatch):
    """The triton backend's ops take their autograd from kasmina_kernels._C: where it did not
    load, triton is unavailable, and the reason names the extension and how to build it."""
    from kasmina_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the CPU interpreter check
    monkeypatch.setattr(backends, "_modules", {k: v for k, v in backends._modules.items() if k != "native"})
    monkeypatch.setattr(backends, "_native_error", "simulated: no _C here")
    monkeypatch.setattr(backends, "_status_cache", {})
    why = backend_status("triton", "cpu")
    assert why is not None and "kasmina_kernels._C" in why and "simulated: no _C here" in why
    assert "pip install --no-build-isolation" in why


def test_backend_names_constant():
    assert set(kk.BACKEND_NAMES) == set(kk.BACKENDS) | {"auto"}
    assert set(kk.BACKENDS) == {"reference", "native", "triton"}


def test_every_layer_has_the_op_tables_ops():
    """The op table (kasmina_kernels/optable.py) is what the layers declare: its schemas are
    the native library's (defined from the table), and every backend module and the public
    API have a function for each of its ops."""
    from kasmina_kernels.backends import backend_module
    from kasmina_kernels.optable import NAMES, OPS

    assert set(kk.ops.__all__) == set(NAMES) <= set(kk.__all__)
    for name in kk.BACKENDS:
        if backend_status(name, "cpu") is None:
            assert all(callable(getattr(backend_module(name), n)) for n in NAMES), name
    if backend_status("native", "cpu") is not None:
        pytest.skip("the native extension did not load")
    for op in OPS:
        if op.kernel == op.name:
            for schema in (op.schema, op.backward):
                if schema:
                    name = schema[:schema.index("(")]
                    assert str(getattr(torch.ops.kasmina, name).default._schema) == "kasmina::" + schema
