"""The drop-in functions (`kasmina_kernels.blend_ops`, `kasmina_kernels.isolation`) against
the eager definitions (`kasmina_kernels.reference`): Esper's signatures, forward and every
gradient on each backend (judged by the equivalence rule of docs/semantics.md#equivalence), the exact
identities, dispatch through the default backend, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import inspect

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


def test_dropin_bad_input_errors_name_the_argument():
    h = _rnd(S, "e/h")
    with pytest.raises(ValueError, match="seed shape"):
        blend_ops.blend_add(h, h[:1], torch.tensor(0.5))
    with pytest.raises(TypeError, match="gate must be a floating-point"):
        blend_ops.blend_gate(h, h, torch.tensor(0.5), torch.ones(PS, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed_input"):
        blend_ops.blend_multiply(h, h, torch.tensor(0.5), seed_input=h[:, :1])


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
