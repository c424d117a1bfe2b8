"""The drop-in functions (`kasmina_kernels.blend_ops`, `kasmina_kernels.isolation`) against
the eager definitions (`kasmina_kernels.reference`): Esper's signatures, forward and every
gradient on each backend (judged by the equivalence rule of docs/semantics.md#equivalence), the exact
identities, dispatch through the default backend, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels import blend_ops, isolation, reference

from kasmina_kernels.opcases import Check
from kasmina_kernels.optable import BY_NAME

from cases import backend_params
from equivalence import assert_verdicts, case_generator, run_forward_backward

F32, BF16 = torch.float32, torch.bfloat16
P, KW = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY

# Esper's signatures: (name, kind, default) per parameter.
ESPER_SIGNATURES = {
    (blend_ops, "blend_add"): [("host_features", P, None), ("seed_features", P, None), ("alpha", P, None)],
    (blend_ops, "blend_multiply"): [("host_features", P, None), ("seed_features", P, None), ("alpha", P, None),
                                    ("seed_input", KW, None)],
    (blend_ops, "blend_gate"): [("host_features", P, None), ("seed_features", P, None), ("alpha", P, None),
                                ("gate", P, None)],
    (blend_ops, "gate_effective_alpha"): [("alpha", P, None), ("gate", P, None)],
    (blend_ops, "multiply_valve_multiplier"): [("alpha", P, None), ("seed_modulation", P, None)],
    (isolation, "ste_forward"): [("host_features", P, None), ("seed_features", P, None)],
    (isolation, "blend_with_isolation"): [("host_features", P, None), ("seed_features", P, None), ("alpha", P, None)],
}


@pytest.mark.parametrize("module,name", list(ESPER_SIGNATURES), ids=lambda v: getattr(v, "__name__", v))
def test_signature_is_esper(module, name):
    params = inspect.signature(getattr(module, name)).parameters.values()
    got = [(p.name, p.kind, None if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == ESPER_SIGNATURES[(module, name)]
    assert name in module.__all__


def test_modules_export_exactly_the_esper_functions():
    assert sorted(blend_ops.__all__) == sorted(n for m, n in ESPER_SIGNATURES if m is blend_ops)
    assert sorted(isolation.__all__) == sorted(n for m, n in ESPER_SIGNATURES if m is isolation)


# ----------------------------------------------------------------------------- equivalence
def _rnd(shape, key, dtype=F32, *, cl=False, lo=None, hi=None):
    g = case_generator(key)
    t = torch.rand(shape, generator=g) * (hi - lo) + lo if lo is not None else torch.randn(shape, generator=g)
    t = t.to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


S, PS = (3, 5, 4, 6), (3, 1, 1, 1)


def _case(name: str, mixed: bool | str) -> dict:
    """The inputs, by name, of the drop-in `name`, called as Esper calls it.
    mixed: bf16 channels_last host, fp32 NCHW seed, per-sample alpha partly outside [0, 1];
    "0-dim": 0-dim float32 features, alpha and gate (Esper's eager functions take them);
    else float32 with a 0-dim alpha."""
    key = f"dropin/{name}/{mixed}"
    if mixed == "0-dim":
        h, s = _rnd((), key + "h"), _rnd((), key + "s")
        alpha, gate = torch.tensor(0.35), _rnd((), key + "g", lo=0.05, hi=0.95)
        mixed = False
    else:
        h = _rnd(S, key + "h", BF16 if mixed else F32, cl=mixed)
        s = _rnd(S, key + "s")
        alpha = _rnd(PS, key + "a", lo=-0.3, hi=1.3) if mixed else torch.tensor(0.35)
        gate = _rnd(PS, key + "g", lo=0.05, hi=0.95)
    values = {"h": h, "s": s, "alpha": alpha, "gate": gate, "m": h,
              "seed_input": _rnd(h.shape, key + "r") if name == "blend_multiply" else None}
    return {n: values[n] for n in BY_NAME[name].inputs}


DROP_INS = {name: getattr(module, name) for module, name in ESPER_SIGNATURES}


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("mixed", [False, True, "0-dim"], ids=["f32-scalar", "bf16cl-fp32seed-per-sample", "0-dim"])
@pytest.mark.parametrize("name", list(DROP_INS))
def test_dropin_matches_eager_definition(name, mixed, backend):
    leaves, op = _case(name, mixed), BY_NAME[name]
    requires = tuple(n for n, t in leaves.items() if t.is_floating_point())
    probe = op.call(op.reference, leaves)
    g = _rnd(tuple(probe.shape), f"dropin/{name}/{mixed}/g", probe.dtype)
    check = Check.on(op, leaves, requires=requires, grad=g)  # judged as test_equivalence's cases
    with kk.use_backend(backend):
        got = check.run(DROP_INS[name])
    assert set(got) == {"y"} | {"d" + n for n in requires}
    assert_verdicts(check.judge(got), f"{name} on {backend}")


# ----------------------------------------------------------------------------- exact contracts
@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_dropin_exact_identities(backend):
    h, s = _rnd(S, "id/h", cl=True), _rnd(S, "id/s")
    zero, gate0 = torch.tensor(0.0), torch.zeros(PS)
    nan_seed = s.clone()
    nan_seed[1, 2, 3, 4] = float("nan")
    with kk.use_backend(backend):
        for y in (blend_ops.blend_add(h, s, zero), blend_ops.blend_multiply(h, s, zero),
                  blend_ops.blend_gate(h, s, torch.tensor(0.7), gate0), isolation.blend_with_isolation(h, s, zero),
                  isolation.ste_forward(h, s), blend_ops.blend_multiply(h, s, torch.tensor(0.9), seed_input=s)):
            assert torch.equal(y, h)
            assert y.is_contiguous(memory_format=torch.channels_last)
        y = blend_ops.blend_add(h, nan_seed, zero)
        assert torch.isnan(y[1, 2, 3, 4]) and torch.isnan(y).sum() == 1
        # aliased inputs and inference mode, as Esper passes them
        a = torch.tensor(0.6)
        assert torch.equal(blend_ops.blend_multiply(h, h, a, seed_input=h), h)
        torch.testing.assert_close(blend_ops.blend_add(h, h, a), reference.blend_add(h, h, a))
        with torch.inference_mode():
            torch.testing.assert_close(blend_ops.blend_gate(h, s, a, gate0 + 0.5),
                                       reference.blend_gate(h, s, a, gate0 + 0.5))
        gate = _rnd(PS, "id/g", lo=0.1, hi=0.9).requires_grad_(True)
        blend_ops.blend_gate(h, s, torch.tensor(0.5), gate).sum().backward()
        assert gate.grad.shape == (3, 1, 1, 1)


def _kasmina_ops_called(fn) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name.startswith("kasmina::"):
                self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    recorder = Recorder()
    recorder.names = []
    with recorder:
        fn()
    return recorder.names


def test_dropins_dispatch_through_the_default_backend():
    h, s, a = _rnd(S, "d/h"), _rnd(S, "d/s"), torch.tensor(0.3)
    with kk.use_backend("native"):
        assert _kasmina_ops_called(lambda: blend_ops.blend_add(h, s, a)) == ["kasmina::blend_add"]
        assert _kasmina_ops_called(lambda: isolation.ste_forward(h, s)) == ["kasmina::ste_forward"]
    with kk.use_backend("reference"):
        assert _kasmina_ops_called(lambda: blend_ops.blend_add(h, s, a)) == []


# ----------------------------------------------------------------------------- Esper's answers
STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "esper_standin")


@contextlib.contextmanager
def _esper_standin():
    assert "esper" not in sys.modules
    sys.path.insert(0, STANDIN)
    try:
        from esper.kasmina import blend_ops as ops, blending, isolation as iso
        yield SimpleNamespace(**{n: getattr(ops, n) for n in blend_ops.__all__},
                              **{n: getattr(iso, n) for n in isolation.__all__}, GatedBlend=blending.GatedBlend)
    finally:
        for name in [n for n in sys.modules if n == "esper" or n.startswith("esper.")]:
            del sys.modules[name]
        sys.path.remove(STANDIN)


@pytest.fixture
def esper():
    """Esper's eager blend functions and GatedBlend (tests/esper_standin), importable for this
    test only."""
    with _esper_standin() as namespace:
        yield namespace


def _f(shape, key, dtype=F32, grad=True):
    return _rnd(shape, key).to(dtype).requires_grad_(grad and dtype.is_floating_point)


def _inference(shape, key):
    with torch.inference_mode():
        return _rnd(shape, key)


A = torch.tensor(0.6)
# Inputs the fused ops reject, (name, inputs): Esper's functions answer each with a result or an
# exception, and the drop-in must answer the same
OUTSIDE = {
    "seed broadcasts": ("blend_add", lambda: (_f(S, "o/h"), _f((1,) + S[1:], "o/s"), A)),
    "host broadcasts": ("blend_add", lambda: (_f(S[1:], "o/h"), _f(S, "o/s"), A)),
    "alpha enlarges": ("blend_add", lambda: (_f(S, "o/h"), _f(S, "o/s"), _f((2,) + S, "o/a", grad=False).sigmoid())),
    "bool alpha": ("blend_with_isolation", lambda: (_f(S, "o/h"), _f(S, "o/s"), torch.tensor(True))),
    "complex features": ("blend_add", lambda: (_f(S, "o/h", torch.complex64), _f(S, "o/s", torch.complex64), A)),
    "integer features": ("blend_add", lambda: (_f(S, "o/h", torch.int32), _f(S, "o/s", torch.int32), A)),
    "Python float alpha": ("blend_add", lambda: (_f(S, "o/h"), _f(S, "o/s"), 0.5)),
    "seed does not broadcast": ("blend_add", lambda: (_f(S, "o/h"), _f(S[:3] + (5,), "o/s"), A)),
    "seed on another device": ("blend_add", lambda: (_f(S, "o/h"), _f(S, "o/s").detach().to("meta"), A)),
    "host on another device": ("blend_add", lambda: (_f(S, "o/h").detach().to("meta"), _f(S, "o/s"), A)),
    "seed_input broadcasts": ("blend_multiply", lambda: (_f(S, "o/h"), _f(S, "o/s"), A,
                                                         {"seed_input": _f(S[2:], "o/r", grad=False)})),
    "integer gate": ("blend_gate", lambda: (_f(S, "o/h"), _f(S, "o/s"), A, torch.ones(PS, dtype=torch.int64))),
    "gate does not broadcast": ("blend_gate", lambda: (_f(S, "o/h"), _f(S, "o/s"), A, _f((4, 1, 1, 1), "o/g"))),
    "integer alpha and gate": ("gate_effective_alpha", lambda: (torch.tensor(1), torch.ones(PS, dtype=torch.int64))),
    "integer valve input": ("multiply_valve_multiplier", lambda: (A, torch.arange(6).reshape(2, 3))),
    "valve alpha enlarges m": ("multiply_valve_multiplier", lambda: (_f(PS, "o/a"), _f(S[1:], "o/m"))),
    "STE seed broadcasts": ("ste_forward", lambda: (_f(S, "o/h"), _f(S[2:], "o/s"))),
    "STE integer features": ("ste_forward", lambda: (torch.arange(6), torch.arange(6) * 2)),
    # autograd cannot save an inference tensor: eager ADD saves neither feature when alpha
    # wants no gradient, eager MULTIPLY and GATE save them
    "inference-mode host": ("blend_add", lambda: (_inference(S, "o/h"), _f(S, "o/s"), A)),
    "inference-mode seed": ("blend_with_isolation", lambda: (_f(S, "o/h"), _inference(S, "o/s"), A)),
    "inference-mode host, MULTIPLY": ("blend_multiply", lambda: (_inference(S, "o/h"), _f(S, "o/s"), A)),
    "inference-mode seed, GATE": ("blend_gate", lambda: (_f(S, "o/h"), _inference(S, "o/s"), A, _f(PS, "o/g"))),
}


def _answer(fn, make, params=()):
    """(output, gradients of `params` and of the inputs that require grad, exception, warnings)
    of fn on a fresh input set from `make` (a trailing dict: keyword arguments)."""
    args = make()
    kwargs = args[-1] if isinstance(args[-1], dict) else {}
    args = args[:-1] if kwargs else args
    leaves = [*params] + [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            y = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - compared with Esper's
            return None, None, exc, caught
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y)) if y.requires_grad else ()
    return y, grads, None, caught


def _assert_esper_answer(case, want_answer, got_answer, equal_nan=False, warned=True):
    """`got_answer` (the drop-in's `_answer`) is Esper's: its exception type, or its output and
    gradients bit for bit, with a warning that no fused kernel ran where `warned` (none comes
    from a compiled call)."""
    (want, want_grads, want_exc, _), (got, got_grads, got_exc, caught) = want_answer, got_answer
    if want_exc is not None:
        assert isinstance(got_exc, type(want_exc)), f"{case}: Esper raises {want_exc!r}, the drop-in gave {got_exc or got!r}"
        return
    assert got_exc is None, f"{case}: Esper's code returns, the drop-in raised {got_exc!r}"
    if warned:
        assert any("Esper's eager math" in str(w.message) for w in caught), "no warning that no fused kernel ran"
    assert (got.dtype, got.shape) == (want.dtype, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=equal_nan)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=equal_nan)


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_dropins_answer_inputs_outside_the_fused_ops_as_esper_does(case, esper):
    """Esper's result (bit for bit, gradients included, with a warning that no fused kernel
    ran) or Esper's exception type, for inputs the fused ops reject."""
    name, make = OUTSIDE[case]
    drop_in = getattr(blend_ops if name in blend_ops.__all__ else isolation, name)
    _assert_esper_answer(case, _answer(getattr(esper, name), make), _answer(drop_in, make), equal_nan=True)


@pytest.mark.parametrize("name", ["blend_add", "blend_with_isolation", "blend_multiply", "blend_gate"])
def test_alpha_cached_under_inference_mode_runs_fused(name, esper):
    """Esper's slot caches its 0-dim alpha when first used, which may be on a validation pass
    under torch.inference_mode(); training then passes that inference tensor. Autograd cannot
    save it, so the fused op saves a copy (Esper's math saves its clamped copy): the fused
    kernel runs, no eager answer, and gives Esper's values and gradients."""
    values = _case(name, False)
    with torch.inference_mode():
        values["alpha"] = values["alpha"].clone()

    op = BY_NAME[name]

    def make():  # Esper's flags: alpha and seed_input without grad, the rest with
        fresh = {n: t if n in ("alpha", "seed_input") else t.detach().requires_grad_() for n, t in values.items()}
        args = tuple(fresh[n] for n in op.inputs if n not in op.kwonly)
        return args + (({n: fresh[n] for n in op.kwonly},) if op.kwonly else ())

    want, want_grads, want_exc, _ = _answer(getattr(esper, name), make)
    got, got_grads, got_exc, caught = _answer(DROP_INS[name], make)
    assert want_exc is None and got_exc is None, (want_exc, got_exc)
    assert not any("Esper's eager math" in str(w.message) for w in caught), "the drop-in answered eagerly"
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


# OUTSIDE cases whose inputs Esper's code takes, with float features on the CPU
OUTSIDE_COMPILED = ("seed broadcasts", "host broadcasts", "alpha enlarges", "seed_input broadcasts",
                    "valve alpha enlarges m", "STE seed broadcasts")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", OUTSIDE_COMPILED)
def test_dropins_compile_fullgraph_outside_the_fused_ops(case, dynamic, esper):
    """Under torch.compile(fullgraph=True), with static or symbolic sizes, the eager answer
    traces as Esper's code does (no graph break, no warning or message formatted while
    tracing) and gives Esper's result and gradients."""
    name, make = OUTSIDE[case]
    drop_in = getattr(blend_ops if name in blend_ops.__all__ else isolation, name)
    torch._dynamo.reset()
    compiled = torch.compile(drop_in, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    want = _answer(getattr(esper, name), make)
    assert want[2] is None, want[2]  # Esper's code returns on these inputs
    _assert_esper_answer(case, want, _answer(compiled, make), warned=False)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_op_rejects_with_the_eager_message(dynamic):
    """A public op's input error raised in a compiled call (no fullgraph) is the eager call's:
    its type, and a message naming the real shapes."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, s: kk.blend_add(h, s, A) * 2, backend="aot_eager", dynamic=dynamic)
    with pytest.raises(ValueError, match=re.escape(f"seed shape {(1,) + S[1:]} differs from the host shape {S}")):
        compiled(_f(S, "ce/h"), _f((1,) + S[1:], "ce/s"))


def test_gated_blend_compiles_fullgraph_with_a_changed_gate(esper):
    """A gate network the fused op does not compute compiles as Esper's module does."""
    theirs = esper.GatedBlend(8)
    _other_activation(theirs)
    ours = kk.GatedBlend(8)
    ours.gate = copy.deepcopy(theirs.gate)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = _f(X4, "gc/x")
    want = _answer(theirs.get_alpha_for_blend, lambda: (x,), theirs.parameters())
    assert want[2] is None, want[2]
    _assert_esper_answer("compiled changed gate", want, _answer(compiled, lambda: (x,), ours.parameters()),
                         warned=False)


ODD_DTYPES = (F32, BF16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool,
              torch.complex64)
ODD_SHAPES = ((2, 3, 4, 5), (1, 3, 4, 5), (3, 4, 5), (5,), (1,), (), (2, 1, 1, 1), (2, 3, 1, 1), (4, 1, 1, 1),
              (0, 3, 4, 5), (2, 3, 4, 5, 2))
ARITY = {"blend_add": 3, "blend_multiply": 3, "blend_gate": 4, "gate_effective_alpha": 2,
         "multiply_valve_multiplier": 2, "ste_forward": 2, "blend_with_isolation": 3}


def _odd_tensor(draw, st, main: bool):
    """A tensor spec: Esper-like features half the time (for the leading arguments), anything
    in the dtype and shape lists otherwise; channels_last, meta and requires_grad at random."""
    dtype = draw(st.sampled_from(ODD_DTYPES[:4] if draw(st.booleans()) else ODD_DTYPES))
    shape = (2, 3, 4, 5) if main and draw(st.booleans()) else draw(st.sampled_from(ODD_SHAPES))
    return (shape, dtype, draw(st.booleans()), draw(st.sampled_from(("cpu",) * 9 + ("meta",))),
            draw(st.booleans()))


def _make(spec, seed):
    shape, dtype, channels_last, device, grad = spec
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) if dtype.is_floating_point or dtype.is_complex
         else torch.randint(0, 3, shape, generator=g)).to(dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    t = t.to(device)
    return t.requires_grad_() if grad and (dtype.is_floating_point or dtype.is_complex) else t


def _outcome(fn, specs, seed_input):
    args = [_make(spec, i) for i, spec in enumerate(specs)]
    kwargs = {} if seed_input is None else {"seed_input": _make(seed_input, 9)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            y = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - compared with the other's
            return type(exc)
    return tuple(y.shape), y.dtype, y.device.type


def test_dropins_take_and_refuse_what_esper_does():
    """Random calls over dtypes, shapes, layouts and devices the fused ops mostly reject: the
    drop-in returns an output of Esper's shape, dtype and device wherever Esper's function
    returns, and raises Esper's exception type (or a subclass) wherever it raises."""
    hypothesis = pytest.importorskip("hypothesis", reason="the random calls need hypothesis")
    st = hypothesis.strategies

    @st.composite
    def calls(draw):
        name = draw(st.sampled_from(sorted(ARITY)))
        specs = [_odd_tensor(draw, st, main=i < 2) for i in range(ARITY[name])]
        seed_input = _odd_tensor(draw, st, main=True) if name == "blend_multiply" and draw(st.booleans()) else None
        return name, specs, seed_input

    with _esper_standin() as esper:
        @hypothesis.settings(max_examples=300)
        @hypothesis.given(call=calls())
        def check(call):
            name, specs, seed_input = call
            drop_in = getattr(blend_ops if name in blend_ops.__all__ else isolation, name)
            want, got = _outcome(getattr(esper, name), specs, seed_input), _outcome(drop_in, specs, seed_input)
            if isinstance(want, type):
                assert isinstance(got, type) and issubclass(got, want), f"Esper raises {want.__name__}, the drop-in gives {got}"
            else:
                assert got == want

        check()


X4 = (2, 8, 4, 4)
# GatedBlend(8) inputs (module options, x) its fused gate network does not take
GATE_OUTSIDE = {
    "wrong channel count": ({}, lambda: _f((2, 9, 4, 4), "g/x")),
    "wrong channel count, transformer": ({"topology": "transformer"}, lambda: _f((2, 5, 7), "g/x")),
    "not a tensor": ({}, lambda: [[1.0]]),
    "float64 x, float32 gate": ({}, lambda: _f(X4, "g/x", torch.float64)),
    "bfloat16 x, float32 gate": ({}, lambda: _f(X4, "g/x", BF16)),
    "float32 x, bfloat16 gate": ({"dtype": BF16}, lambda: _f(X4, "g/x")),
    "integer x": ({}, lambda: torch.ones(X4, dtype=torch.int32)),
    "complex x": ({}, lambda: _f(X4, "g/x", torch.complex64)),
    "float64 under autocast": ({"dtype": torch.float64, "autocast": True}, lambda: _f(X4, "g/x", torch.float64)),
    "inference-mode x": ({}, lambda: _inference(X4, "g/x")),
}


@pytest.mark.parametrize("case", list(GATE_OUTSIDE))
def test_gated_blend_answers_inputs_outside_the_fused_gate_as_esper_does(case, esper):
    options, make = GATE_OUTSIDE[case]
    topology, dtype = options.get("topology", "cnn"), options.get("dtype", F32)
    theirs = esper.GatedBlend(8, topology).to(dtype)
    ours = kk.GatedBlend(8, topology).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    with torch.autocast("cpu", dtype=BF16, enabled=options.get("autocast", False)):
        answers = [_answer(m.get_alpha_for_blend, lambda: (make(),), m.parameters()) for m in (theirs, ours)]
    _assert_esper_answer(case, *answers)


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def _deeper(m):
    m.gate = torch.nn.Sequential(m.gate[0], torch.nn.ReLU(), torch.nn.Linear(8, 8), m.gate[1], m.gate[2], m.gate[3])


def _other_activation(m):
    m.gate[1] = torch.nn.Tanh()


def _without_bias(m):
    m.gate[0] = torch.nn.Linear(8, 8, bias=False)


def _parametrized(m):
    torch.nn.utils.parametrize.register_parametrization(m.gate[0], "weight", _Double())


def _hooked(m):
    m.gate[0].register_forward_hook(lambda module, args, out: out * 0.5)


# Changes to GatedBlend's gate network that Esper's module runs as they are (it calls the gate)
GATE_CHANGES = {"deeper": _deeper, "another activation": _other_activation, "without bias": _without_bias,
                "parametrized": _parametrized, "forward hook": _hooked}


@pytest.mark.parametrize("change", list(GATE_CHANGES))
def test_gated_blend_runs_a_changed_gate_as_esper_does(change, esper):
    """The fused gate network computes Linear, ReLU, Linear, Sigmoid from the parameters; any
    other gate (or a hook on it) gets Esper's answer, bit for bit, with a warning."""
    torch.manual_seed(0)
    theirs = esper.GatedBlend(8)
    GATE_CHANGES[change](theirs)
    ours = kk.GatedBlend(8)
    ours.gate = copy.deepcopy(theirs.gate)
    x = _f(X4, "gc/x")
    _assert_esper_answer(change, *(_answer(m.get_alpha_for_blend, lambda: (x,), m.parameters()) for m in (theirs, ours)))


def test_gated_blend_on_a_meta_device_model(esper):
    """A model built on the meta device (shape inference, deferred initialisation) runs as
    Esper's does."""
    theirs, ours = esper.GatedBlend(8).to("meta"), kk.GatedBlend(8).to("meta")
    x = torch.empty(X4, device="meta")
    want, got = theirs.get_alpha_for_blend(x), ours.get_alpha_for_blend(x)
    assert (got.device, got.dtype, got.shape) == (want.device, want.dtype, want.shape)


# ----------------------------------------------------------------------------- torch.func
def _func_grad(f, t):
    return torch.func.grad(lambda *x: f(*x).square().sum(), argnums=tuple(range(len(t))))(*t)


def _func_vjp(f, t):
    y, pull = torch.func.vjp(f, *t)
    return (y, *pull(_rnd(tuple(y.shape), "func/cotangent", y.dtype)))


def _tangents(t):
    return tuple(_rnd(tuple(x.shape), f"func/tangent{i}", x.dtype) for i, x in enumerate(t))


def _func_jvp(f, t):
    return torch.func.jvp(f, t, _tangents(t))


def _dual_numbers(f, t):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        y = f(*(fwAD.make_dual(x, d) for x, d in zip(t, _tangents(t))))
        return tuple(fwAD.unpack_dual(y))


def _per_sample_grads(f, t):
    batched = tuple(torch.stack([x, 0.5 * x]) for x in t)
    return torch.func.vmap(lambda *x: _func_grad(f, x))(*batched)


# Transforms Esper's plain torch code goes through and a fused op cannot (its autograd is
# first-order, reverse-mode only): each returns the tensors it computes
TRANSFORMS = {"torch.func.grad": _func_grad, "torch.func.vjp": _func_vjp, "torch.func.jvp": _func_jvp,
              "forward_ad dual numbers": _dual_numbers, "vmap of grad (per-sample gradients)": _per_sample_grads}


def _transformed(run, caught_warnings):
    """The tensors `run()` returns, detached; its warnings go to `caught_warnings`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run()
    caught_warnings.extend(caught)
    return [t.detach() for t in out]


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name", list(DROP_INS))
def test_dropins_answer_torch_func_transforms_as_esper_does(name, transform, esper):
    """Under forward-mode AD and torch.func's differentiating transforms a fused op raises
    NotImplementedError; the drop-in answers with Esper's math: Esper's values and derivatives
    bit for bit, with a warning that no fused kernel ran."""
    inputs = _case(name, False)
    call = BY_NAME[name].call

    def of(fn):
        return lambda *t: call(fn, dict(zip(inputs, t)))

    tensors, caught = tuple(inputs.values()), []
    want = _transformed(lambda: TRANSFORMS[transform](of(getattr(esper, name)), tensors), [])
    got = _transformed(lambda: TRANSFORMS[transform](of(DROP_INS[name]), tensors), caught)
    assert any("Esper's eager math" in str(w.message) for w in caught), "no warning that no fused kernel ran"
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.dtype, g.shape) == (w.dtype, w.shape)
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("transform", ["torch.func.grad", "torch.func.jvp", "vmap of grad (per-sample gradients)"])
def test_gated_blend_answers_torch_func_transforms_as_esper_does(transform, esper):
    """The gate's derivatives with respect to its input through torch.func: Esper's, bit for
    bit, with a warning."""
    theirs = esper.GatedBlend(8)
    ours = kk.GatedBlend(8)
    ours.load_state_dict(theirs.state_dict())
    x = _f(X4, "func/x", grad=False)
    caught = []
    want = _transformed(lambda: TRANSFORMS[transform](theirs.get_alpha_for_blend, (x,)), [])
    got = _transformed(lambda: TRANSFORMS[transform](ours.get_alpha_for_blend, (x,)), caught)
    assert any("Esper's eager math" in str(w.message) for w in caught), "no warning that no fused kernel ran"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", list(DROP_INS))
def test_dropin_compiles_fullgraph(name, backend):
    """fullgraph=True with the aot_eager compiler backend (traces the ops and their autograd
    like inductor does, without compiling C++; test_compile.py covers inductor for the ops)."""
    leaves, call = _case(name, mixed=True), BY_NAME[name].call
    requires = tuple(n for n, t in leaves.items() if t.is_floating_point())
    probe = call(getattr(reference, name), leaves)
    g = torch.empty_like(probe).copy_(_rnd(tuple(probe.shape), f"compile/{name}/g", probe.dtype))

    def fn(*tensors):
        return call(DROP_INS[name], dict(zip(leaves, tensors)))

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with kk.use_backend(backend):
        got = run_forward_backward(lambda *t: compiled(*t), leaves, lambda f, t: f(*t.values()), requires, g)
        want = run_forward_backward(fn, leaves, lambda f, t: f(*t.values()), requires, g)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
