"""The exact contracts of docs/semantics.md#operators, bit for bit (no tolerance), for every backend
(the reference included, as the control):

- output == host at alpha = 0 for ADD, MULTIPLY, GATE and blend_with_isolation (and the
  weight ops' identities: the valve multiplier is 1 and the effective alpha 0 at alpha = 0);
- MULTIPLY == host when s == r (seed_input equal to s);
- GATE == host at gate = 0;
- NaN/Inf in h or s propagate exactly where the reference propagates them (a NaN seed gives
  NaN even at alpha = 0);
- STE's value is h, NaN where s is not finite;
- no op writes into its inputs (nor into the upstream gradient), forward and backward;
- the output follows the host's dtype and memory format; every gradient comes back in its
  input's dtype and shape;
- zero-size batches and torch.inference_mode() work.
"""

from __future__ import annotations

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels import reference

from cases import backend_params
from equivalence import case_generator

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16, F64]
_INT_VIEW = {F32: torch.int32, F64: torch.int64, BF16: torch.int16, F16: torch.int16}
BACKENDS = backend_params(include_reference=True)
BLENDS = ["blend_add", "blend_with_isolation", "blend_multiply", "blend_multiply_r", "blend_gate"]


def _id(x):
    return str(x).replace("torch.", "")


def rnd(shape, dtype, key, *, cl=False, lo=None, hi=None):
    g = case_generator(key)
    if lo is not None:
        t = torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
    else:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
    t = t.to(dtype)
    if cl and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def per_sample(shape):
    return (shape[0],) + (1,) * (len(shape) - 1)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (so -0.0 != 0.0 and NaN payloads count)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = _INT_VIEW.get(a.dtype)
    if view is None:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def call(op, backend, h, s, alpha, *, gate=None, r=None):
    """One blend op through the public API (`backend="reference"` included)."""
    name = "blend_multiply" if op == "blend_multiply_r" else op
    fn = getattr(kk, name)
    kw = {"backend": backend}
    if name == "blend_gate":
        return fn(h, s, alpha, gate, **kw)
    if name == "blend_multiply":
        return fn(h, s, alpha, seed_input=r, **kw)
    return fn(h, s, alpha, **kw)


def blend_inputs(op, dtype, shape, key, *, cl=False, seed_dtype=None):
    h = rnd(shape, dtype, key + "/h", cl=cl)
    s = rnd(shape, seed_dtype or dtype, key + "/s")
    gate = rnd(per_sample(shape), dtype, key + "/gate", lo=0.05, hi=1.0) if op == "blend_gate" else None
    r = rnd(shape, seed_dtype or dtype, key + "/r") if op == "blend_multiply_r" else None
    return h, s, gate, r


def zero_alpha(kind, shape):
    return {
        "f32": lambda: torch.tensor(0.0),
        "bf16": lambda: torch.tensor(0.0, dtype=BF16),
        "int": lambda: torch.tensor(0),
        "negative": lambda: torch.tensor(-0.75),  # clamps to 0
        "per_sample": lambda: torch.zeros(per_sample(shape)),
        "per_sample_negative": lambda: torch.full(per_sample(shape), -2.0),
        "broadcast": lambda: torch.zeros((1, shape[1]) + (1,) * (len(shape) - 2)),
    }[kind]()


# ----------------------------------------------------------------------------- alpha = 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", BLENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape,cl", [((3, 5, 7, 11), False), ((3, 5, 7, 11), True), ((4, 9, 24), False)],
                         ids=["nchw", "channels_last", "3d"])
@pytest.mark.parametrize("alpha_kind", ["f32", "bf16", "int", "negative", "per_sample",
                                        "per_sample_negative", "broadcast"])
def test_output_is_host_at_alpha_zero(backend, op, dtype, shape, cl, alpha_kind):
    key = f"a0/{op}/{dtype}/{shape}/{cl}/{alpha_kind}"
    h, s, gate, r = blend_inputs(op, dtype, shape, key, cl=cl)
    alpha = zero_alpha(alpha_kind, shape)
    y = call(op, backend, h, s, alpha, gate=gate, r=r)
    assert bits_equal(y, h), f"{op} at alpha=0 ({alpha_kind}) differs from the host"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", BLENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_gradients_at_alpha_zero(backend, op, dtype):
    """At alpha = 0 the host gradient is the upstream gradient and the seed gets zero."""
    shape = (3, 5, 7, 11)
    key = f"a0grad/{op}/{dtype}"
    h, s, gate, r = blend_inputs(op, dtype, shape, key)
    h.requires_grad_(True)
    s.requires_grad_(True)
    g = rnd(shape, dtype, key + "/g")
    y = call(op, backend, h, s, torch.tensor(0.0), gate=gate, r=r)
    dh, ds = torch.autograd.grad(y, (h, s), g)
    assert bits_equal(dh, g)
    assert torch.equal(ds, torch.zeros_like(s))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("alpha_kind", ["f32", "int", "negative", "per_sample"])
def test_weight_ops_at_alpha_zero(backend, dtype, alpha_kind):
    shape = (3, 5, 7, 11)
    m = rnd(shape, dtype, f"valve0/{dtype}/{alpha_kind}")
    alpha = zero_alpha(alpha_kind, shape)
    v = kk.multiply_valve_multiplier(alpha, m, backend=backend)
    assert v.dtype == torch.result_type(alpha, m)
    assert torch.equal(v, torch.ones_like(v)), "1 + clamp01(0) * tanh(m) must be exactly 1"
    gate = rnd(per_sample(shape), dtype, f"gate0/{dtype}/{alpha_kind}", lo=-0.5, hi=1.5)
    e = kk.gate_effective_alpha(alpha, gate, backend=backend)
    assert torch.equal(e, torch.zeros_like(e))


# ----------------------------------------------------------------------------- s == r, gate = 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,r_kind", [
    (d, k) for d in DTYPES for k in ("same_object", "equal_copy", "fp32_copy", "channels_last_copy")
    if not (k == "fp32_copy" and d == F64)  # an fp32 copy of float64 values is not equal
], ids=lambda x: _id(x))
@pytest.mark.parametrize("alpha", [torch.tensor(0.6), torch.tensor(1.0), torch.tensor(3.0)], ids=["0.6", "1", "3"])
def test_multiply_is_host_when_seed_equals_seed_input(backend, dtype, r_kind, alpha):
    shape = (3, 5, 7, 11)
    key = f"s=r/{dtype}/{r_kind}"
    h = rnd(shape, dtype, key + "/h")
    s = rnd(shape, dtype, key + "/s")
    r = {
        "same_object": lambda: s,
        "equal_copy": lambda: s.clone(),
        "fp32_copy": lambda: s.to(F32),
        "channels_last_copy": lambda: s.contiguous(memory_format=torch.channels_last),
    }[r_kind]()
    y = kk.blend_multiply(h, s, alpha, seed_input=r, backend=backend)
    assert bits_equal(y, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiply_is_host_when_seed_equals_seed_input_per_sample(backend):
    shape = (4, 3, 5, 5)
    h = rnd(shape, BF16, "s=r/ps/h", cl=True)
    s = rnd(shape, BF16, "s=r/ps/s")
    alpha = rnd(per_sample(shape), F32, "s=r/ps/a", lo=-1.0, hi=2.0)
    y = kk.blend_multiply(h, s, alpha, seed_input=s, backend=backend)
    assert bits_equal(y, h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("gate_kind", ["zero", "negative", "zero_fp32"])
@pytest.mark.parametrize("alpha_kind", ["scalar", "per_sample", "above_one"])
def test_gate_is_host_at_gate_zero(backend, dtype, gate_kind, alpha_kind):
    shape = (4, 5, 6, 7)
    key = f"g0/{dtype}/{gate_kind}/{alpha_kind}"
    h = rnd(shape, dtype, key + "/h", cl=True)
    s = rnd(shape, dtype, key + "/s")
    gate = {
        "zero": lambda: torch.zeros(per_sample(shape), dtype=dtype),
        "negative": lambda: torch.full(per_sample(shape), -0.5, dtype=dtype),
        "zero_fp32": lambda: torch.zeros(per_sample(shape), dtype=F32),
    }[gate_kind]()
    alpha = {
        "scalar": lambda: torch.tensor(0.7),
        "per_sample": lambda: rnd(per_sample(shape), F32, key + "/a", lo=0.1, hi=1.0),
        "above_one": lambda: torch.tensor(1.5),
    }[alpha_kind]()
    y = kk.blend_gate(h, s, alpha, gate, backend=backend)
    assert bits_equal(y, h)


# ----------------------------------------------------------------------------- NaN / Inf
def _plant(t, key, specs):
    g = case_generator(key)
    positions = []
    for v in specs:
        idx = tuple(int(torch.randint(0, n, (), generator=g)) for n in t.shape)
        t[idx] = v
        positions.append(idx)
    return positions


def _nonfinite_masks(t):
    return t.isnan(), t.isposinf(), t.isneginf()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", BLENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.5, 1.0, "per_sample"], ids=str)
def test_nonfinite_propagate_like_reference(backend, op, dtype, alpha):
    shape = (3, 5, 7, 11)
    key = f"nan/{op}/{dtype}/{alpha}"
    h, s, gate, r = blend_inputs(op, dtype, shape, key)
    nan, inf = float("nan"), float("inf")
    s_pos = _plant(s, key + "/s", [nan, inf, -inf, nan])
    _plant(h, key + "/h", [nan, inf, -inf])
    if r is not None:
        _plant(r, key + "/r", [nan, inf])
    if alpha == "per_sample":
        a = rnd(per_sample(shape), F32, key + "/a", lo=-0.5, hi=1.5)
        a.view(-1)[0] = 0.0
    else:
        a = torch.tensor(alpha)
    y = call(op, backend, h, s, a, gate=gate, r=r)
    ref = call(op, "reference", h, s, a, gate=gate, r=r)
    for name, km, rm in zip(("NaN", "+Inf", "-Inf"), _nonfinite_masks(y), _nonfinite_masks(ref)):
        assert torch.equal(km, rm), f"{name} placement differs from the reference"
    if alpha == 0.0:
        # no shortcut skips reading s: a NaN seed gives NaN even at alpha = 0
        for p in (s_pos[0], s_pos[3]):
            assert y[p].isnan(), f"NaN seed at {p} did not reach the output at alpha=0"
        ok = torch.isfinite(h) & torch.isfinite(s) & (torch.isfinite(r) if r is not None else True)
        assert bits_equal(y[ok], h[ok])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["blend_add", "blend_multiply", "blend_gate", "ste_forward"])
@pytest.mark.parametrize("host", [F16, BF16], ids=_id)
def test_seed_overflowing_the_host_dtype(backend, op, host):
    """An fp32 seed value beyond the host dtype's range becomes Inf on the cast, and from
    there propagates as the reference propagates it."""
    shape = (2, 3, 4, 5)
    key = f"overflow/{op}/{host}"
    h = rnd(shape, host, key + "/h")
    s = rnd(shape, F32, key + "/s")
    big = 1e5 if host == F16 else 3.3961e38 * 1.0001
    s[0, 0, 0, 0] = big
    s[1, 2, 3, 4] = -big
    args = {"blend_add": (torch.tensor(0.0),), "blend_multiply": (torch.tensor(0.0),),
            "blend_gate": (torch.tensor(0.0), torch.full((2, 1, 1, 1), 0.5, dtype=host)),
            "ste_forward": ()}[op]
    y = getattr(kk, op)(h, s, *args, backend=backend)
    ref = getattr(reference, op)(h, s, *args)
    for km, rm in zip(_nonfinite_masks(y), _nonfinite_masks(ref)):
        assert torch.equal(km, rm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64], ids=_id)
@pytest.mark.parametrize("op", ["blend_multiply", "multiply_valve_multiplier"])
def test_tanh_gradient_nonfinite_where_tanh_saturates(op, backend, dtype):
    """With an infinite factor beside 1 - t^2 and 1 + c*t (MULTIPLY's host; the valve's
    upstream gradient), the value and the gradient of tanh's argument are NaN exactly where
    the reference's are: where its tanh rounds to +-1 in the dtype (1 - t^2 is 0 there, and
    1 + c*t for c = 1 and negative arguments). Every value of the argument from 2 to 10, both
    signs (float32 and float64: every value around the point where the tanh reaches 1)."""
    view = _INT_VIEW[dtype]
    span = {F32: (8.9, 9.2), F64: (19.061547465, 19.0615474659)}.get(dtype, (2.0, 10.0))
    lo, hi = (int(torch.tensor(v, dtype=dtype).view(view)) for v in span)
    bits = torch.arange(lo, hi + 1, dtype=view)
    d = bits.view(dtype)
    d = torch.cat([d, -d])
    one, inf = torch.tensor(1.0), torch.full_like(d, float("inf"))
    grads, values = [], []
    for fn in (getattr(kk, op), getattr(reference, op)):
        kwargs = {"backend": backend} if fn is not getattr(reference, op) else {}
        arg = d.clone().requires_grad_()
        if op == "blend_multiply":
            v = fn(inf.clone().requires_grad_(), arg, one, seed_input=torch.zeros_like(d), **kwargs)
            v.sum().backward()
        else:
            v = fn(one, arg, **kwargs)
            v.backward(inf)
            v = v * inf  # the infinite factor: NaN where 1 + c*t is 0
        grads.append(arg.grad)
        values.append(v.detach())
    for what, (k, r) in (("value", values), ("gradient", grads)):
        assert bool(r.isnan().any()) and bool(r.isinf().any())  # the range crosses saturation
        for name, km, rm in zip(("NaN", "+Inf", "-Inf"), _nonfinite_masks(k), _nonfinite_masks(r)):
            assert torch.equal(km, rm), f"{name} placement in the {what} differs from the reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("seed_dtype", [None, F32], ids=["same", "fp32_seed"])
def test_ste_value_is_host_nan_where_seed_not_finite(backend, dtype, seed_dtype):
    shape = (3, 5, 7, 11)
    key = f"ste/{dtype}/{seed_dtype}"
    h = rnd(shape, dtype, key + "/h", cl=True)
    s = rnd(shape, seed_dtype or dtype, key + "/s")
    pos = _plant(s, key + "/s", [float("nan"), float("inf"), float("-inf")])
    y = kk.ste_forward(h, s, backend=backend)
    assert y.dtype == h.dtype and y.shape == h.shape
    bad = ~torch.isfinite(s)
    assert bits_equal(y[~bad], h[~bad])
    for p in pos:
        assert y[p].isnan()
    # non-finite host values pass through as h + 0 does, and -0 becomes +0
    h2 = h.clone()
    hp = _plant(h2, key + "/h2", [float("inf"), float("-inf"), float("nan"), -0.0])
    s2 = rnd(shape, seed_dtype or dtype, key + "/s2")
    y2 = kk.ste_forward(h2, s2, backend=backend)
    ref2 = reference.ste_forward(h2, s2)
    assert same_or_both_nan(y2, ref2)
    assert bits_equal(y2[~h2.isnan()], ref2[~h2.isnan()])
    assert y2[hp[0]] == float("inf") and y2[hp[1]] == float("-inf") and y2[hp[2]].isnan()
    # a finite seed value the cast to the host's dtype overflows counts as not finite
    if seed_dtype is not None and dtype in (BF16, F16):
        s3 = s2.clone()
        s3[hp[3]] = 3.4e38 if dtype == torch.bfloat16 else 1e5  # finite in float32
        y3 = kk.ste_forward(h2, s3, backend=backend)
        assert same_or_both_nan(y3, reference.ste_forward(h2, s3)) and y3[hp[3]].isnan()


# ----------------------------------------------------------------------------- no writes
def _all_ops_inputs(op, dtype, key):
    """(callable, inputs) for every public op, with grads on every float input."""
    shape = (3, 4, 5, 6)
    h = rnd(shape, dtype, key + "/h", cl=True)
    s = rnd(shape, dtype, key + "/s")  # NCHW beside a channels_last host
    a = torch.tensor(0.6)
    ps = rnd(per_sample(shape), F32, key + "/a", lo=-0.2, hi=1.2)
    gate = rnd(per_sample(shape), dtype, key + "/gate", lo=0.1, hi=0.9)
    r = rnd((3, 8, 5, 6), dtype, key + "/r")[:, ::2]  # a non-contiguous view
    x3 = rnd((3, 7, 16), dtype, key + "/x3")
    hid = 8
    w = dict(w1=rnd((hid, 4), dtype, key + "/w1"), b1=rnd((hid,), dtype, key + "/b1"),
             w2=rnd((1, hid), dtype, key + "/w2"), b2=rnd((1,), dtype, key + "/b2"))
    table = {
        "blend_add": (lambda b, h, s, a: kk.blend_add(h, s, a, backend=b), (h, s, ps)),
        "blend_with_isolation": (lambda b, h, s, a: kk.blend_with_isolation(h, s, a, backend=b), (h, s, a)),
        "blend_multiply": (lambda b, h, s, a, r: kk.blend_multiply(h, s, a, seed_input=r, backend=b), (h, s, ps, r)),
        "blend_multiply_aliased": (lambda b, h, a: kk.blend_multiply(h, h, a, seed_input=h, backend=b), (h, a)),
        "blend_gate": (lambda b, h, s, a, g: kk.blend_gate(h, s, a, g, backend=b), (h, s, a, gate)),
        "ste_forward": (lambda b, h, s: kk.ste_forward(h, s, backend=b), (h, s)),
        "multiply_valve_multiplier": (lambda b, a, m: kk.multiply_valve_multiplier(a, m, backend=b), (ps, h)),
        "gate_effective_alpha": (lambda b, a, g: kk.gate_effective_alpha(a, g, backend=b), (ps, gate)),
        "gated_pool": (lambda b, x: kk.gated_pool(x, "cnn", backend=b), (h,)),
        "gated_pool_transformer": (lambda b, x: kk.gated_pool(x, "transformer", backend=b), (x3,)),
        "gate_network": (lambda b, x, w1, b1, w2, b2: kk.gate_network(x, w1, b1, w2, b2, topology="cnn", backend=b),
                         (h, w["w1"], w["b1"], w["w2"], w["b2"])),
    }
    return table[op]


ALL_OPS_FOR_WRITES = [
    "blend_add", "blend_with_isolation", "blend_multiply", "blend_multiply_aliased", "blend_gate",
    "ste_forward", "multiply_valve_multiplier", "gate_effective_alpha", "gated_pool",
    "gated_pool_transformer", "gate_network",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS_FOR_WRITES)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_no_op_writes_into_its_inputs(backend, op, dtype):
    fn, inputs = _all_ops_inputs(op, dtype, f"nowrite/{op}/{dtype}")
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    # snapshot the storage contents (views included) before the call
    before = [t.detach().clone() for t in leaves]
    y = fn(backend, *leaves)
    for t, b in zip(leaves, before):
        assert same_or_both_nan(t.detach(), b), f"{op} forward wrote into an input"
    g = rnd(tuple(y.shape), y.dtype, f"nowrite/{op}/g")
    g_before = g.clone()
    torch.autograd.grad(y, leaves, g, allow_unused=True)
    for t, b in zip(leaves, before):
        assert same_or_both_nan(t.detach(), b), f"{op} backward wrote into an input"
    assert same_or_both_nan(g, g_before), f"{op} backward wrote into the upstream gradient"


# ----------------------------------------------------------------------------- dtype / format
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", BLENDS + ["ste_forward"])
@pytest.mark.parametrize("host_cl", [True, False], ids=["cl_host_nchw_seed", "nchw_host_cl_seed"])
@pytest.mark.parametrize("host,seed", [(F32, F32), (BF16, BF16), (F16, F16), (F64, F64),
                                       (BF16, F32), (F16, F32)], ids=lambda d: _id(d))
def test_output_follows_host_dtype_and_memory_format(backend, op, host_cl, host, seed):
    shape = (2, 6, 3, 5)
    key = f"fmt/{op}/{host_cl}/{host}/{seed}"
    h = rnd(shape, host, key + "/h", cl=host_cl)
    s = rnd(shape, seed, key + "/s", cl=not host_cl)
    gate = rnd(per_sample(shape), F32, key + "/g", lo=0, hi=1)
    alpha = rnd(per_sample(shape), F32, key + "/a", lo=0, hi=1)
    r = rnd(shape, seed, key + "/r", cl=not host_cl) if op == "blend_multiply_r" else None
    leaves = [t.requires_grad_(True) for t in (h, s, alpha, gate) + ((r,) if r is not None else ())]
    if op == "ste_forward":
        y = kk.ste_forward(h, s, backend=backend)
    else:
        y = call(op, backend, h, s, alpha, gate=gate, r=r)
    assert y.dtype == host
    assert y.shape == h.shape
    if host_cl:
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    else:
        assert y.is_contiguous()
    grads = torch.autograd.grad(y, leaves, rnd(shape, host, key + "/gy"), allow_unused=True)
    for t, gr in zip(leaves, grads):
        if gr is None:
            continue  # inputs the op does not use (gate outside GATE, alpha for STE)
        assert gr.dtype == t.dtype and gr.shape == t.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha_dtype,m_dtype", [(F32, BF16), (BF16, F32), (F32, F16), (F64, F32)],
                         ids=lambda d: _id(d))
@pytest.mark.parametrize("form", ["scalar", "per_sample"])
def test_weight_op_dtypes(backend, alpha_dtype, m_dtype, form):
    shape = (3, 4, 2, 2)
    m = rnd(shape, m_dtype, "wd/m", cl=True)
    alpha = (torch.tensor(0.3, dtype=alpha_dtype) if form == "scalar"
             else rnd(per_sample(shape), alpha_dtype, "wd/a", lo=0, hi=1))
    v = kk.multiply_valve_multiplier(alpha, m, backend=backend)
    assert v.dtype == torch.result_type(alpha, m) and v.shape == m.shape
    assert v.is_contiguous(memory_format=torch.channels_last)
    gate = rnd(per_sample(shape), m_dtype, "wd/g", lo=0, hi=1)
    e = kk.gate_effective_alpha(alpha, gate, backend=backend)
    assert e.dtype == torch.result_type(alpha, gate)
    assert e.shape == torch.broadcast_shapes(alpha.shape, gate.shape)


# ----------------------------------------------------------------------------- zero batch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS_FOR_WRITES)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_zero_size_batch(backend, op, dtype):
    fn, inputs = _all_ops_inputs(op, dtype, f"zero/{op}/{dtype}")

    def empty_batch(t):
        # features and per-sample weights are 3-D/4-D; 0-dim alpha and the gate-network
        # weights have no batch dimension
        return t[:0] if t.dim() >= 3 else t

    leaves = [empty_batch(t).detach().requires_grad_(True) for t in inputs]
    y = fn(backend, *leaves)
    ref = fn("reference", *leaves)
    assert y.shape == ref.shape and y.dtype == ref.dtype and y.shape[0] == 0
    g = torch.zeros(ref.shape, dtype=ref.dtype)
    grads = torch.autograd.grad(y, leaves, g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, leaves, g, allow_unused=True)
    for gr, rg, t in zip(grads, ref_grads, leaves):
        if rg is None:
            assert gr is None or torch.equal(gr, torch.zeros_like(gr))
            continue
        assert gr.shape == t.shape and gr.dtype == t.dtype
        assert torch.equal(gr, rg), "an empty batch contributes exactly zero to every gradient"


# ----------------------------------------------------------------------------- inference mode
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS_FOR_WRITES)
def test_inference_mode(backend, op):
    fn, inputs = _all_ops_inputs(op, BF16, f"inference/{op}")
    with torch.no_grad():
        expected = fn(backend, *inputs)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with torch.no_grad():  # inputs that require grad, nothing recorded
        y0 = fn(backend, *leaves)
    assert y0.grad_fn is None and not y0.requires_grad and same_or_both_nan(y0, expected)
    with torch.inference_mode():
        y = fn(backend, *leaves)
        z = fn(backend, *[t.detach() for t in inputs])
    assert y.is_inference() and not y.requires_grad
    assert same_or_both_nan(y, expected) and same_or_both_nan(z, expected)
    # inference tensors as inputs, outside inference mode (no grad needed)
    with torch.inference_mode():
        inf_inputs = [t.clone() for t in inputs]
    y2 = fn(backend, *inf_inputs)
    assert same_or_both_nan(y2, expected)
