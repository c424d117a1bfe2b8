"""torch.library registration and torch.compile (docs/semantics.md#backends-and-dispatch):

- `torch.library.opcheck` passes for every torch.ops.kasmina op (forward ops with inputs that
  require grad, so the autograd registration is exercised; backward ops with plain inputs) on a
  few representative inputs: scalar and per-sample weights, channels_last, mixed dtypes. The
  native ops are ``kasmina::<name>``; the Triton backend registers its own
  ``kasmina::triton_<name>`` ops with the same schemas, checked when that backend can run
  here. Backward ops are
  also checked with the exact arguments a real backward pass hands them (recorded with a
  TorchDispatchMode);
- `torch.compile(fullgraph=True)` (inductor; CPU needs a C++ compiler) traces every public op
  with every kernel backend (backend="native", "triton") with no graph break, forward and
  backward, and gives the same bits as eager; the default backend (None / "auto") and a
  `use_backend` block trace too. Under compile "auto" is the reference math
  (backends.COMPILE_AUTO; tests/test_compile_auto.py checks that choice).

Under KASMINA_TEST_DEVICE=cuda the same samples are drawn on the GPU (0-dim weights stay CPU
tensors, as Esper passes them), so opcheck and inductor run against the CUDA kernels.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels import reference

from cases import TEST_DEVICE, backend_params
from equivalence import case_generator
from torch.utils._python_dispatch import TorchDispatchMode

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
ops = torch.ops.kasmina


def rnd(shape, key, dtype=F32, *, cl=False, lo=None, hi=None):
    g = case_generator(key)
    t = (torch.rand(shape, generator=g, dtype=F64) * (hi - lo) + lo) if lo is not None \
        else torch.randn(shape, generator=g, dtype=F64)
    t = t.to(TEST_DEVICE, dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t


def grad_leaves(args):
    return tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)


S = (2, 3, 4, 5)
PS = (2, 1, 1, 1)


def _weights(ch, key, dtype=F32):
    hid = reference.gate_hidden_size(ch)
    return (rnd((hid, ch), key + "w1", dtype), rnd((hid,), key + "b1", dtype), rnd((1, hid), key + "w2", dtype),
            rnd((1,), key + "b2", dtype))


FORWARD_SAMPLES = {
    "blend_add": [
        (rnd(S, "a1h"), rnd(S, "a1s"), torch.tensor(0.3)),
        (rnd(S, "a2h", BF16, cl=True), rnd(S, "a2s", F32), rnd(PS, "a2a", lo=-0.5, hi=1.5)),
        (rnd((3, 5, 7), "a3h"), rnd((3, 5, 7), "a3s"), torch.tensor(0.5, dtype=BF16)),
    ],
    "blend_gate": [
        (rnd(S, "g1h"), rnd(S, "g1s"), torch.tensor(0.7), rnd(PS, "g1g", lo=0, hi=1)),
        (rnd(S, "g2h", BF16, cl=True), rnd(S, "g2s"), rnd(PS, "g2a", lo=0, hi=1), rnd(PS, "g2g", BF16, lo=0, hi=1)),
    ],
    "blend_multiply": [
        (rnd(S, "m1h"), rnd(S, "m1s"), torch.tensor(0.4), None),
        (rnd(S, "m2h", BF16, cl=True), rnd(S, "m2s", F32), rnd(PS, "m2a", lo=0, hi=1), rnd(S, "m2r", F32)),
        (rnd((3, 5, 7), "m3h"), rnd((3, 5, 7), "m3s"), torch.tensor(1), rnd((3, 5, 7), "m3r")),
    ],
    "ste_forward": [
        (rnd(S, "s1h"), rnd(S, "s1s")),
        (rnd(S, "s2h", BF16, cl=True), rnd(S, "s2s", F32)),
    ],
    "multiply_valve_multiplier": [
        (torch.tensor(0.25), rnd(S, "v1m")),
        (rnd(PS, "v2a", lo=0, hi=1), rnd(S, "v2m", BF16, cl=True)),
    ],
    "gate_effective_alpha": [
        (torch.tensor(0.6), rnd(PS, "e1g", lo=0, hi=1)),
        (rnd((4, 1, 1), "e2a", lo=-0.5, hi=1.5), rnd((4, 1, 1), "e2g", BF16, lo=0, hi=1)),
    ],
    "gated_pool": [
        (rnd(S, "p1x", cl=True), "cnn"),
        (rnd((2, 7, 6), "p2x", BF16), "transformer"),
    ],
    "gate_network": [
        (rnd((2, 12, 3, 3), "n1x"),) + _weights(12, "n1") + ("cnn",),
        (rnd((2, 5, 40), "n2x", BF16),) + _weights(40, "n2", BF16) + ("transformer",),
    ],
}


def _backward_samples():
    out = {}
    h, s, a = rnd(S, "bh"), rnd(S, "bs"), torch.tensor(0.3)
    ps, gate = rnd(PS, "bps", lo=-0.5, hi=1.5), rnd(PS, "bgt", lo=0, hi=1)
    g = rnd(S, "bg")
    hb, sb = rnd(S, "bhb", BF16, cl=True), rnd(S, "bsb", F32)
    gb = rnd(S, "bgb", BF16, cl=True)
    out["blend_add_backward"] = [(g, h, s, a, True), (gb, hb, sb, ps, True), (g, h, s, ps, False)]
    out["blend_gate_backward"] = [(g, h, s, a, gate, True, True), (gb, hb, sb, ps, gate, True, False),
                                  (g, h, s, a, gate, False, True), (g, h, s, a, gate, False, False)]
    out["blend_multiply_backward"] = [(g, h, s, a, None, True, False),
                                      (gb, hb, sb, ps, rnd(S, "br", F32), True, True),
                                      (g, h, s, ps, rnd(S, "br2"), False, True),
                                      (g, h, s, ps, rnd(S, "br3"), False, False)]
    out["multiply_valve_multiplier_backward"] = [(g, a, h, True), (g.to(F32), ps, hb, True)]
    out["gate_effective_alpha_backward"] = [(rnd(PS, "beg"), a, gate, True, True),
                                            (rnd(PS, "beg2"), ps, gate, False, True)]
    out["gated_pool_backward"] = [(rnd((2, 3), "bpg"), h, "cnn"), (rnd((2, 6), "bpg2", BF16), rnd((2, 7, 6), "bpx", BF16),
                                                                     "transformer")]
    x = rnd((2, 12, 3, 3), "bnx")
    out["gate_network_backward"] = [(rnd(PS, "bng"), x) + _weights(12, "bn") + ("cnn",)]
    return out


BACKWARD_SAMPLES = _backward_samples()

# the native ops with no Triton counterpart: a forward that keeps a residual for its backward
# (kk.keep_residuals), as (forward sample, backward sample reading the residual)
NATIVE_ONLY_SAMPLES = {"blend_multiply_for_backward": FORWARD_SAMPLES["blend_multiply"]}


def _forward_params():
    return [pytest.param(name, i, id=f"{name}-{i}") for name, samples in FORWARD_SAMPLES.items()
            for i in range(len(samples))]


def _backward_params():
    return [pytest.param(name, i, id=f"{name}-{i}") for name, samples in BACKWARD_SAMPLES.items()
            for i in range(len(samples))]


KERNEL_BACKENDS = backend_params()
OP_PREFIX = {"native": "", "triton": "triton_"}


def test_every_op_is_covered():
    names = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("kasmina::")}
    native = {n for n in names if not n.startswith("triton_")}
    assert native == set(FORWARD_SAMPLES) | set(BACKWARD_SAMPLES) | set(NATIVE_ONLY_SAMPLES)
    triton = {n[len("triton_"):] for n in names if n.startswith("triton_")}
    assert triton <= native, "a triton op with no native counterpart (untested here)"


def _op(backend, name):
    if backend not in OP_PREFIX:
        pytest.fail(f"no torch.ops naming rule known for backend {backend!r}")
    return getattr(ops, OP_PREFIX[backend] + name).default


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,i", _forward_params())
def test_opcheck_forward_op(backend, name, i):
    args = grad_leaves(FORWARD_SAMPLES[name][i])
    torch.library.opcheck(_op(backend, name), args)


class BackwardRecorder(TorchDispatchMode):
    """Records every kasmina *_backward op call (with detached copies of its arguments)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.startswith("kasmina::") and func._schema.name.endswith("_backward"):
            copy = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
            self.calls.append((func, copy, dict(kwargs)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(FORWARD_SAMPLES))
def test_opcheck_backward_ops_as_autograd_calls_them(backend, name):
    for sample in FORWARD_SAMPLES[name]:
        args = grad_leaves(sample)
        fwd = _op(backend, name)
        y = fwd(*args)
        diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        with BackwardRecorder() as rec:
            torch.autograd.grad(y, diff, torch.ones_like(y), allow_unused=True)
        if name == "ste_forward":
            assert not rec.calls  # STE's backward is the identity, no kernel
            continue
        assert rec.calls, f"no backward op ran for {fwd}"
        for func, a, kw in rec.calls:
            assert func._schema.name.split("::")[1].startswith(OP_PREFIX[backend] + name)
            torch.library.opcheck(func, a, kw)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,i", _backward_params())
def test_opcheck_backward_op(backend, name, i):
    torch.library.opcheck(_op(backend, name), BACKWARD_SAMPLES[name][i])


@pytest.mark.parametrize("i", range(len(NATIVE_ONLY_SAMPLES["blend_multiply_for_backward"])))
def test_opcheck_forward_keeping_a_residual(i):
    """kasmina::blend_multiply_for_backward, and the backward op reading what it kept (the tanh's
    complement for float32 hosts, an empty placeholder for the others), as autograd calls them
    under kk.keep_residuals()."""
    pytest.importorskip("kasmina_kernels.native")
    sample = NATIVE_ONLY_SAMPLES["blend_multiply_for_backward"][i]
    torch.library.opcheck(ops.blend_multiply_for_backward.default, sample)  # no derivative of its own
    y, tanh = ops.blend_multiply_for_backward(*sample)
    assert (tanh.numel() > 0) == (sample[0].dtype == torch.float32)
    torch.library.opcheck(ops.blend_multiply_backward.default,
                          (torch.ones_like(y),) + tuple(sample) + (False, sample[3] is not None, tanh))
    args = grad_leaves(sample)
    with kk.keep_residuals():
        y = ops.blend_multiply(*args)
    with BackwardRecorder() as rec:
        torch.autograd.grad(y, [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad],
                            torch.ones_like(y), allow_unused=True)
    (func, a, kw), = rec.calls
    assert func is ops.blend_multiply_backward.default
    kept = len(a) == 8 and a[7] is not None  # tanh_complement (a trailing None is left out)
    assert kept == (sample[0].dtype == torch.float32)
    torch.library.opcheck(func, a, kw)


def test_triton_schemas_are_the_native_ones():
    """One convention: each kasmina::triton_<name> op, backward ops included, has the schema of
    kasmina::<name>."""
    pytest.importorskip("kasmina_kernels.native")
    pytest.importorskip("triton")
    import kasmina_kernels.triton  # noqa: F401  (registers the kasmina::triton_* ops)

    triton = [s for s in torch._C._jit_get_all_schemas() if s.name.startswith("kasmina::triton_")]
    assert len(triton) == len(FORWARD_SAMPLES) + len(BACKWARD_SAMPLES)
    for schema in triton:
        native = getattr(ops, schema.name.split("::triton_")[1]).default._schema
        assert str(schema).replace("kasmina::triton_", "kasmina::") == str(native)


# ----------------------------------------------------------------------------- torch.compile
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="inductor on CPU needs a C++ compiler (g++/c++ not on PATH)")


def _public_calls():
    """(public op, args, kwargs) per op: representative Esper-like inputs."""
    h, s = rnd(S, "ch", BF16, cl=True), rnd(S, "cs", F32)
    ps, gate = rnd(PS, "cps", lo=-0.5, hi=1.5), rnd(PS, "cg", lo=0, hi=1)
    x3 = rnd((2, 7, 40), "cx3")
    return {
        "blend_add": (kk.blend_add, (h, s, ps), {}),
        "blend_with_isolation": (kk.blend_with_isolation, (h, s, torch.tensor(0.4)), {}),
        "blend_multiply": (kk.blend_multiply, (h, s, ps), {"seed_input": rnd(S, "cr", F32)}),
        "blend_multiply_no_seed_input": (kk.blend_multiply, (h, s, torch.tensor(0.7)), {}),
        "blend_gate": (kk.blend_gate, (h, s, torch.tensor(0.8), gate), {}),
        "ste_forward": (kk.ste_forward, (h, s), {}),
        "multiply_valve_multiplier": (kk.multiply_valve_multiplier, (ps, h), {}),
        "gate_effective_alpha": (kk.gate_effective_alpha, (torch.tensor(0.9), gate), {}),
        "gated_pool": (kk.gated_pool, (h, "cnn"), {}),
        "gate_network": (kk.gate_network, (x3,) + _weights(40, "cw"), {"topology": "transformer"}),
    }


PUBLIC = _public_calls()


def _run(fn, args, kwargs):
    leaves = grad_leaves(args)
    y = fn(*leaves, **kwargs)
    diff = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    # the upstream gradient in the output's layout (AOT autograd hands the compiled backward
    # a tangent in the traced output's layout; the native weight-gradient reductions follow
    # the gradient's layout, so a contiguous g in eager would change their last bits)
    g = torch.empty_like(y).copy_(rnd(tuple(y.shape), "compile/g", y.dtype))
    grads = torch.autograd.grad(y, diff, g)
    return y.detach(), grads


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@needs_cxx
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(PUBLIC))
def test_compile_fullgraph(backend, name):
    op, args, kwargs = PUBLIC[name]

    def fn(*a, **kw):
        return op(*a, **kw, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    y_c, g_c = _run(compiled, args, kwargs)
    y_e, g_e = _run(fn, args, kwargs)
    assert _bits_equal(y_c, y_e)
    assert len(g_c) == len(g_e)
    for a, b in zip(g_c, g_e):
        assert _bits_equal(a, b)


@needs_cxx
def test_compile_fullgraph_default_backend_and_use_backend():
    """backend=None reads the use_backend stack and the environment: still no graph break.

    Under compile the default ("auto") is the reference math (backends.COMPILE_AUTO), so the
    compiled default matches the eager reference bit for bit (aot_eager runs the same ATen
    ops); a named backend keeps its opaque op and matches its own eager call."""
    h, s, a = rnd(S, "dh"), rnd(S, "ds"), torch.tensor(0.3)

    def default(h, s, a):
        return kk.blend_add(h, s, a)

    def scoped(h, s, a):
        with kk.use_backend("native"):
            return kk.blend_gate(h, s, a, torch.ones(2, 1, 1, 1, device=h.device))

    def scoped_eager(h, s, a):
        return kk.blend_gate(h, s, a, torch.ones(2, 1, 1, 1, device=h.device), backend="native")

    for fn, eager in ((default, reference.blend_add), (scoped, scoped_eager)):
        torch._dynamo.reset()
        y_c, g_c = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), (h, s, a), {})
        y_e, g_e = _run(eager, (h, s, a), {})
        assert _bits_equal(y_c, y_e)
        for x, y in zip(g_c, g_e):
            assert _bits_equal(x, y)
