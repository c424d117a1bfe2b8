"""The float32 tanh of the native CPU MULTIPLY and valve kernels (csrc/cpu/tanh_f32.h).

Two modes: "torch" takes torch's own float tanh for every element; "mixed" takes a rational
approximation where |x| < 1 and torch's bits elsewhere. Which one runs by default depends on
the machine (aten_tanh.h), so both are tested here whatever the default: the rational against
torch.tanh over every float32 in [0.25, 1) (where 1 - t^2 and 1 + t amplify a difference
most) and a sample below, and the MULTIPLY/valve float32 equivalence cases under each mode.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cases import cases_for, run_case
from kasmina_kernels import _C

BOUND = 1.0
MODES = ("torch", "mixed")


@pytest.fixture
def float_tanh_mode(request):
    before = _C.float_tanh()
    _C.set_float_tanh(request.param)
    yield request.param
    _C.set_float_tanh(before)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32).to(torch.int64)


# in place is how MULTIPLY's backward runs it (over s - r); the valve reads m and writes apart
IN_PLACE = pytest.mark.parametrize("in_place", [False, True], ids=["apart", "in-place"])


@IN_PLACE
@pytest.mark.parametrize("float_tanh_mode", ["mixed"], indirect=True)
def test_rational_within_one_ulp_of_torch_below_the_bound(float_tanh_mode, in_place):
    lo = torch.tensor([0.25]).view(torch.int32).item()
    hi = torch.tensor([BOUND]).view(torch.int32).item()
    every = torch.arange(lo, hi, dtype=torch.int32).view(torch.float32)  # every float in [0.25, 1)
    gen = torch.Generator().manual_seed(0)
    below = torch.rand(1 << 22, generator=gen) * torch.exp2(-torch.randint(2, 40, (1 << 22,), generator=gen).float())
    x = torch.cat([every, -every, below, -below, torch.tensor([0.0, -0.0])])
    ours, torchs = _C.tanh_f32(x, in_place=in_place), torch.tanh(x)
    assert (_bits(ours) - _bits(torchs)).abs().max().item() <= 1
    assert torch.equal(torch.signbit(ours), torch.signbit(torchs))  # -0 stays -0
    # what that ulp does to 1 - t^2 (the gradient) and 1 + t (the forward at c = 1): at most
    # a fifth of float32's default rtol (1.3e-6); tanh_f32.h states 2.5e-7 over every float
    d, t = (ours.double() - torchs.double()).abs(), torchs.double()
    assert (2 * t.abs() * d / (1 - t * t)).max().item() <= 2.6e-7
    assert (d / (1 - t.abs())).max().item() <= 2.6e-7


@IN_PLACE
@pytest.mark.parametrize("float_tanh_mode", MODES, indirect=True)
def test_torch_bits_at_and_past_the_bound(float_tanh_mode, in_place):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100_003, generator=gen) * 4  # an odd length: the scalar tail too
    x[:8] = torch.tensor([BOUND, -BOUND, float("nan"), float("inf"), -float("inf"), 9.5, -30.0, 1e30])
    far = ~(x.abs() < BOUND)
    ours, torchs = _C.tanh_f32(x, in_place=in_place), torch.tanh(x)
    assert torch.equal(_bits(ours)[far], _bits(torchs)[far])
    if float_tanh_mode == "torch":
        assert torch.equal(_bits(ours), _bits(torchs))


def test_tanh_f32_rejects_other_inputs():
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        _C.tanh_f32(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="'torch' or 'mixed'"):
        _C.set_float_tanh("fast")


def _default_in_subprocess(env_value: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("KASMINA_KERNELS_FLOAT_TANH", None)
    if env_value is not None:
        env["KASMINA_KERNELS_FLOAT_TANH"] = env_value
    code = "import warnings; warnings.simplefilter('always'); from kasmina_kernels import _C; print(_C.float_tanh())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)


def test_default_mode_follows_the_machine():
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    expected = "torch" if intel and torch.backends.mkl.is_available() else "mixed"
    assert _default_in_subprocess(None).stdout.strip() == expected
    for mode in MODES:
        assert _default_in_subprocess(mode).stdout.strip() == mode
    bad = _default_in_subprocess("fast")
    assert bad.stdout.strip() == expected
    assert "KASMINA_KERNELS_FLOAT_TANH must be 'torch' or 'mixed'" in bad.stderr


def _mode_cases():
    cases = [c for c in cases_for("native")
             if c.op in ("blend_multiply", "multiply_valve_multiplier") and c.dtype == torch.float32 and not c.big]
    # the tally in conftest.py counts these per "backend": one line per mode
    return [pytest.param(f"native/{mode}-tanh", mode, case, id=f"{mode}-tanh-{case.id}")
            for mode in MODES for case in cases]


@pytest.mark.equivalence
@pytest.mark.parametrize("backend,float_tanh_mode,case", _mode_cases(), indirect=["float_tanh_mode"])
def test_equivalence_in_each_float_tanh_mode(backend, float_tanh_mode, case):
    run_case("native", case)
