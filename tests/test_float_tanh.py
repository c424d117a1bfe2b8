"""The float32 tanh of the native CPU MULTIPLY and valve kernels and its 1 - tanh^2
(kernels/blend_math.h, tanh_with_grad), exposed as `kasmina_kernels._C.tanh_f32`.

One routine: the odd Taylor series below |x| = 0.6, 1 - q with q = 2 / (exp(2|x|) + 1) above,
and 1 - tanh^2 = q (2 - q) there, which keeps its relative accuracy where tanh saturates.
Held here to what blend_math.h states, against float64: tanh within 2 float32 ulps everywhere,
1 - tanh^2 to a few float32 ulps relative wherever it is a normal float (a 1 - t*t from a
rounded t loses most of its bits there), exact signs, NaN kept, exactly 0 where tanh rounds
to +-1.
"""

from __future__ import annotations

import math

import pytest
import torch

import kasmina_kernels as kk

_C = pytest.importorskip("kasmina_kernels._C", reason="the native extension is not built")

F32_ULP_AT_1 = 2.0 ** -24  # ulp of float32 just below 1


def _sample() -> torch.Tensor:
    # every 61st float32 bit pattern in [0, 12] (about 17M values) and their negatives, plus
    # values around the 0.6 switch and the saturation point
    top = int(torch.tensor(12.0).view(torch.int32))
    bits = torch.arange(0, top, 61, dtype=torch.int32)
    x = bits.view(torch.float32)
    edges = torch.tensor([0.6, 9.0, 9.01, 10.0], dtype=torch.float64)
    near = (edges[:, None] + torch.linspace(-1e-5, 1e-5, 201, dtype=torch.float64)).reshape(-1)
    x = torch.cat([x, near.to(torch.float32)])
    return torch.cat([x, -x])


@pytest.fixture(scope="module")
def sample():
    x = _sample()
    t, g = _C.tanh_f32(x)
    exact = torch.tanh(x.double())
    return x, t, g, exact


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    spacing = torch.finfo(torch.float32).eps * torch.exp2(torch.floor(torch.log2(exact.abs())))
    spacing = spacing.clamp_min(torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps)
    return (got.double() - exact).abs() / spacing


def test_tanh_within_two_ulps(sample):
    x, t, _, exact = sample
    nonzero = exact != 0
    worst = float(_ulps(t[nonzero], exact[nonzero]).max())
    assert worst <= 2.0, f"tanh off by {worst:.2f} float32 ulps"
    assert bool((t[~nonzero] == 0).all())


def test_tanh_is_odd_and_bounded(sample):
    x, t, _, _ = sample
    half = x.numel() // 2
    assert torch.equal(t[:half], -t[half:])
    assert bool((t.abs() <= 1).all())


def test_one_minus_tanh_squared_keeps_its_relative_accuracy(sample):
    x, t, g, exact = sample
    sech2 = 1 - exact * exact  # float64: good to ~1e-16 absolute, enough below |x| = 12
    normal = sech2 > torch.finfo(torch.float32).tiny
    tanh_saturated = t.abs() == 1
    check = normal & ~tanh_saturated & (x.double().abs() < 8)
    rel = ((g.double() - sech2).abs() / sech2)[check]
    assert float(rel.max()) <= 8 * torch.finfo(torch.float32).eps, float(rel.max())
    # where 1 - t*t of the rounded t would cancel, the routine's value is far better
    far = check & (x.double().abs() > 4)
    naive = (1 - t.double() ** 2)[far]
    assert float(((naive - sech2[far]).abs() / sech2[far]).max()) > 1e-3  # the naive form fails


def test_exact_zero_where_tanh_rounds_to_one(sample):
    _, t, g, _ = sample
    assert bool((g[t.abs() == 1] == 0).all())
    assert bool((g >= 0).all() and (g <= 1).all())


def test_special_values():
    x = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 1e-30, 100.0])
    t, g = _C.tanh_f32(x)
    assert t[0].item() == 0 and g[0].item() == 1
    assert t[1].item() == 0
    assert t[2].item() == 1 and t[3].item() == -1 and g[2].item() == 0 and g[3].item() == 0
    assert math.isnan(t[4].item()) and math.isnan(g[4].item())
    assert t[5].item() == pytest.approx(1e-45, abs=1e-45) and t[7].item() == pytest.approx(1e-30)
    assert t[8].item() == 1 and g[8].item() == 0


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 33])
def test_lengths_around_the_vector_width(n):
    x = torch.linspace(-3, 3, n)
    t, g = _C.tanh_f32(x)
    assert torch.allclose(t.double(), torch.tanh(x.double()), rtol=0, atol=3 * F32_ULP_AT_1)
    assert torch.allclose(g.double(), 1 - torch.tanh(x.double()) ** 2, rtol=1e-6, atol=0)


def test_rejects_other_inputs():
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        _C.tanh_f32(torch.zeros(3, dtype=torch.float64))


# The alpha gradient sums g*h*tanh(s - r) (MULTIPLY) or g*tanh(m) (the valve) over every element,
# so a bias in the tanh its terms take would scale the whole sum. Where an alpha element sums at
# least 64 terms they come from the float tanh above, else from ATen's double tanh.
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
