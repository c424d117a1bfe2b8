"""The alpha-gradient terms of the native CPU float32 MULTIPLY and valve: formed from the float
tanh of the elementwise gradients where each alpha element sums at least `kFloatTermsMin` (64)
of them, else from a double tanh (`tanh_pd` in csrc/cpu/blend_kernels.h), which states about
1e-12 relative error. Both stay far inside rule 2's sqrt(n) slack (the last test).

The alpha gradient sums g*h*tanh(s - r) (MULTIPLY) or g*tanh(m) (the valve) over every
element, so a bias in this tanh would scale the whole sum; the equivalence tests see it only
through a sum and a float32 rounding. This checks the tanh itself, elementwise, against
torch's float64 tanh (within about one double ulp) where its reduction changes branch, near
zero, in the subnormals, past the clamp at 20, and at the special values."""

from __future__ import annotations

import math

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels import _C

STATED = 1e-12  # blend_kernels.h: "to about 1e-12 relative"


@pytest.fixture(scope="module")
def sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, ours, torch's float64 tanh) over the inputs below, computed once for the module."""
    x = _inputs()
    return x, _C.tanh_f64(x), torch.tanh(x)


def _inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    wide = (torch.rand(1 << 20, generator=gen, dtype=torch.float64) * 2 - 1) * 25
    # |x| = k ln2 / 2 is where the reduction's m steps (2|x| = m ln2 + 2h, |h| <= ln2/4), and
    # h sits at its largest halfway between: both sides of every step up to the clamp
    steps = torch.arange(0, 60, dtype=torch.float64) * (math.log(2) / 2)
    halfway = steps + math.log(2) / 4
    nudged = torch.cat([steps, halfway]).unsqueeze(1) * (1 + torch.tensor([-1e-15, -1e-9, 0.0, 1e-9, 1e-15]))
    tiny = torch.exp2(-torch.rand(1 << 14, generator=gen, dtype=torch.float64) * 1070)  # down to 2^-1070
    small = torch.rand(1 << 16, generator=gen, dtype=torch.float64) * 0.4  # mostly m = 0: H alone
    # float32 values widened, as the valve passes m, and float32 differences, as MULTIPLY passes s - r
    floats = torch.randn(1 << 16, generator=gen).double() * 3
    diffs = torch.randn(1 << 16, generator=gen).double() - torch.randn(1 << 16, generator=gen).double()
    x = torch.cat([wide, nudged.flatten(), tiny, small, floats, diffs])
    return torch.cat([x, -x])


def test_within_the_stated_relative_error(sample):
    x, ours, ref = sample
    nonzero = ref != 0
    rel = ((ours - ref).abs()[nonzero] / ref.abs()[nonzero]).max().item()
    assert rel <= STATED, f"max relative error {rel:.3g}"
    assert torch.equal(ours[~nonzero], ref[~nonzero])


def test_no_one_sided_error(sample):
    # the AVX-512 quotient corrects a reciprocal estimate; with only the first-order correction
    # (1 + u) it would err on one side by up to about 4e-9 for every element, and the alpha sum
    # would add that up. Over each range of |x| the mean signed error stays at the polynomial's
    # own level.
    x, ours, ref = sample
    bounds = [1e-300, 1e-8, 0.17, 1.0, 5.0, 19.0, math.inf]
    for lo, hi in zip(bounds, bounds[1:]):
        part = (x.abs() >= lo) & (x.abs() < hi)
        signed = ((ours - ref)[part] / ref[part]).mean().item()
        assert abs(signed) <= 1e-13, f"mean signed relative error {signed:.3g} for {lo} <= |x| < {hi}"


def test_special_values_and_tail():
    x = torch.tensor([0.0, -0.0, 20.0, -20.0, 1e300, -1e300, math.inf, -math.inf, math.nan,
                      5e-324, -5e-324], dtype=torch.float64)
    ours = _C.tanh_f64(x)  # 11 elements: a whole vector and a tail on either ISA
    ref = torch.tanh(x)
    assert torch.equal(torch.signbit(ours), torch.signbit(ref))  # -0 stays -0
    number = ~torch.isnan(ref)
    assert torch.allclose(ours[number], ref[number], rtol=STATED, atol=0)
    assert torch.isnan(ours[~number]).all()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 17])
def test_lengths_around_the_vector_width(n):
    x = torch.linspace(-3, 3, n, dtype=torch.float64)
    assert torch.allclose(_C.tanh_f64(x), torch.tanh(x), rtol=STATED, atol=0)


def test_rejects_other_inputs():
    with pytest.raises(RuntimeError, match="float64 CPU tensor"):
        _C.tanh_f64(torch.zeros(3, dtype=torch.float32))


@pytest.mark.parametrize("op", ["blend_multiply", "multiply_valve_multiplier"])
@pytest.mark.parametrize("n", [63, 64, 4096])  # terms per alpha element: double tanh, then float
def test_alpha_gradient_within_the_sqrt_n_slack(op, n):
    # per-sample alpha over (4, n) features; the float64 sum of the float inputs' exact terms
    # is the oracle. Errors stay under half of sqrt(n) units of float roundoff times sum |term|
    # (rule 2 allows all of it, plus twice eager's own error)
    gen = torch.Generator().manual_seed(n)
    worst = 0.0
    for scale in (1e-3, 1.0, 30.0):
        for _ in range(20):
            x = [torch.randn(4, n, generator=gen) for _ in range(4)]
            g, h = x[0], x[1]
            s, r = x[2] * scale, x[3] * scale
            alpha = torch.rand(4, 1, generator=gen).requires_grad_()
            if op == "blend_multiply":
                y = kk.blend_multiply(h, s, alpha, seed_input=r, backend="native")
                terms = g.double() * h.double() * torch.tanh(s.double() - r.double())
            else:
                y = kk.multiply_valve_multiplier(alpha, s, backend="native")
                terms = g.double() * torch.tanh(s.double())
            (dalpha,) = torch.autograd.grad(y, alpha, g)
            slack = math.sqrt(n) * 2.0**-24 * terms.abs().sum(1, keepdim=True)
            worst = max(worst, ((dalpha.double() - terms.sum(1, keepdim=True)).abs() / slack).max().item())
    assert worst <= 0.5, f"alpha gradient error {worst:.3g} of the sqrt(n) slack"
