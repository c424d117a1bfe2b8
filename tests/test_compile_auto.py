"""torch.compile with the default backend (backends.COMPILE_AUTO, docs/semantics.md, backends and performance model):

- while torch.compile traces a call, "auto" is the reference math, so Inductor can fuse the
  blend with its neighbours: the traced graph holds no torch.ops.kasmina op, has no graph
  break (fullgraph=True), and the compiled output and gradients match the eager reference
  within the equivalence tolerance (rule 1, docs/semantics.md#equivalence);
- a named backend (argument, use_backend, KASMINA_KERNELS_BACKEND) keeps the opaque
  torch.ops.kasmina op in the compiled graph;
- eager calls (not compiling) still run the fused kernels: every public op and drop-in runs
  its torch.ops.kasmina op.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kasmina_kernels as kk
from kasmina_kernels import backends, blend_ops, isolation, reference
from kasmina_kernels.backends import ENV_VAR
from kasmina_kernels.equivalence import check_elementwise, check_nonfinite, least_precise, tolerance_dtype

from cases import TEST_DEVICE
from test_compile import PUBLIC, _run, grad_leaves, needs_cxx

pytestmark = pytest.mark.skipif("native" not in kk.available_backends(TEST_DEVICE),
                                reason="the native backend is not available here")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _graph_targets(fn, args, kwargs):
    """The ops in the graph(s) dynamo hands its backend for fn(*args, **kwargs)."""
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes
                       if n.op in ("call_function", "call_method"))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=record)(*grad_leaves(args), **kwargs)
    return targets


def _reference_call(name):
    op = name.replace("_no_seed_input", "")
    return getattr(reference, op)


@pytest.mark.parametrize("name", list(PUBLIC))
def test_default_under_compile_traces_the_reference_math(name):
    op, args, kwargs = PUBLIC[name]
    targets = _graph_targets(lambda *a, **kw: op(*a, **kw), args, kwargs)
    assert targets, "nothing traced"
    assert not any("kasmina" in t for t in targets), targets


@pytest.mark.parametrize("how", ["argument", "use_backend", "environment"])
def test_a_named_backend_keeps_the_opaque_op_under_compile(how, monkeypatch):
    op, args, kwargs = PUBLIC["blend_gate"]
    if how == "argument":
        fn = lambda *a: op(*a, backend="native")  # noqa: E731
    elif how == "use_backend":
        def fn(*a):
            with kk.use_backend("native"):
                return op(*a)
    else:
        monkeypatch.setenv(ENV_VAR, "native")
        fn = lambda *a: op(*a)  # noqa: E731
    targets = _graph_targets(fn, args, kwargs)
    assert any("kasmina.blend_gate" in t for t in targets), targets


@needs_cxx
@pytest.mark.parametrize("name", list(PUBLIC))
def test_compiled_default_matches_the_eager_reference(name):
    op, args, kwargs = PUBLIC[name]
    ref = _reference_call(name)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a, **kw: op(*a, **kw), fullgraph=True)
    y_c, g_c = _run(compiled, args, kwargs)
    y_r, g_r = _run(ref, args, kwargs)
    assert len(g_c) == len(g_r)
    # the computation dtype (docs/semantics.md#equivalence): everything downstream of the cast to the
    # host's dtype is judged in it (Inductor keeps float32 where eager rounds to bfloat16)
    computation = least_precise(*(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()))
    for what, k, r in [("y", y_c, y_r)] + [(f"grad{i}", a, b) for i, (a, b) in enumerate(zip(g_c, g_r))]:
        assert k.shape == r.shape and k.dtype == r.dtype, what
        check_nonfinite(what, k, r)
        check_elementwise(what, k, r, tolerance_dtype(least_precise(r.dtype, computation)))


class _CountKasmina(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("kasmina::"):
            self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _esper_inputs():
    h = torch.randn(2, 4, 3, 3, device=TEST_DEVICE).contiguous(memory_format=torch.channels_last)
    h.requires_grad_(True)
    r = h.contiguous().detach()
    s = torch.randn(2, 4, 3, 3, device=TEST_DEVICE, requires_grad=True)
    gate = torch.rand(2, 1, 1, 1, device=TEST_DEVICE, requires_grad=True)
    return h, r, s, torch.tensor(0.5), gate


def _drop_in_calls():
    h, r, s, a, gate = _esper_inputs()
    gb = kk.GatedBlend(4).to(TEST_DEVICE)
    return {
        "blend_add": lambda: blend_ops.blend_add(h, s, a),
        "blend_multiply": lambda: blend_ops.blend_multiply(h, s, a, seed_input=r),
        "blend_gate": lambda: blend_ops.blend_gate(h, s, a, gate),
        "ste_forward": lambda: isolation.ste_forward(h, s),
        "blend_with_isolation": lambda: isolation.blend_with_isolation(h, s, a),
        "multiply_valve_multiplier": lambda: blend_ops.multiply_valve_multiplier(a, s),
        "gate_effective_alpha": lambda: blend_ops.gate_effective_alpha(a, gate),
        "gated_pool": lambda: kk.gated_pool(h, "cnn"),
        "gate_network": lambda: gb(r),
    }


@pytest.mark.parametrize("name", list(_drop_in_calls()))
def test_eager_calls_run_the_fused_kernels(name):
    assert backends.native_by_default(torch.zeros(1, device=TEST_DEVICE))
    call = _drop_in_calls()[name]
    with _CountKasmina() as seen:
        y = call()
        y.backward(torch.ones_like(y))
    op = "blend_add" if name == "blend_with_isolation" else name
    assert f"kasmina::{op}" in seen.names, seen.names
    if name != "ste_forward":  # STE's backward is the identity, no kernel
        assert f"kasmina::{op}_backward" in seen.names, seen.names
