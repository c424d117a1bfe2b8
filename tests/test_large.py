"""Large tensors: features of more than 2**31 elements through the native CPU kernels, so any
32-bit element offset or count would wrap. Opt-in (memory and time): KASMINA_TEST_LARGE=1
(tools/test.sh sets it in CI); marked ``large``.

Memory is kept to about 12 GiB: one bfloat16 buffer of N + 3*SHIFT elements (4 GiB) holds
every input as a view at a different offset (h at 0, s at SHIFT, seed_input or the upstream
gradient at 2*SHIFT, 3*SHIFT), so the inputs differ element by element without more memory;
outputs are freed once checked. The buffer repeats a random pattern whose period P is a prime
that does not divide 2**31 or 2**32, so an element read through a wrapped offset holds another
value (asserted for the sampled positions).

Checks: elementwise outputs and gradients at sampled positions (random ones, the ones around
2**31 and 2**30, the last) against the reference run on the gathered samples, by the
equivalence rule; the pooled means and the per-sample alpha gradient against exact float64
sums (the buffer is periodic, so a sum over 2**30 elements is whole periods plus a partial
one, each summed in float64): the pooled means by rule 2 (eager's own error on the same input is
measured), the alpha gradient by the error bound of its arithmetic (two float32 roundings per
term, summed compensated in double, rounded once to float32).
"""

from __future__ import annotations

import os

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels import reference
from kasmina_kernels.equivalence import check_against_oracle, check_elementwise
from kasmina_kernels.backends import backend_status

BF16 = torch.bfloat16
N = 2**31 + 2 * 2049          # elements per feature tensor: two samples of 2**30 + 2049
SHIFT = 12347                  # offsets of the other inputs inside the buffer
P = 65521                      # pattern period: a prime, so 2**31 and 2**32 are not multiples
NEEDED_GIB = 13

pytestmark = [
    pytest.mark.large,
    pytest.mark.skipif(os.environ.get("KASMINA_TEST_LARGE") != "1",
                       reason="opt-in: set KASMINA_TEST_LARGE=1 (needs ~13 GiB of free memory and about a minute)"),
    pytest.mark.skipif(backend_status("native", "cpu") is not None,
                       reason=f"the native backend is unavailable: {backend_status('native', 'cpu')}"),
]


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


@pytest.fixture(scope="module")
def buf():
    if _available_gib() < NEEDED_GIB:
        pytest.skip(f"needs {NEEDED_GIB} GiB of available memory, {_available_gib():.1f} GiB available")
    gen = torch.Generator().manual_seed(31)
    pattern = torch.randn(P, generator=gen).to(BF16)
    total = N + 3 * SHIFT
    b = torch.empty(total, dtype=BF16)
    full = total // P
    b[: full * P].view(full, P).copy_(pattern.expand(full, P))
    b[full * P:].copy_(pattern[: total - full * P])
    yield b
    del b


def _views(b):
    h, s, r, g = (b[k * SHIFT: k * SHIFT + N].view(2, N // 2) for k in range(4))
    return h, s, r, g


def _positions() -> torch.Tensor:
    """Every position from 2**31 - 64 to the end (the only ones a 32-bit element offset would
    wrap for), the ends of both samples and of the first 2**30 elements (where a 32-bit byte
    offset of a bf16 tensor wraps), and 4096 random ones."""
    gen = torch.Generator().manual_seed(5)
    special = torch.tensor([0, 2**30 - 1, 2**30, N // 2 - 1, N // 2])
    tail = torch.arange(2**31 - 64, N)
    return torch.cat([special, tail, torch.randint(0, N, (4096,), generator=gen)]).unique()


POS = _positions()


def _take(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)[POS]


def test_the_pattern_catches_wrapped_offsets(buf):
    h = buf[:N]
    for wrap in (2**31, 2**30):  # a 32-bit element offset; a 32-bit byte offset of bf16
        hi = POS[POS >= wrap]
        assert hi.numel() > 1000
        differs = h[hi] != h[hi - wrap]
        assert differs.float().mean() > 0.9  # a wrapped read would get another value nearly always


def _per_sample(values):
    return torch.tensor(values, dtype=torch.float32).view(2, 1)


def _rows():
    return (POS >= N // 2).long()  # the sample each sampled position belongs to


def _check_samples(name, got: torch.Tensor, want: torch.Tensor):
    check_elementwise(name, got, want, got.dtype)


@pytest.mark.parametrize("op", ["blend_add", "blend_multiply", "blend_gate", "ste_forward", "multiply_valve_multiplier"])
def test_forward_over_2_31_elements(buf, op):
    h, s, r, _ = _views(buf)
    alpha = _per_sample([0.3, 0.8])
    gate = _per_sample([0.9, 0.45])
    hs, ss, rs, rows = _take(h), _take(s), _take(r), _rows()
    a_s, g_s = alpha.view(-1)[rows], gate.view(-1)[rows]
    if op == "blend_add":
        y, want = kk.blend_add(h, s, alpha, backend="native"), reference.blend_add(hs, ss, a_s)
    elif op == "blend_multiply":
        a0 = torch.tensor(0.6)
        y = kk.blend_multiply(h, s, a0, seed_input=r, backend="native")
        want = reference.blend_multiply(hs, ss, a0, seed_input=rs)
    elif op == "blend_gate":
        y, want = kk.blend_gate(h, s, alpha, gate, backend="native"), reference.blend_gate(hs, ss, a_s, g_s)
    elif op == "ste_forward":
        y, want = kk.ste_forward(h, s, backend="native"), reference.ste_forward(hs, ss)
    else:
        y = kk.multiply_valve_multiplier(alpha.to(BF16), h, backend="native")
        want = reference.multiply_valve_multiplier(a_s.to(BF16), hs)
    assert y.shape == h.shape and y.dtype == want.dtype
    got = _take(y)
    del y
    _check_samples(op, got, want)


def _periodic_sum(terms: torch.Tensor, begin: int, end: int) -> float:
    """sum(terms[i % P] for i in range(begin, end)), exactly enough (float64)."""
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), terms.to(torch.float64).cumsum(0)])

    def upto(n):
        return (n // P) * prefix[P] + prefix[n % P]

    return float(upto(end) - upto(begin))


def _pattern(buf, shift=0, step=1, start=0) -> torch.Tensor:
    """The buffer's value at start + shift + step * j, for j in [0, P), as float64: the buffer
    repeats with period P, and so does this sequence (P is odd and prime)."""
    j = torch.arange(P, dtype=torch.int64)
    return buf[(start + shift + step * j) % P].to(torch.float64)


def test_pool_over_2_31_elements(buf):
    x = buf[:N].view(1, N // 2, 2)  # transformer layout: each channel averages 2**30 + 2049
    got = kk.gated_pool(x, "transformer", backend="native")
    eager = reference.gated_pool(x, "transformer")
    oracle = torch.tensor([_periodic_sum(_pattern(buf, start=c, step=2), 0, N // 2) / (N // 2)
                           for c in range(2)], dtype=torch.float64)
    check_against_oracle("pooled", got.view(-1), eager.view(-1), oracle, BF16)
    # the backward writes 2**31 + 4098 elements: mean's gradient g / T everywhere
    gy = torch.tensor([[0.75, -1.5]], dtype=BF16)
    dx = torch.ops.kasmina.gated_pool_backward(gy, x, "transformer")
    want = (gy.float() / (N // 2)).to(BF16).view(-1)[POS % 2]
    got_dx = _take(dx)
    del dx
    _check_samples("dx", got_dx, want)


def test_blend_add_backward_over_2_31_elements(buf):
    h, s, _, g = _views(buf)
    alpha = _per_sample([0.3, 0.8])
    dh, ds, dalpha = torch.ops.kasmina.blend_add_backward(g, h, s, alpha, True)
    got_dh, got_ds = _take(dh), _take(ds)
    del dh, ds
    rows = _rows()
    hs, ss, gs = (_take(t).requires_grad_() for t in (h, s, g))
    ys = reference.blend_add(hs, ss, alpha.view(-1)[rows])
    want_dh, want_ds = torch.autograd.grad(ys, (hs, ss), gs.detach())
    _check_samples("dh", got_dh, want_dh)
    _check_samples("ds", got_ds, want_ds)
    # alpha in (0, 1): d alpha = sum over the sample of g * (s - h)
    term = _pattern(buf, 3 * SHIFT) * (_pattern(buf, SHIFT) - _pattern(buf))  # g * (s - h) at i % P
    for k in range(2):
        begin, end = k * (N // 2), (k + 1) * (N // 2)
        exact = _periodic_sum(term, begin, end)
        magnitude = _periodic_sum(term.abs(), begin, end)
        bound = 2.0**-23 * float(magnitude) + 2.0**-24 * abs(float(exact)) + 1e-30
        err = abs(float(dalpha.view(-1)[k]) - exact)
        assert err <= bound, f"sample {k}: d alpha {float(dalpha.view(-1)[k])!r} vs exact {exact!r} (error {err:.3g} > {bound:.3g})"
