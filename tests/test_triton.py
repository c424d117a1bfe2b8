"""Triton-backend checks: kernels against the references (forward and every gradient), the
exact contracts, the interpreter-safe math, registration (opcheck, torch.compile), and the
paths a small shared matrix would not reach (multi-block partial sums, by-value scalars,
64-bit offsets, >3-dim fallback, large-C gate network).

On a CPU-only machine these run under Triton's interpreter (TRITON_INTERPRET=1), with small
shapes; on a CUDA machine they run on the GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels import reference as R

triton = pytest.importorskip("triton", reason="Triton is not installed")

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip(
        "the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors",
        allow_module_level=True,
    )

if "triton" not in kk.available_backends(DEVICE):
    from kasmina_kernels.backends import backend_status

    pytest.skip(f"triton backend unavailable: {backend_status('triton', DEVICE)}",
                allow_module_level=True)

import triton.language as tl  # noqa: E402

from kasmina_kernels.triton import _common as C  # noqa: E402
from kasmina_kernels.triton import elementwise as E  # noqa: E402
from kasmina_kernels.triton import gate as G  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# The interpreter's numpy arithmetic warns on inf/nan lanes that the kernels then discard.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
REDUCED = DEVICE == "cpu"  # the interpreter runs a reduced matrix; a GPU runs all of it
RTOL = {torch.float32: 1.3e-6, torch.float64: 1e-7, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}


# ---------------------------------------------------------------------------- helpers
def ulp_at(dtype, scale):
    if not math.isfinite(scale) or scale == 0:
        scale = 1.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(scale))


def scale_of(t):
    t = t.detach().double()
    fin = t[torch.isfinite(t)]
    return fin.abs().max().item() if fin.numel() else 1.0


def assert_elementwise(kern, ref, what="", oracle=None):
    """Rule 1 of docs/semantics.md#equivalence: dtype's default rtol, atol = one ulp at the output's scale. Where eager
    itself strays (bf16 MULTIPLY rounds tanh to 1 and 1 - t^2 to 0; the kernel keeps float32
    inside), rule 5.2 against the float64 oracle decides."""
    assert kern.dtype == ref.dtype, f"{what}: dtype {kern.dtype} != {ref.dtype}"
    assert kern.shape == ref.shape, f"{what}: shape {kern.shape} != {ref.shape}"
    try:
        torch.testing.assert_close(
            kern, ref, rtol=RTOL[ref.dtype], atol=ulp_at(ref.dtype, scale_of(ref)), equal_nan=True,
            msg=lambda m: f"{what}: {m}",
        )
    except AssertionError:
        if oracle is None:
            raise
        assert torch.equal(torch.isnan(kern), torch.isnan(ref)), what
        fin = torch.isfinite(ref)
        assert_reduction(torch.where(fin, kern, 0), torch.where(fin, ref, 0),
                         torch.where(fin, oracle.double(), 0), what + " (vs float64 oracle)")


def assert_reduction(kern, ref, oracle, what=""):
    """rule 2 of docs/semantics.md#equivalence: error against the float64 oracle <= 2 x eager's + 1 ulp at scale."""
    assert kern.dtype == ref.dtype and kern.shape == ref.shape, what
    o = oracle.detach().double()
    k_err = (kern.detach().double() - o).abs().max().item() if o.numel() else 0.0
    e_err = (ref.detach().double() - o).abs().max().item() if o.numel() else 0.0
    # float64 results (eager may *be* the oracle): float64's default tolerance as the floor
    floor = 1e-7 * scale_of(o) if ref.dtype == torch.float64 else ulp_at(ref.dtype, scale_of(o))
    tol = 2 * e_err + floor
    assert k_err <= tol, f"{what}: kernel error {k_err:.3g} > {tol:.3g} (eager {e_err:.3g})"


def rand(shape, dtype, gen, *, cl=False, scale=1.0):
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if cl:
        t = t.to(memory_format=torch.channels_last)
    return t.to(DEVICE)


def per_sample(shape, dtype, gen, lo=-0.2, hi=1.2):
    ws = (shape[0],) + (1,) * (len(shape) - 1)
    return (torch.rand(ws, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype).to(DEVICE)


def scalar(value, dtype=torch.float32, device=None):
    return torch.tensor(value, dtype=dtype, device=DEVICE if device is None else device)


def run_case(fn_name, args, grad_idx, *, extra=None, gen=None, grad_kw=()):
    """Run op through the public API with backend='triton' and 'reference', and the float64
    oracle; compare the output and the gradient of every input in grad_idx (positional) and
    grad_kw (keyword tensors such as seed_input)."""
    extra = extra or {}
    fn = getattr(kk, fn_name)
    ref_fn = getattr(R, fn_name)

    def prep(a, cast, want):
        if not isinstance(a, torch.Tensor):
            return a
        a = a.detach().clone(memory_format=torch.preserve_format)
        if cast is not None and a.is_floating_point():
            a = a.to(cast)
        return a.requires_grad_() if want else a

    def leafs(cast=None):
        pos = [prep(a, cast, k in grad_idx) for k, a in enumerate(args)]
        kw = {k: prep(v, cast, k in grad_kw) for k, v in extra.items()}
        return pos, kw

    # The contract rounds a seed to the host's dtype before anything else: the float64
    # oracle starts from the rounded seed (else kernel and eager share that rounding error
    # and rule 5.2 compares noise).
    host_dtype = args[0].dtype if fn_name.startswith(("blend_", "ste_")) else None
    if host_dtype is not None:
        args = list(args)
        oargs = [a.to(host_dtype) if k == 1 and a.dtype != host_dtype else a for k, a in enumerate(args)]
        oextra = {k: (v.to(host_dtype) if isinstance(v, torch.Tensor) and v.dtype != host_dtype else v)
                  for k, v in extra.items()}
    else:
        oargs, oextra = args, extra

    def oracle_leafs():
        pos = [prep(a, torch.float64, k in grad_idx) for k, a in enumerate(oargs)]
        kw = {k: prep(v, torch.float64, k in grad_kw) for k, v in oextra.items()}
        return pos, kw

    (kt, kkw), (rt, rkw), (ot, okw) = leafs(), leafs(), oracle_leafs()
    y = fn(*kt, backend="triton", **kkw)
    yr = ref_fn(*rt, **rkw)
    yo = ref_fn(*ot, **okw)
    assert y.dtype == yr.dtype and y.shape == yr.shape, (fn_name, y.dtype, yr.dtype)
    if y.numel() > 1:  # same memory format (strides of size-1 dims carry no meaning)
        ks = [st for st, n in zip(y.stride(), y.shape) if n != 1]
        rs = [st for st, n in zip(yr.stride(), yr.shape) if n != 1]
        assert ks == rs, (fn_name, y.stride(), yr.stride())
    assert_elementwise(y.detach(), yr.detach(), f"{fn_name} forward", yo.detach())
    if not grad_idx and not grad_kw:
        return y
    g = torch.randn(yr.shape, generator=gen, dtype=torch.float64).to(yr.dtype).to(DEVICE)
    y.backward(g)
    yr.backward(g)
    yo.backward(g.double())
    pairs = [(f"arg{k}", kt[k], rt[k], ot[k]) for k in grad_idx]
    pairs += [(k, kkw[k], rkw[k], okw[k]) for k in grad_kw]
    for name, a_k, a_r, a_o in pairs:
        gk, gr, go = a_k.grad, a_r.grad, a_o.grad
        assert gk is not None, f"{fn_name}: no gradient for {name}"
        assert gr is not None
        assert gk.dtype == a_k.dtype and gk.shape == a_k.shape, (fn_name, name)
        if gk.numel() < y.numel() or fn_name == "gate_effective_alpha":
            assert_reduction(gk, gr, go, f"{fn_name} d{name}")  # alpha/gate/weights
        else:
            assert_elementwise(gk, gr, f"{fn_name} d{name}", go)
    return y


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------- interpreter-safe math
@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < n
    tl.store(y_ptr + j, C.tanh(tl.load(x_ptr + j, mask=m, other=0), INTERPRET), mask=m)


@triton.jit
def _round_kernel(x_ptr, y_ptr, z_ptr, n, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < n
    x = tl.load(x_ptr + j, mask=m, other=0)
    C.store(y_ptr + j, x, m, INTERPRET)  # float32 -> bfloat16 store
    tl.store(z_ptr + j, C.round_to(x, tl.bfloat16, INTERPRET), mask=m)


def _special_values(dtype):
    v = [0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.05, 0.0499999, 0.624, 0.625, 0.626, 1.0, 3.0, 9.0,
         9.1, 19.9, 20.0, 25.0, 100.0, 1e30, float("inf"), -float("inf"), float("nan")]
    return torch.tensor(v + [-x for x in v], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_accuracy(dtype):
    x = torch.cat([torch.linspace(-12, 12, 20001, dtype=dtype),
                   torch.logspace(-12, 1.3, 4001, dtype=dtype), _special_values(dtype)]).to(DEVICE)
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 8192),)](x, y, x.numel(), BLOCK=8192, INTERPRET=C.INTERPRET)
    exact = torch.tanh(x.double())
    err = (y.double() - exact).abs()
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(y), torch.isnan(exact))
    if dtype == torch.float32:
        assert err[finite].max().item() <= 1e-6
        rel = (err / exact.abs().clamp_min(1e-30))[finite & (exact != 0)]
        assert rel.max().item() <= 5e-7  # a few float32 ulps, tiny arguments included
    else:
        rel = (err / exact.abs().clamp_min(1e-300))[finite & (exact != 0)]
        assert rel.max().item() <= 1e-14
    # signed zero and the exact tanh(0) = 0 that MULTIPLY's "s == r gives h" relies on
    zeros = torch.tensor([0.0, -0.0], dtype=dtype, device=DEVICE)
    yz = torch.empty_like(zeros)
    _tanh_kernel[(1,)](zeros, yz, 2, BLOCK=16, INTERPRET=C.INTERPRET)
    assert yz.tolist() == [0.0, 0.0] and torch.signbit(yz).tolist() == [False, True]


def test_bf16_rounding_is_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(20000, generator=gen) * torch.logspace(-40, 38, 20000),
        _special_values(torch.float32),
        torch.tensor([1.00390625, 1.01171875, 1.0 + 2**-8 + 2**-20, 3.3895314e38, 1e-40]),
    ]).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    z = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 8192),)](x, y, z, x.numel(), INTERPRET=C.INTERPRET, BLOCK=8192)
    ref = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == ref.view(torch.int16)) | (y.isnan() & ref.isnan())
    assert bool(same.all())
    zr = ref.float()
    assert bool(((z == zr) | (z.isnan() & zr.isnan())).all())


# ---------------------------------------------------------------------------- equivalence
SHAPE = (3, 5, 4, 7)  # primes and non-powers of two; 140 elements per sample


def _alpha(form, shape, dtype, gen):
    if form == "scalar":
        return scalar(0.37)
    if form == "per_sample":
        return per_sample(shape, torch.float32, gen)
    if form == "scalar_bf16":
        return scalar(0.6, torch.bfloat16)
    if form == "scalar_int":
        return scalar(1, torch.int64)
    if form == "scalar_cpu":
        return torch.tensor(0.55)
    if form == "channel":  # any other broadcastable shape: slower path, still correct
        return (torch.rand((1, shape[1], 1, 1), generator=gen, dtype=torch.float64) * 1.4 - 0.2).float().to(DEVICE)
    raise AssertionError(form)


def _grad_idx(form, n_features=2):
    idx = list(range(n_features))
    if form not in ("scalar_int",):
        idx.append(2)
    return idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["scalar", "per_sample", "scalar_bf16", "scalar_int", "channel"])
@pytest.mark.parametrize("op", ["blend_add", "blend_multiply", "blend_with_isolation"])
def test_blend_matches_reference(op, form, dtype, gen):
    if REDUCED and form in ("scalar_bf16", "scalar_int", "channel") and dtype in (torch.float16, torch.float64):
        pytest.skip("interpreter: alpha-dtype variants run at float32/bfloat16 only (full matrix on GPU)")
    h = rand(SHAPE, dtype, gen)
    s = rand(SHAPE, dtype, gen)
    alpha = _alpha(form, SHAPE, dtype, gen)
    run_case(op, (h, s, alpha), _grad_idx(form), gen=gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["scalar/per_sample", "per_sample/per_sample", "scalar_bf16/per_sample_bf16",
                                  "per_sample/channel"])
def test_gate_matches_reference(form, dtype, gen):
    if REDUCED and form != "scalar/per_sample" and dtype in (torch.float16, torch.float64):
        pytest.skip("interpreter: weight-form variants run at float32/bfloat16 only (full matrix on GPU)")
    h = rand(SHAPE, dtype, gen)
    s = rand(SHAPE, dtype, gen)
    af, gf = form.split("/")
    alpha = _alpha(af.replace("_bf16", "") if af == "per_sample" else af, SHAPE, dtype, gen)
    if gf == "per_sample":
        gate = per_sample(SHAPE, torch.float32, gen)
    elif gf == "per_sample_bf16":
        gate = per_sample(SHAPE, torch.bfloat16, gen)
    else:
        gate = _alpha("channel", SHAPE, dtype, gen)
    run_case("blend_gate", (h, s, alpha, gate), [0, 1, 2, 3], gen=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_and_mixed_dtypes(dtype, gen):
    """channels_last host with an NCHW seed (no copies), bf16 host with an fp32 seed."""
    h = rand(SHAPE, dtype, gen, cl=True)
    s = rand(SHAPE, torch.float32, gen)
    alpha = per_sample(SHAPE, torch.float32, gen)
    gate = per_sample(SHAPE, torch.float32, gen)
    for op, args, idx in (
        ("blend_add", (h, s, alpha), [0, 1, 2]),
        ("blend_multiply", (h, s, alpha), [0, 1, 2]),
        ("blend_gate", (h, s, alpha, gate), [0, 1, 2, 3]),
        ("ste_forward", (h, s), [0, 1]),
    ):
        y = run_case(op, args, idx, gen=gen)
        assert y.is_contiguous(memory_format=torch.channels_last), op


@pytest.mark.parametrize("tile", [32, 128])
def test_mixed_layout_tiles(tile, gen, monkeypatch):
    """The mixed-layout path with several tiles per sample and ragged edges (C = 13 and
    H*W = 35 are multiples of no tile side): every op, a channels_last host beside NCHW seeds
    and the reverse, an NCHW incoming gradient, scalar and per-sample weights."""
    _fresh_caches(monkeypatch)
    monkeypatch.setattr(E, "TILE_ELEMS", tile)
    shape = (3, 13, 5, 7)
    for h_cl in (True, False):
        h = rand(shape, torch.float32, gen, cl=h_cl)
        s = rand(shape, torch.float32, gen, cl=not h_cl)
        r = rand(shape, torch.float32, gen, cl=not h_cl)
        for alpha in (scalar(0.4), per_sample(shape, torch.float32, gen)):
            run_case("blend_add", (h, s, alpha), [0, 1, 2], gen=gen)
            run_case("blend_gate", (h, s, alpha, per_sample(shape, torch.float32, gen)), [0, 1, 2, 3], gen=gen)
            run_case("blend_multiply", (h, s, alpha), [0, 1, 2], extra={"seed_input": r},
                     grad_kw=("seed_input",), gen=gen)
        run_case("ste_forward", (h, s), [0, 1], gen=gen)
    tiled = [c for c in E._launch_cache.values() if c.tiled]
    assert tiled and all(c.grid[0] >= 3 * 4 for c in tiled)  # several tiles per sample
    assert not any(c.fallback for c in E._launch_cache.values())


def test_backward_reads_only_what_it_needs(gen, monkeypatch):
    """Esper's pattern (alpha without grad, seed_input without grad): the lerp backward reads
    only g, MULTIPLY writes no dr; with alpha's gradient wanted, h and s are read again."""
    _fresh_caches(monkeypatch)
    h = rand(SHAPE, torch.bfloat16, gen, cl=True).requires_grad_()
    s = rand(SHAPE, torch.bfloat16, gen).requires_grad_()
    r = rand(SHAPE, torch.bfloat16, gen)
    alpha = scalar(0.3, torch.bfloat16)
    gate = per_sample(SHAPE, torch.bfloat16, gen)
    for fn in (lambda: kk.blend_add(h, s, alpha, backend="triton"),
               lambda: kk.blend_gate(h, s, alpha, gate, backend="triton"),
               lambda: kk.blend_multiply(h, s, alpha, seed_input=r, backend="triton")):
        fn().backward(torch.ones(SHAPE, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last))
    bwd = {key[1]: cfg for key, cfg in E._launch_cache.items() if key[0]}
    assert all(cfg.tiled for cfg in bwd.values())
    for op in (E.OP_ADD, E.OP_GATE):
        kw = bwd[op].kw
        assert not kw["READ_HOST"] and not kw["READ_SEED"] and not kw["WEIGHT_GRAD"]
    kw = bwd[E.OP_MULTIPLY].kw
    assert kw["READ_HOST"] and kw["READ_SEED"] and kw["WRITE_DS"] and not kw["WRITE_DR"] and not kw["WEIGHT_GRAD"]
    _fresh_caches(monkeypatch)
    run_case("blend_gate", (h.detach(), s.detach(), alpha, gate), [0, 1, 3], gen=gen)
    (kw,) = [cfg.kw for key, cfg in E._launch_cache.items() if key[0]]
    assert kw["READ_HOST"] and kw["READ_SEED"] and kw["WEIGHT_GRAD"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiply_seed_input(dtype, gen):
    h = rand(SHAPE, dtype, gen, cl=True)
    s = rand(SHAPE, dtype, gen)
    r = rand(SHAPE, torch.float32 if dtype != torch.float32 else dtype, gen)
    alpha = per_sample(SHAPE, torch.float32, gen)
    run_case("blend_multiply", (h, s, alpha), [0, 1, 2], extra={"seed_input": r}, grad_kw=("seed_input",),
             gen=gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ste_matches_reference(dtype, gen):
    h = rand(SHAPE, dtype, gen)
    s = rand(SHAPE, dtype, gen)
    s[0, 0, 0, 0] = float("nan")
    s[1, 2, 0, 0] = float("inf")
    run_case("ste_forward", (h, s), [0, 1], gen=gen)


@pytest.mark.parametrize("mdtype,form", [(torch.float32, "scalar"), (torch.float32, "per_sample"),
                                          (torch.bfloat16, "scalar"), (torch.bfloat16, "per_sample"),
                                          (torch.float16, "scalar"), (torch.float64, "per_sample")])
def test_valve_matches_reference(mdtype, form, gen):
    m = rand(SHAPE, mdtype, gen, scale=1.5)
    alpha = _alpha(form, SHAPE, mdtype, gen)
    run_case("multiply_valve_multiplier", (alpha, m), [0, 1], gen=gen)


@pytest.mark.parametrize("adtype,gdtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                            (torch.bfloat16, torch.float32), (torch.float64, torch.float32)])
def test_gate_effective_alpha_matches_reference(adtype, gdtype, gen):
    alpha = (torch.rand((), generator=gen, dtype=torch.float64) * 1.2).to(adtype).to(DEVICE)
    gate = per_sample((6, 1, 1, 1), gdtype, gen)
    run_case("gate_effective_alpha", (alpha, gate), [0, 1], gen=gen)
    alpha = per_sample((6, 1, 1, 1), adtype, gen)
    run_case("gate_effective_alpha", (alpha, gate), [0, 1], gen=gen)


@pytest.mark.parametrize("shape", [(7,), (5, 9), (2, 3, 4, 5, 6)])
def test_other_ranks(shape, gen):
    h = rand(shape, torch.float32, gen)
    s = rand(shape, torch.float32, gen)
    run_case("blend_add", (h, s, per_sample(shape, torch.float32, gen)), [0, 1, 2], gen=gen)
    run_case("blend_multiply", (h, s, scalar(0.8)), [0, 1, 2], gen=gen)


def test_permuted_five_dim_fallback(gen):
    """Operands whose strides share no more than 4 coalesced dims take the copy fallback."""
    h = rand((2, 3, 4, 5, 6), torch.float32, gen)
    # storage order d1, d3, d0, d4, d2: no two neighbouring dims of h are neighbours in s
    s = rand((3, 5, 2, 6, 4), torch.float32, gen).permute(2, 0, 4, 1, 3)
    assert s.shape == h.shape
    assert C.plan(h.shape, h.stride(), (h.stride(), s.stride()), False) is None
    run_case("blend_gate", (h, s, per_sample(h.shape, torch.float32, gen),
                            per_sample(h.shape, torch.float32, gen)), [0, 1, 2, 3], gen=gen)
    run_case("blend_multiply", (h, s, scalar(0.3)), [0, 1, 2], gen=gen)


def test_non_dense_views(gen):
    base = rand((3, 10, 4, 14), torch.float32, gen)
    h = base[:, ::2, :, ::2]
    s = rand((3, 5, 4, 7), torch.float32, gen, cl=True)
    run_case("blend_add", (h, s, per_sample(h.shape, torch.float32, gen)), [0, 1, 2], gen=gen)
    run_case("blend_multiply", (s, h, scalar(0.7)), [0, 1, 2], gen=gen)


# ---------------------------------------------------------------------------- exact contracts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_contracts(dtype, gen):
    h = rand(SHAPE, dtype, gen, cl=True)
    s = rand(SHAPE, torch.float32, gen)
    zero = scalar(0.0)
    zero_ps = torch.zeros((SHAPE[0], 1, 1, 1), device=DEVICE)
    for alpha in (zero, zero_ps):
        assert torch.equal(kk.blend_add(h, s, alpha, backend="triton"), h)
        assert torch.equal(kk.blend_multiply(h, s, alpha, backend="triton"), h)
        assert torch.equal(kk.blend_gate(h, s, alpha, per_sample(SHAPE, torch.float32, gen),
                                         backend="triton"), h)
    assert torch.equal(kk.blend_gate(h, s, per_sample(SHAPE, torch.float32, gen), zero_ps,
                                     backend="triton"), h)
    r = s.to(dtype)
    assert torch.equal(kk.blend_multiply(h, r, scalar(0.9), seed_input=r, backend="triton"), h)
    assert torch.equal(kk.blend_multiply(h, h, scalar(0.9), backend="triton"), h)
    assert torch.equal(kk.ste_forward(h, s, backend="triton"), h)
    # NaN/Inf: where the reference puts them, also at alpha = 0
    s2 = s.clone()
    s2[0, 1, 2, 3] = float("nan")
    s2[2, 4, 1, 0] = float("inf")
    h2 = h.clone()
    h2[1, 0, 0, 0] = float("-inf")
    for alpha in (zero, scalar(0.5), scalar(1.0)):
        for op in ("blend_add", "blend_multiply"):
            y = getattr(kk, op)(h2, s2, alpha, backend="triton")
            yr = getattr(R, op)(h2, s2, alpha)
            assert torch.equal(torch.isnan(y), torch.isnan(yr)), (op, alpha)
            assert torch.equal(torch.isinf(y), torch.isinf(yr)), (op, alpha)
            fin = torch.isfinite(yr)
            assert_elementwise(torch.where(fin, y, 0), torch.where(fin, yr, 0), op)


def test_no_input_written_and_only_inputs_saved(gen):
    h = rand(SHAPE, torch.bfloat16, gen, cl=True).requires_grad_()
    s = rand(SHAPE, torch.float32, gen).requires_grad_()
    alpha = per_sample(SHAPE, torch.float32, gen).requires_grad_()
    gate = per_sample(SHAPE, torch.float32, gen).requires_grad_()
    inputs = (h, s, alpha, gate)
    before = [t.detach().clone() for t in inputs]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = kk.blend_gate(h, s, alpha, gate, backend="triton")
        y2 = kk.blend_multiply(h, s, alpha, backend="triton")
    (y.float().sum() + y2.float().sum()).backward()
    ptrs = {t.data_ptr() for t in inputs}
    assert saved and all(t.data_ptr() in ptrs for t in saved)
    for t, b in zip(inputs, before):
        assert torch.equal(t.detach(), b)


# ---------------------------------------------------------------------------- internal paths
def _fresh_caches(monkeypatch):
    """Launch configurations are cached per shape: start from empty caches (and leave the
    real ones untouched) when a test changes a planning knob."""
    monkeypatch.setattr(C, "_plan_cache", {})
    monkeypatch.setattr(E, "_launch_cache", {})
    monkeypatch.setattr(G, "_cache", {})


def test_multi_block_partials_and_determinism(gen, monkeypatch):
    """Many programs per sample: per-program partials, then the fixed-order reduction."""
    _fresh_caches(monkeypatch)
    monkeypatch.setattr(C, "MAX_BLOCK", 64)
    shape = (3, 6, 9, 11)
    h = rand(shape, torch.float32, gen)
    s = rand(shape, torch.float32, gen)
    for alpha in (scalar(0.4), per_sample(shape, torch.float32, gen)):
        run_case("blend_add", (h, s, alpha), [0, 1, 2], gen=gen)
        run_case("blend_multiply", (h, s, alpha), [0, 1, 2], gen=gen)
        run_case("blend_gate", (h, s, alpha, per_sample(shape, torch.float32, gen)), [0, 1, 2, 3], gen=gen)
    a = per_sample(shape, torch.float32, gen).requires_grad_()
    grads = []
    for _ in range(2):
        a.grad = None
        kk.blend_multiply(h, s, a, backend="triton").backward(torch.ones_like(h))
        grads.append(a.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_small_samples_take_the_element_path(gen):
    shape = (6, 3, 2, 2)  # 12 elements per sample < MIN_SPLIT_INNER
    h = rand(shape, torch.float32, gen)
    s = rand(shape, torch.float32, gen)
    run_case("blend_gate", (h, s, per_sample(shape, torch.float32, gen),
                            per_sample(shape, torch.float32, gen)), [0, 1, 2, 3], gen=gen)
    run_case("multiply_valve_multiplier", (per_sample(shape, torch.float32, gen), h), [0, 1], gen=gen)


def test_value_mode_scalars(gen, monkeypatch):
    """The by-value path a 0-dim CPU alpha beside CUDA features takes."""
    _fresh_caches(monkeypatch)
    monkeypatch.setattr(C, "FORCE_VALUE_MODE", True)
    h = rand(SHAPE, torch.bfloat16, gen)
    s = rand(SHAPE, torch.float32, gen)
    cpu_alpha = torch.tensor(0.45)
    run_case("blend_add", (h, s, cpu_alpha), [0, 1, 2], gen=gen)
    run_case("blend_multiply", (h, s, torch.tensor(0.7, dtype=torch.bfloat16)), [0, 1, 2], gen=gen)
    run_case("blend_gate", (h, s, cpu_alpha, per_sample(SHAPE, torch.float32, gen)), [0, 1, 2, 3], gen=gen)
    run_case("gate_effective_alpha", (cpu_alpha, per_sample(SHAPE, torch.float32, gen)), [0, 1], gen=gen)


def test_64bit_offsets_path(gen, monkeypatch):
    """The int64 offset arithmetic (switched on past 2^31 elements), forced on small tensors."""
    _fresh_caches(monkeypatch)
    monkeypatch.setattr(C, "I32_SAFE", 0)
    h = rand(SHAPE, torch.float32, gen, cl=True)
    s = rand(SHAPE, torch.float32, gen)
    assert C.plan(h.shape, h.stride(), (h.stride(), s.stride()), False).i64
    run_case("blend_gate", (h, s, scalar(0.8), per_sample(SHAPE, torch.float32, gen)), [0, 1, 2, 3], gen=gen)
    run_case("blend_multiply", (h, s, per_sample(SHAPE, torch.float32, gen)), [0, 1, 2], gen=gen)
    run_case("gate_network", (h,) + _gate_params(SHAPE[1], torch.float32, gen), [0, 1, 2, 3, 4],
             extra={"topology": "cnn"}, gen=gen)
    assert all(cfg.kw["I64"] for cfg in E._launch_cache.values() if not cfg.fallback)
    assert all(cfg["kw"]["I64"] for key, cfg in G._cache.items() if key[0] == "gate")


def test_plan_switches_to_64bit_for_huge_tensors():
    shape = (2, 1024, 1024, 1025)
    st = torch.empty(shape, device="meta").stride()
    assert C.plan(shape, st, (st,), False).i64
    small = (2, 64, 32, 32)
    st = torch.empty(small, device="meta").stride()
    assert not C.plan(small, st, (st,), False).i64


def test_zero_size_batch(gen):
    shape = (0, 5, 4, 7)
    h = rand(shape, torch.float32, gen).requires_grad_()
    s = rand(shape, torch.float32, gen).requires_grad_()
    alpha = torch.rand((0, 1, 1, 1), device=DEVICE).requires_grad_()
    a0 = scalar(0.3).requires_grad_()
    gate = torch.rand((0, 1, 1, 1), device=DEVICE).requires_grad_()
    for y in (kk.blend_add(h, s, alpha, backend="triton"), kk.blend_multiply(h, s, a0, backend="triton"),
              kk.blend_gate(h, s, a0, gate, backend="triton"), kk.ste_forward(h, s, backend="triton")):
        assert y.shape == shape
        y.sum().backward()
    assert a0.grad.item() == 0.0 and alpha.grad.shape == alpha.shape
    x = rand(shape, torch.float32, gen).requires_grad_()
    params = [p.requires_grad_() for p in _gate_params(5, torch.float32, gen)]
    g = kk.gate_network(x, *params, topology="cnn", backend="triton")
    assert g.shape == (0, 1, 1, 1)
    g.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in params)
    assert kk.gated_pool(x, "cnn", backend="triton").shape == (0, 5)


def test_aliasing_and_inference_mode(gen):
    h = rand(SHAPE, torch.float32, gen)
    alpha = per_sample(SHAPE, torch.float32, gen)
    run_case("blend_add", (h, h, alpha), [0, 2], gen=gen)
    hr = h.clone().requires_grad_()
    hk = h.clone().requires_grad_()
    y = kk.blend_multiply(hk, hk, alpha, seed_input=hk, backend="triton")
    yr = R.blend_multiply(hr, hr, alpha, seed_input=hr)
    assert_elementwise(y.detach(), yr.detach(), "aliased multiply")
    g = torch.randn_like(h)
    y.backward(g)
    yr.backward(g)
    assert_elementwise(hk.grad, hr.grad, "aliased multiply dh")
    with torch.inference_mode():
        y = kk.blend_gate(h, h * 2, alpha, alpha, backend="triton")
        assert_elementwise(y, R.blend_gate(h, h * 2, alpha, alpha), "inference mode")


class _Counting:
    """A kernel that logs each launch: its name, then ".backward" and ".tiled" where those
    constexprs are set."""

    def __init__(self, kernel, log, name):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append(".".join([self.name] + [tag for tag in ("backward", "tiled") if kw.get(tag.upper())]))
            return self.kernel[grid](*args, **kw)

        return launch


def test_launch_counts(gen, monkeypatch):
    """One launch per forward; backward = one pass (+ one reduction launch for alpha/gate);
    the gate network at C = 512: one launch forward, two backward (pass + weight grads)."""
    log = []
    for mod, names in ((E, ["_elementwise_kernel", "_weight_grad_kernel"]),
                       (G, ["_pool_kernel", "_pool_backward_kernel", "_gate_network_kernel",
                            "_gate_weight_grad_kernel"])):
        for name in names:
            monkeypatch.setattr(mod, name, _Counting(getattr(mod, name), log, name))
    h = rand(SHAPE, torch.bfloat16, gen, cl=True).requires_grad_()
    s = rand(SHAPE, torch.float32, gen).requires_grad_()
    a = per_sample(SHAPE, torch.float32, gen).requires_grad_()
    g = per_sample(SHAPE, torch.float32, gen).requires_grad_()
    # a channels_last host beside an NCHW seed: the mixed-layout (tiled) iteration
    y = kk.blend_gate(h, s, a, g, backend="triton")
    assert log == ["_elementwise_kernel.tiled"]
    y.backward(torch.ones_like(y))
    assert log[1:] == ["_elementwise_kernel.backward.tiled", "_weight_grad_kernel"]
    log.clear()
    kk.blend_multiply(h.detach(), s.detach(), a.detach(), backend="triton").sum()
    assert log == ["_elementwise_kernel.tiled"]
    log.clear()
    y = kk.blend_add(h, s.detach().to(torch.bfloat16, memory_format=torch.channels_last), a, backend="triton")
    assert log == ["_elementwise_kernel"]
    y.backward(torch.ones_like(y))
    assert log[1:] == ["_elementwise_kernel.backward", "_weight_grad_kernel"]
    log.clear()
    x = rand((2, 512, 2, 2), torch.float32, gen, cl=True).requires_grad_()
    params = [p.requires_grad_() for p in _gate_params(512, torch.float32, gen)]
    out = kk.gate_network(x, *params, topology="cnn", backend="triton")
    assert log == ["_gate_network_kernel"]
    out.sum().backward()
    assert log[1:] == ["_gate_network_kernel.backward", "_gate_weight_grad_kernel"]


# ---------------------------------------------------------------------------- pooling and gate network
def _gate_params(channels, dtype, gen):
    hid = R.gate_hidden_size(channels)
    mk = lambda *s: (torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(s[-1])).to(dtype).to(DEVICE)  # noqa: E731
    return mk(hid, channels), mk(hid) * 0.1, mk(1, hid), mk(1) * 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transformer"])
def test_gated_pool_and_gate_network(layout, dtype, gen):
    if layout == "transformer":
        x = rand((3, 10, 12), dtype, gen)
        topo, channels = "transformer", 12
    else:
        x = rand((3, 12, 5, 6), dtype, gen, cl=layout == "channels_last")
        topo, channels = "cnn", 12
    run_case("gated_pool", (x, topo), [0], gen=gen)
    run_case("gate_network", (x,) + _gate_params(channels, dtype, gen), [0, 1, 2, 3, 4],
             extra={"topology": topo}, gen=gen)


def test_gate_network_large_channels(gen):
    """C > FUSED_MAX_C: pooling in its own launch, then the MLP; dx through the pool backward."""
    x = rand((2, G.FUSED_MAX_C + 8, 2, 3), torch.float32, gen, cl=True)
    run_case("gate_network", (x,) + _gate_params(x.shape[1], torch.float32, gen), [0, 1, 2, 3, 4],
             extra={"topology": "cnn"}, gen=gen)


@pytest.mark.parametrize("wanted", [(False, True, True, True), (True, False, True, False), (False, False, False, True)])
def test_gate_network_some_weight_grads(wanted, gen):
    """Only some weights want a gradient: the others get no buffer, and nothing is written for
    them (an unwanted dW1 once landed in the scratch buffer, past its end)."""
    x = rand((2, 16, 3, 3), torch.float32, gen)
    grad_idx = [0] + [k + 1 for k, w in enumerate(wanted) if w]
    run_case("gate_network", (x,) + _gate_params(16, torch.float32, gen), grad_idx, extra={"topology": "cnn"},
             gen=gen)


def test_pool_backward_grid(gen, monkeypatch):
    """The pool backward runs one program per (sample, channel block, position block) on a
    1-D grid (a grid's second and third dimensions stop at 65,535). Small tiles give many
    blocks of each kind, each of which must land where it belongs; at the GPU's tile size, a
    1500x1500 channels_last image of 128 channels (70,313 position blocks) fits CUDA's grid."""
    _fresh_caches(monkeypatch)
    monkeypatch.setattr(G, "TILE", 64)
    for cl in (True, False):
        run_case("gated_pool", (rand((3, 200, 9, 7), torch.float32, gen, cl=cl), "cnn"), [0], gen=gen)
    _fresh_caches(monkeypatch)
    monkeypatch.setattr(G, "TILE", 4096)
    shape = (1, 128, 1500, 1500)
    strides = torch.empty(shape, device="meta").contiguous(memory_format=torch.channels_last).stride()
    grid, _, _ = G._pool_cfg(shape, strides, torch.float32, "cnn", True, (128, 1))
    assert math.prod(grid) >= 70_313 and grid[0] < 2**31 and all(d <= 65_535 for d in grid[1:]), grid


def test_pool_odd_strides(gen):
    x = rand((2, 6, 8, 10), torch.float32, gen)[:, ::2, 1:7, ::3]  # non-dense, H*W not flat
    run_case("gated_pool", (x, "cnn"), [0], gen=gen)
    run_case("gate_network", (x,) + _gate_params(3, torch.float32, gen), [0, 1, 2, 3, 4],
             extra={"topology": "cnn"}, gen=gen)
    empty_hw = rand((2, 3, 0, 4), torch.float32, gen)
    assert torch.isnan(kk.gated_pool(empty_hw, "cnn", backend="triton")).all()


# ---------------------------------------------------------------------------- registration
def _op_samples(gen):
    h = rand(SHAPE, torch.float32, gen, cl=True)
    s = rand(SHAPE, torch.float32, gen)
    hb = rand(SHAPE, torch.bfloat16, gen)
    a = per_sample(SHAPE, torch.float32, gen)
    g = per_sample(SHAPE, torch.float32, gen)
    a0 = scalar(0.4)
    x = rand((2, 8, 3, 5), torch.float32, gen)
    params = _gate_params(8, torch.float32, gen)
    ops = torch.ops.kasmina
    return [
        (ops.triton_blend_add.default, (h, s, a)),
        (ops.triton_blend_add.default, (hb, s, a0)),
        (ops.triton_blend_gate.default, (h, s, a0, g)),
        (ops.triton_blend_multiply.default, (h, s, a, None)),
        (ops.triton_blend_multiply.default, (hb, s, a0, s)),
        (ops.triton_ste_forward.default, (h, s)),
        (ops.triton_multiply_valve_multiplier.default, (a0, s)),
        (ops.triton_gate_effective_alpha.default, (a0, g)),
        (ops.triton_gated_pool.default, (x, "cnn")),
        (ops.triton_gate_network.default, (x,) + params + ("cnn",)),
    ]


def test_opcheck(gen):
    for op, args in _op_samples(gen):
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
        torch.library.opcheck(op, args)


def test_opcheck_backward_ops(gen):
    ops = torch.ops.kasmina
    h = rand(SHAPE, torch.bfloat16, gen, cl=True)
    s = rand(SHAPE, torch.float32, gen)
    gy = rand(SHAPE, torch.bfloat16, gen)
    a = per_sample(SHAPE, torch.float32, gen)
    g = per_sample(SHAPE, torch.float32, gen)
    a0 = scalar(0.4)
    x = rand((2, 8, 3, 5), torch.float32, gen, cl=True)
    params = _gate_params(8, torch.float32, gen)
    cases = [
        (ops.triton_blend_add_backward.default, (gy, h, s, a, True)),
        (ops.triton_blend_add_backward.default, (gy, h, s, a0, False)),
        (ops.triton_blend_gate_backward.default, (gy, h, s, a0, g, True, True)),
        (ops.triton_blend_gate_backward.default, (gy, h, s, a0, g, False, True)),
        (ops.triton_blend_multiply_backward.default, (gy, h, s, a, None, True, False)),
        (ops.triton_blend_multiply_backward.default, (gy, h, s, a0, s, False, True)),
        (ops.triton_blend_multiply_backward.default, (gy, h, s, a0, s, True, False)),
        (ops.triton_multiply_valve_multiplier_backward.default, (s, a, s, True)),
        (ops.triton_multiply_valve_multiplier_backward.default, (s, a, s, False)),
        (ops.triton_gate_effective_alpha_backward.default, (g, a0, g, True, True)),
        (ops.triton_gate_effective_alpha_backward.default, (g, a0, g, False, True)),
        (ops.triton_gated_pool_backward.default, (rand((2, 8), torch.float32, gen), x, "cnn")),
        (ops.triton_gate_network_backward.default, (rand((2, 1, 1, 1), torch.float32, gen), x) + params + ("cnn",)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_same_functions_as_native():
    """Every op of the table, called as native's functions are: the inputs in schema order,
    the keyword-only ones (`Op.kwonly`) by keyword, with native's signatures where those are
    Python functions (native's other functions are OpOverloads, which have no signature)."""
    import inspect

    import kasmina_kernels.triton as T
    from kasmina_kernels.optable import OPS

    try:
        import kasmina_kernels.native as N
    except ImportError:
        N = None
    for op in OPS:
        fn = getattr(T, op.name)
        positional = [n for n in op.inputs if n not in op.kwonly]
        inspect.signature(fn).bind(*positional, **{n: n for n in op.kwonly})
        if op.kwonly:
            params = inspect.signature(fn).parameters.values()
            assert [p.name for p in params if p.kind is p.KEYWORD_ONLY] == list(op.kwonly), op.name
            if N is not None:
                assert inspect.signature(fn) == inspect.signature(getattr(N, op.name)), op.name


_COMPILE_CASES = {
    "blend_add": lambda h, s, a, g, x, p: kk.blend_add(h, s, a, backend="triton"),
    "blend_with_isolation": lambda h, s, a, g, x, p: kk.blend_with_isolation(h, s, a, backend="triton"),
    "blend_gate": lambda h, s, a, g, x, p: kk.blend_gate(h, s, a, g, backend="triton"),
    "blend_multiply": lambda h, s, a, g, x, p: kk.blend_multiply(h, s, a, backend="triton"),
    "blend_multiply_r": lambda h, s, a, g, x, p: kk.blend_multiply(h, s, a, seed_input=s * 0.5, backend="triton"),
    "ste_forward": lambda h, s, a, g, x, p: kk.ste_forward(h, s, backend="triton"),
    "multiply_valve_multiplier": lambda h, s, a, g, x, p: kk.multiply_valve_multiplier(a, s, backend="triton"),
    "gate_effective_alpha": lambda h, s, a, g, x, p: kk.gate_effective_alpha(a, g, backend="triton"),
    "gated_pool": lambda h, s, a, g, x, p: kk.gated_pool(x, "cnn", backend="triton"),
    "gate_network": lambda h, s, a, g, x, p: kk.gate_network(x, *p, topology="cnn", backend="triton"),
}


@pytest.mark.parametrize("name", list(_COMPILE_CASES))
def test_compile_fullgraph(name, gen):
    """torch.compile(fullgraph=True) traces each op (forward and backward) with no break."""
    torch._dynamo.reset()
    fn = _COMPILE_CASES[name]
    inputs = [rand(SHAPE, torch.float32, gen, cl=True), rand(SHAPE, torch.float32, gen),
              per_sample(SHAPE, torch.float32, gen), per_sample(SHAPE, torch.float32, gen),
              rand((2, 8, 3, 5), torch.float32, gen)]
    params = list(_gate_params(8, torch.float32, gen))

    def leafs():
        return [t.detach().clone().requires_grad_() for t in inputs], \
               [t.detach().clone().requires_grad_() for t in params]

    (ti, tp), (ci, cp) = leafs(), leafs()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(*ti, tp)
    ye = fn(*ci, cp)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(y, ye, rtol=0, atol=0)
    y.sum().backward()
    ye.sum().backward()
    for a, b in zip(ti + tp, ci + cp):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------- devices
class _OnSecondGpu(torch.Tensor):
    """A CPU tensor that answers as one on cuda:1 would (for the device guard's questions)."""
    is_cuda = True
    device = torch.device("cuda", 1)

    def get_device(self):
        return 1


@pytest.mark.parametrize("current", [0, 1])
def test_kernels_launch_on_their_operands_device(current, monkeypatch):
    """Triton launches on the current CUDA device: the registered kernels make their operands'
    device current first (a 0-dim CPU alpha does not count), and leave it as it is when it is
    already theirs."""
    import kasmina_kernels.triton as T

    entered = []

    class _Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", _Guard)
    calls = []
    kernel = T._on_tensor_device(lambda *args: calls.append(list(entered)) or "out")
    alpha = torch.tensor(0.5)
    feature = torch.zeros(2).as_subclass(_OnSecondGpu)
    assert kernel(alpha, feature, 3) == "out"
    if current == 1:
        assert entered == [] and calls == [[]]
    else:
        assert calls == [[torch.device("cuda", 1)]] and entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    assert kernel(alpha, torch.zeros(2)) == "out" and entered == []  # CPU operands: no guard


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_second_gpu_match_the_reference():
    """Operands on cuda:1 while cuda:0 is current: every blend, forward and backward, as the
    reference computes it there (a launch on the wrong device errs or reads garbage; the
    tolerance leaves room for the gate gradient's other summation order, nothing more)."""
    gen = torch.Generator().manual_seed(7)
    with torch.cuda.device(0):
        h = torch.randn(4, 8, 5, 5, generator=gen).to("cuda:1").contiguous(memory_format=torch.channels_last)
        s = torch.randn(4, 8, 5, 5, generator=gen).to("cuda:1")
        gate = torch.rand(4, 1, 1, 1, generator=gen).to("cuda:1")
        alpha = torch.tensor(0.6)
        for name, call in {"blend_add": lambda m, h, s, g: m.blend_add(h, s, alpha),
                           "blend_multiply": lambda m, h, s, g: m.blend_multiply(h, s, alpha, seed_input=h.detach()),
                           "blend_gate": lambda m, h, s, g: m.blend_gate(h, s, alpha, g)}.items():
            outs = []
            for impl in ("triton", "reference"):
                leaves = [t.detach().clone().requires_grad_() for t in (h, s, gate)]
                with kk.use_backend(impl):
                    y = call(kk, *leaves)
                y.backward(torch.ones_like(y))
                outs.append([y.detach()] + [t.grad for t in leaves])
            for got, want in zip(*outs):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
