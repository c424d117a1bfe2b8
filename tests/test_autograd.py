"""Gradients of the native ops: torch.autograd.gradcheck in float64 for every op (scalar and
per-sample alpha, seed_input, gates, layouts), and the activation-memory contract of docs/semantics.md
section 6 for every kernel backend: a fused op saves only its inputs for backward.

Saved bytes are counted with torch.autograd.graph.saved_tensors_hooks. Choice: tensors are
deduplicated by the data pointer of their untyped storage and counted at that storage's full
size, on both sides (the op's tensor inputs and what it saves), so an input saved twice, or a
view saved instead of its base, costs nothing extra; a saved intermediate (a new storage) does.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import kasmina_kernels as kk
from kasmina_kernels import reference
from kasmina_kernels.native import CLAMPED
from kasmina_kernels.optable import BY_NAME

from cases import TEST_DEVICE, backend_params
from equivalence import case_generator

F64 = torch.float64


def rnd(shape, key, *, lo=None, hi=None, dtype=F64, cl=False):
    g = case_generator(key)
    if lo is None:
        t = torch.randn(shape, generator=g, dtype=F64)
    else:
        t = torch.rand(shape, generator=g, dtype=F64) * (hi - lo) + lo
    t = t.to(TEST_DEVICE, dtype)  # KASMINA_TEST_DEVICE=cuda: the same checks on the GPU
    return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t


def weight(shape, key, dtype=F64):
    """Blend weights away from the clamp kinks at 0 and 1 (finite differences straddling a
    kink are meaningless), including values outside [0, 1] whose gradient must be 0."""
    v = rnd(shape, key, lo=0.1, hi=0.9, dtype=F64)
    flat = v.view(-1)
    if flat.numel() >= 3:
        flat[1], flat[2] = 1.4, -0.3
    return v.to(dtype)


def leaf(t):
    return t.detach().requires_grad_(True)


S4 = (2, 3, 4, 5)
PS4 = (2, 1, 1, 1)


def _cases():
    c = {}
    c["add/scalar"] = (lambda h, s, a: kk.blend_add(h, s, a, backend="native"),
                       lambda k: (rnd(S4, k + "h"), rnd(S4, k + "s"), torch.tensor(0.3, dtype=F64)))
    c["add/per_sample/cl"] = (lambda h, s, a: kk.blend_add(h, s, a, backend="native"),
                              lambda k: (rnd(S4, k + "h", cl=True), rnd(S4, k + "s"), weight(PS4, k + "a")))
    c["add/broadcast"] = (lambda h, s, a: kk.blend_add(h, s, a, backend="native"),
                          lambda k: (rnd(S4, k + "h"), rnd(S4, k + "s"), weight((1, 3, 1, 1), k + "a")))
    c["add/above_one"] = (lambda h, s, a: kk.blend_add(h, s, a, backend="native"),
                          lambda k: (rnd(S4, k + "h"), rnd(S4, k + "s"), torch.tensor(1.7, dtype=F64)))
    c["isolation/scalar"] = (lambda h, s, a: kk.blend_with_isolation(h, s, a, backend="native"),
                             lambda k: (rnd(S4, k + "h"), rnd(S4, k + "s"), torch.tensor(0.6, dtype=F64)))
    c["multiply/scalar"] = (lambda h, s, a: kk.blend_multiply(h, s, a, backend="native"),
                            lambda k: (rnd(S4, k + "h"), rnd(S4, k + "s"), torch.tensor(0.4, dtype=F64)))
    c["multiply/per_sample/seed_input"] = (
        lambda h, s, a, r: kk.blend_multiply(h, s, a, seed_input=r, backend="native"),
        lambda k: (rnd(S4, k + "h", cl=True), rnd(S4, k + "s"), weight(PS4, k + "a"), rnd(S4, k + "r")))
    c["multiply/3d/seed_input"] = (
        lambda h, s, a, r: kk.blend_multiply(h, s, a, seed_input=r, backend="native"),
        lambda k: (rnd((3, 5, 6), k + "h"), rnd((3, 5, 6), k + "s"), weight((3, 1, 1), k + "a"),
                   rnd((3, 5, 6), k + "r")))
    c["gate/scalar_alpha"] = (lambda h, s, a, g: kk.blend_gate(h, s, a, g, backend="native"),
                              lambda k: (rnd(S4, k + "h"), rnd(S4, k + "s"), torch.tensor(0.8, dtype=F64),
                                         weight(PS4, k + "g")))
    c["gate/per_sample_alpha"] = (lambda h, s, a, g: kk.blend_gate(h, s, a, g, backend="native"),
                                  lambda k: (rnd(S4, k + "h", cl=True), rnd(S4, k + "s"), weight(PS4, k + "a"),
                                             weight(PS4, k + "g")))
    c["valve/scalar"] = (lambda a, m: kk.multiply_valve_multiplier(a, m, backend="native"),
                         lambda k: (torch.tensor(0.35, dtype=F64), rnd(S4, k + "m")))
    c["valve/per_sample"] = (lambda a, m: kk.multiply_valve_multiplier(a, m, backend="native"),
                             lambda k: (weight(PS4, k + "a"), rnd(S4, k + "m", cl=True)))
    c["gate_effective/scalar_alpha"] = (lambda a, g: kk.gate_effective_alpha(a, g, backend="native"),
                                        lambda k: (torch.tensor(0.7, dtype=F64), weight((5, 1, 1, 1), k + "g")))
    c["gate_effective/per_sample"] = (lambda a, g: kk.gate_effective_alpha(a, g, backend="native"),
                                      lambda k: (weight((5, 1, 1), k + "a"), weight((5, 1, 1), k + "g")))
    c["pool/cnn"] = (lambda x: kk.gated_pool(x, "cnn", backend="native"), lambda k: (rnd(S4, k + "x", cl=True),))
    c["pool/transformer"] = (lambda x: kk.gated_pool(x, "transformer", backend="native"),
                             lambda k: (rnd((2, 7, 6), k + "x"),))
    for topo, xs, ch in (("cnn", (3, 12, 3, 2), 12), ("transformer", (3, 5, 40), 40)):
        hid = reference.gate_hidden_size(ch)
        c[f"gate_network/{topo}"] = (
            lambda x, w1, b1, w2, b2, topo=topo: kk.gate_network(x, w1, b1, w2, b2, topology=topo, backend="native"),
            lambda k, xs=xs, ch=ch, hid=hid: (rnd(xs, k + "x"), rnd((hid, ch), k + "w1"), rnd((hid,), k + "b1"),
                                              rnd((1, hid), k + "w2"), rnd((1,), k + "b2")))
    return c


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_native(name):
    fn, make = CASES[name]
    inputs = tuple(leaf(t) for t in make(f"gradcheck/{name}/"))
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["add/scalar", "multiply/per_sample/seed_input", "gate/per_sample_alpha",
                                  "valve/per_sample", "gate_network/cnn"])
def test_gradcheck_subsets_of_inputs(name):
    """Inputs that do not require grad (the backward skips their gradients)."""
    fn, make = CASES[name]
    base = make(f"subset/{name}/")
    for i in range(len(base)):
        inputs = tuple(leaf(t) if j == i else t for j, t in enumerate(base))
        assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("seed_dtype", [F64, torch.float32], ids=["same", "fp32_seed"])
def test_ste_gradient_is_straight_through(seed_dtype):
    """STE's value ignores s, so gradcheck's finite differences cannot judge it: its gradient
    is 1 to both inputs by definition (ds in s's own dtype)."""
    h = leaf(rnd(S4, "ste/h"))
    s = leaf(rnd(S4, "ste/s", dtype=seed_dtype))
    g = rnd(S4, "ste/g")
    y = kk.ste_forward(h, s, backend="native")
    dh, ds = torch.autograd.grad(y, (h, s), g)
    assert torch.equal(dh, g)
    assert ds.dtype == seed_dtype and torch.equal(ds, g.to(seed_dtype))


def test_gradcheck_with_integer_alpha_and_aliasing():
    h = leaf(rnd(S4, "alias/h"))
    assert gradcheck(lambda h: kk.blend_add(h, h, torch.tensor(1), backend="native"), (h,))
    assert gradcheck(lambda h: kk.blend_multiply(h, h * 0.5, torch.tensor(0.5, dtype=F64), seed_input=h,
                                                 backend="native"), (h,))


# ------------------------------------------------------------------ pooling input gradient
@pytest.mark.parametrize("topology, cl", [("cnn", False), ("cnn", True), ("transformer", False)])
@pytest.mark.parametrize("op", ["gated_pool", "gate_network"])
def test_pooled_input_gradient_is_a_broadcast_view(op, topology, cl):
    """On the CPU the input gradient of a mean is returned as the (B, C) values broadcast over
    the positions with stride 0 (as torch's own sum backward does), holding the reference's
    values; a leaf's .grad and a sum with the input's other gradient come out dense."""
    if TEST_DEVICE.type != "cpu":
        pytest.skip("the broadcast input gradient is the CPU kernels' (the CUDA kernels write dx)")
    shape = (3, 5, 4, 6) if topology == "cnn" else (3, 7, 5)
    x = leaf(rnd(shape, f"poolgrad/{op}/{topology}/{cl}", dtype=torch.float32, cl=cl))
    c = shape[1] if topology == "cnn" else shape[2]
    w = [leaf(rnd(s, f"poolgrad/w{i}", dtype=torch.float32))
         for i, s in enumerate([(8, c), (8,), (1, 8), (1,)])]

    def run(backend):
        if op == "gated_pool":
            return kk.gated_pool(x, topology, backend=backend)
        return kk.gate_network(x, *w, topology=topology, backend=backend)

    y = run("native")
    g = rnd(y.shape, "poolgrad/g", dtype=torch.float32)
    (dx,) = torch.autograd.grad(y, x, g)
    (dx_ref,) = torch.autograd.grad(run("reference"), x, g)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    positions = (2, 3) if topology == "cnn" else (1,)
    assert all(dx.stride(d) == 0 for d in positions), dx.stride()
    torch.testing.assert_close(dx, dx_ref)

    # x used twice: the engine adds the broadcast to the other gradient; a leaf's .grad is
    # dense and keeps x's layout
    (run("native") * g).sum().add((x * 2).sum()).backward()
    assert x.grad.stride() == x.stride()
    torch.testing.assert_close(x.grad, dx_ref + 2)


# ----------------------------------------------------------------------------- saved bytes
class SavedCounter:
    def __init__(self):
        self.saved: list[torch.Tensor] = []

    def pack(self, t):
        self.saved.append(t)
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def storage_bytes(tensors) -> tuple[int, set[int]]:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values()), set(seen)


def _memory_cases():
    """Esper-like dtypes: bf16 features, fp32 weights and seeds."""
    bf = torch.bfloat16
    shape = (4, 8, 6, 6)
    h = rnd(shape, "mem/h", dtype=bf, cl=True)
    s = rnd(shape, "mem/s", dtype=bf)
    s32 = rnd(shape, "mem/s32", dtype=torch.float32)
    r = rnd(shape, "mem/r", dtype=bf)
    a = torch.tensor(0.5)
    ps = weight((4, 1, 1, 1), "mem/a", dtype=torch.float32)
    gate = weight((4, 1, 1, 1), "mem/g", dtype=bf)
    x3 = rnd((4, 9, 32), "mem/x3", dtype=bf)
    w = (rnd((8, 8), "mem/w1", dtype=bf), rnd((8,), "mem/b1", dtype=bf), rnd((1, 8), "mem/w2", dtype=bf),
         rnd((1,), "mem/b2", dtype=bf))
    return {
        "blend_add": (kk.blend_add, (h, s, ps), {}),
        "blend_add_fp32_seed": (kk.blend_add, (h, s32, a), {}),
        "blend_with_isolation": (kk.blend_with_isolation, (h, s, a), {}),
        "blend_multiply": (kk.blend_multiply, (h, s, ps), {}),
        "blend_multiply_seed_input": (kk.blend_multiply, (h, s, ps), {"seed_input": r}),
        "blend_multiply_aliased": (kk.blend_multiply, (h, h, a), {"seed_input": h}),
        "blend_gate": (kk.blend_gate, (h, s, a, gate), {}),
        "ste_forward": (kk.ste_forward, (h, s), {}),
        "multiply_valve_multiplier": (kk.multiply_valve_multiplier, (ps, h), {}),
        "gate_effective_alpha": (kk.gate_effective_alpha, (a, gate), {}),
        "gated_pool": (kk.gated_pool, (h, "cnn"), {}),
        "gated_pool_transformer": (kk.gated_pool, (x3, "transformer"), {}),
        "gate_network": (kk.gate_network, (h,) + w, {"topology": "cnn"}),
    }


MEMORY_CASES = _memory_cases()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", list(MEMORY_CASES))
def test_fused_op_saves_at_most_its_inputs(backend, name):
    fn, args, kwargs = MEMORY_CASES[name]
    made: dict[int, torch.Tensor] = {}  # one leaf per input object, so aliases stay aliases

    def as_leaf(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return made.setdefault(id(a), leaf(a))
        return a

    leaves = [as_leaf(a) for a in args]
    kw = {k: as_leaf(v) for k, v in kwargs.items()}
    with SavedCounter() as counter:
        y = fn(*leaves, **kw, backend=backend)
    in_bytes, in_storages = storage_bytes(list(leaves) + list(kw.values()))
    saved_bytes, saved_storages = storage_bytes(counter.saved)
    assert saved_bytes <= in_bytes, f"saved {saved_bytes} B for backward, inputs are {in_bytes} B"
    # docs/semantics.md#performance-model: a fused op saves only its inputs (no intermediates)
    assert saved_storages <= in_storages, "the op saved a tensor that is not one of its inputs"
    assert y.requires_grad
    # and its backward still runs from what it saved
    torch.autograd.grad(y, [t for t in leaves + list(kw.values()) if isinstance(t, torch.Tensor)
                            and t.requires_grad], torch.ones_like(y), allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["blend_multiply", "blend_multiply_seed_input", "blend_multiply_aliased"])
def test_keep_residuals_saves_one_tensor_more(name, dtype):
    """kk.keep_residuals(): native MULTIPLY also saves its tanh's complement (float32 hosts only,
    one tensor of the host's size), and its backward reads it; off again after the block."""
    pytest.importorskip("kasmina_kernels.native")
    fn, args, kwargs = MEMORY_CASES[name]
    made: dict[int, torch.Tensor] = {}
    as_leaf = lambda a: made.setdefault(id(a), leaf(a.to(dtype))) if isinstance(a, torch.Tensor) and a.dim() else a  # noqa: E731
    leaves = [as_leaf(a) for a in args]
    kw = {k: as_leaf(v) for k, v in kwargs.items()}
    in_bytes, in_storages = storage_bytes(leaves + list(kw.values()))
    with kk.keep_residuals(), SavedCounter() as counter:
        y = fn(*leaves, **kw, backend="native")
    saved_bytes, saved_storages = storage_bytes(counter.saved)
    extra = y.numel() * y.element_size() if dtype == torch.float32 else 0
    assert saved_bytes <= in_bytes + extra
    assert len(saved_storages - in_storages) == (1 if extra else 0)
    want = fn(*leaves, **kw, backend="native")  # the setting is restored: inputs only
    grads = [t for t in leaves + list(kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    g = torch.randn_like(y)
    # (the equivalence cases judge these gradients; here: the same but for the small |s - r|
    # whose tanh the backward forms as 1 - (1 - |tanh|), to an ulp of 1)
    for got, ref in zip(torch.autograd.grad(y, grads, g), torch.autograd.grad(want, grads, g)):
        torch.testing.assert_close(got, ref, rtol=2e-6 if extra else 0, atol=1e-6 if extra else 0)


def test_saved_bytes_counter_sees_the_reference_intermediates():
    """Control: the counter does count intermediates (eager MULTIPLY saves tanh etc.)."""
    fn, args, kwargs = MEMORY_CASES["blend_multiply"]
    leaves = [leaf(a) for a in args]
    with SavedCounter() as counter:
        reference.blend_multiply(*leaves)
    _, in_storages = storage_bytes(leaves)
    _, saved_storages = storage_bytes(counter.saved)
    assert not saved_storages <= in_storages


# ----------------------------------------------------------------------------- higher order
# A fused op has a first derivative only. Double backward (create_graph=True, then
# differentiating the gradient) and forward-mode AD (torch.autograd.forward_ad,
# torch.func.jvp) either work and are correct (ste_forward's gradient is the incoming one, so
# its double backward is plain autograd) or raise NotImplementedError naming the op; never a
# silently zero, missing or "unused" derivative.
def _ad_inputs(dtype):
    def r(shape, key, **kw):
        return rnd(shape, "ad/" + key, dtype=dtype, **kw)

    h, s, x = r(S4, "h"), r(S4, "s"), r((2, 16, 3, 3), "x")
    return {
        "blend_add": (lambda b, t: kk.blend_add(t[0], t[1], t[2], backend=b), (h, s, weight(PS4, "a", dtype))),
        "blend_with_isolation": (lambda b, t: kk.blend_with_isolation(t[0], t[1], t[2], backend=b),
                                 (h, s, weight(PS4, "a", dtype))),
        "blend_multiply": (lambda b, t: kk.blend_multiply(t[0], t[1], t[2], seed_input=t[3], backend=b),
                           (h, s, weight(PS4, "a", dtype), r(S4, "r"))),
        "blend_gate": (lambda b, t: kk.blend_gate(t[0], t[1], t[2], t[3], backend=b),
                       (h, s, torch.tensor(0.7, dtype=dtype), weight(PS4, "g", dtype))),
        "multiply_valve_multiplier": (lambda b, t: kk.multiply_valve_multiplier(t[0], t[1], backend=b),
                                      (weight(PS4, "a", dtype), s)),
        "gate_effective_alpha": (lambda b, t: kk.gate_effective_alpha(t[0], t[1], backend=b),
                                 (weight(PS4, "a", dtype), weight(PS4, "g", dtype))),
        "gated_pool": (lambda b, t: kk.gated_pool(t[0], "cnn", backend=b), (x,)),
        "gate_network": (lambda b, t: kk.gate_network(*t, topology="cnn", backend=b),
                         (x, r((8, 16), "w1"), r((8,), "b1"), r((1, 8), "w2"), r((1,), "b2"))),
        "ste_forward": (lambda b, t: kk.ste_forward(t[0], t[1], backend=b), (h, s)),
    }


AD_OPS = list(_ad_inputs(F64))


def _named(op):
    """How the error names the op: the registered op it runs (blend_with_isolation runs
    kasmina::blend_add; the triton backend's ops are kasmina::triton_<name>)."""
    return "(triton_)?" + ("blend_add" if op == "blend_with_isolation" else op)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("op", AD_OPS)
def test_double_backward_is_correct_or_a_clear_error(op, backend):
    call, inputs = _ad_inputs(F64)[op]
    leaves = [leaf(t) for t in inputs]
    y = call(backend, leaves)
    # a first-order gradient with create_graph=True works and equals the plain one
    first = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
    plain = torch.autograd.grad(call(backend, leaves).square().sum(), leaves)
    for a, b in zip(first, plain):
        torch.testing.assert_close(a.detach(), b)
    if op == "ste_forward":
        # the gradient is 2*y to both inputs: the second derivative is plain autograd's
        (ref_h,) = torch.autograd.grad(reference.ste_forward(*leaves).square().sum(), leaves[:1], create_graph=True)
        want = torch.autograd.grad(ref_h.sum(), leaves, allow_unused=True)
        got = torch.autograd.grad(first[0].sum(), leaves, allow_unused=True)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
        return
    for i, target in enumerate(leaves):  # differentiating any gradient w.r.t. any input raises
        with pytest.raises(RuntimeError, match=f"kasmina::{_named(op)}: double backward .*not supported"):
            torch.autograd.grad(first[0].sum(), target, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("op", AD_OPS)
def test_forward_mode_ad_is_a_clear_error(op, backend):
    import torch.autograd.forward_ad as fwAD

    call, inputs = _ad_inputs(F64)[op]
    match = f"kasmina::{_named(op)}: .*(forward-mode AD|torch.func's differentiating transforms)"
    with pytest.raises(NotImplementedError, match=match):
        torch.func.jvp(lambda *t: call(backend, t), tuple(inputs), tuple(torch.ones_like(t) for t in inputs))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(inputs[0], torch.ones_like(inputs[0]))] + list(inputs[1:])
        with pytest.raises(NotImplementedError, match=f"kasmina::{_named(op)}: forward-mode AD"):
            call(backend, duals)
        # without a tangent on any input the op runs as usual inside a dual level
        torch.testing.assert_close(call(backend, inputs), call("reference", inputs))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("op", AD_OPS)
def test_inference_tensors(op, backend):
    """Autograd cannot save an inference tensor (made under torch.inference_mode()). For each
    input in turn made so, beside inputs that require grad: alpha and gate, which the eager
    math reads only through a clamp (a copy), are saved as copies, and the op matches the
    reference, gradients included; a feature raises NotImplementedError naming the op (the
    drop-ins answer that with Esper's math), except in STE, which saves nothing. Without a
    gradient to record, every op runs."""
    call, inputs = _ad_inputs(F64)[op]
    for k, name in enumerate(BY_NAME[op].inputs[:len(inputs)]):  # the tensor inputs lead
        with torch.inference_mode():
            frozen = inputs[k].clone()
        leaves = [leaf(t) for t in inputs]
        args = leaves[:k] + [frozen] + leaves[k + 1:]
        if len(args) > 1 and name not in CLAMPED and op != "ste_forward":  # it would save `frozen`
            with pytest.raises(NotImplementedError, match=f"kasmina::{_named(op)}: an input is an inference tensor"):
                call(backend, args)
        else:
            got = call(backend, args)
            torch.testing.assert_close(got, call("reference", args))
            grads = [t for t in args if t.requires_grad]
            if grads:
                got_grads = torch.autograd.grad(got.square().sum(), grads)
                want_grads = torch.autograd.grad(call("reference", args).square().sum(), grads)
                for g, w in zip(got_grads, want_grads, strict=True):
                    torch.testing.assert_close(g, w)
        with torch.no_grad():
            torch.testing.assert_close(call(backend, args), call("reference", args))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("op", ["blend_add", "blend_multiply", "blend_gate"])
def test_input_modified_in_place_before_backward(op, backend):
    """A fused op saves its inputs: h modified in place before the backward is autograd's
    RuntimeError (as for the reference, whose weights here need gradients too), and inside
    allow_mutation_on_saved_tensors() the gradients are those of the values the op saw."""
    call, inputs = _ad_inputs(F64)[op]

    def run(backend):
        leaves = [leaf(t) for t in inputs]
        h = leaves[0] * 1  # a non-leaf, which may be modified in place
        y = call(backend, [h] + leaves[1:])
        h.add_(1.0)
        return torch.autograd.grad(y.square().sum(), leaves)

    for b in (backend, "reference"):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            run(b)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        got = run(backend)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        want = run("reference")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", backend_params())
def test_vmap_runs_the_op_per_batch_entry(backend):
    """torch.func.vmap through a fused op: its vmap rule calls it once per batch entry, and
    reverse-mode autograd outside the transform differentiates through it."""
    h, s = leaf(rnd((3,) + S4, "vmap/h")), rnd((3,) + S4, "vmap/s")
    alpha = torch.tensor(0.4, dtype=F64)
    got = torch.func.vmap(lambda h, s: kk.blend_multiply(h, s, alpha, backend=backend))(h, s)
    torch.testing.assert_close(got, reference.blend_multiply(h, s, alpha))
    (got_dh,) = torch.autograd.grad(got.square().sum(), h)
    (want_dh,) = torch.autograd.grad(reference.blend_multiply(h, s, alpha).square().sum(), h)
    torch.testing.assert_close(got_dh, want_dh)
    x = rnd((2, 3, 16, 3, 3), "vmap/x")
    got = torch.func.vmap(lambda x: kk.gated_pool(x, "cnn", backend=backend), in_dims=1)(x)
    torch.testing.assert_close(got, torch.stack([reference.gated_pool(x[:, i], "cnn") for i in range(3)]))


@pytest.mark.parametrize("backend", backend_params())
def test_torch_func_grad_is_a_clear_error(backend):
    h, s = rnd(S4, "func/h"), rnd(S4, "func/s")
    with pytest.raises(NotImplementedError, match="kasmina::(triton_)?blend_add: torch.func's differentiating transforms"):
        torch.func.grad(lambda h: kk.blend_add(h, s, torch.tensor(0.4, dtype=F64), backend=backend).sum())(h)


def test_raw_backward_op_outside_autograd_runs_unchanged():
    """The backward ops' Autograd kernel only adds the error node when autograd records
    them; a direct call without grad-requiring inputs returns plain tensors."""
    g, h, s = (rnd(S4, "raw/" + k) for k in "ghs")
    a = torch.tensor(0.3, dtype=F64)
    dh, ds, da = torch.ops.kasmina.blend_add_backward(g, h, s, a, True)
    assert dh.grad_fn is None and not dh.requires_grad
    torch.testing.assert_close(dh, g * 0.7)


def test_backward_rejects_a_tanh_that_is_not_the_forwards():
    pytest.importorskip("kasmina_kernels.native")
    h, s, g = (rnd((2, 3, 4, 5), f"tanh/{n}", dtype=torch.float32) for n in "hsg")
    a = torch.tensor(0.5)
    for bad in (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, 5, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="tanh_complement must be blend_multiply_for_backward's"):
            torch.ops.kasmina.blend_multiply_backward(g, h, s, a, None, False, False, bad)
    hb = h.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="tanh_complement must be"):
        torch.ops.kasmina.blend_multiply_backward(g.to(hb.dtype), hb, s.to(hb.dtype), a, None, False, False,
                                                  torch.zeros_like(hb))


def test_backward_from_a_kept_tanh_returns_each_gradient_in_its_inputs_dtype():
    """blend_multiply_backward reading the forward's tanh complement returns the same dtypes as
    without it: a float64 seed (and seed input) beside a float32 host gets float64 gradients."""
    pytest.importorskip("kasmina_kernels.native")
    ops = torch.ops.kasmina
    h, g = (rnd((2, 3, 4, 5), f"kept-dtype/{n}", dtype=torch.float32) for n in "hg")
    s, r = (rnd((2, 3, 4, 5), f"kept-dtype/{n}", dtype=torch.float64) for n in "sr")
    a = torch.tensor(0.5)
    for seed_input in (None, r):
        _, tanh = ops.blend_multiply_for_backward(h, s, a, seed_input)
        assert tanh.numel() > 0
        flags = (False, seed_input is not None)
        plain = ops.blend_multiply_backward(g, h, s, a, seed_input, *flags)
        kept = ops.blend_multiply_backward(g, h, s, a, seed_input, *flags, tanh)
        assert [t.dtype for t in kept] == [t.dtype for t in plain]
        assert kept[1].dtype == torch.float64
