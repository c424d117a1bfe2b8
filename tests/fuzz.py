"""Hypothesis strategies that draw equivalence cases (`cases.Case`) over the whole input space
the ops accept, for the property-based tests in `test_fuzz.py`: any op; ranks 1 to 4 with
sizes 0, 1, small primes and composites; host and seed laid out independently (contiguous,
channels_last, transposed, sliced with steps, expanded with stride 0, with a storage offset);
every feature dtype, and a seed (and seed_input) in another one; 0-dim alpha of any real dtype,
per-sample, other broadcast shapes and full-size alpha; the same forms for the gate; aliased
inputs; any subset of the inputs requiring grad; inference mode; NaN/Inf planted in the
features. A drawn Case runs through `cases.run_case`, i.e. the equivalence rule of
docs/semantics.md#equivalence plus the no-write-into-inputs check.

Example counts come from the Hypothesis profile (registered in conftest.py): "ci" by default,
"thorough" on request; `examples_for(backend)` scales them down for slow backends.
"""

from __future__ import annotations

import math

from hypothesis import settings
from hypothesis import strategies as st

from cases import DTYPES, FEATURE_OPS, SLOW_BACKENDS, Case, _grad_subsets

SIZES = (1, 2, 3, 4, 5, 7, 11, 13)  # and 0: see shapes()
FEATURE_LAYOUTS = ("contig", "cl", "slice", "transpose", "expand", "offset", "step")
WEIGHT_FORMS_OVER_FEATURES = ("ps", "psh", "bc", "vec", "full")
SCALAR_FORMS = ("s32", "sbf", "s16", "sh", "s64")
AVALUES = ("mid", "zero", "one", "neg", "over")
POOL_OPS = ("gated_pool", "gate_network")
OPS = FEATURE_OPS + ("gate_effective_alpha",) + POOL_OPS

# Elements per feature tensor, per backend speed (Triton on CPU runs under its interpreter).
MAX_NUMEL = {"fast": 2048, "slow": 512}
# Triton under its interpreter is several times slower per case: half the examples.
SLOW_EXAMPLE_FRACTION = 2


def examples_for(backend: str, device: str = "cpu") -> int:
    """The active profile's example count, scaled down for a slow backend on this device."""
    n = settings().max_examples
    if backend in SLOW_BACKENDS and device == "cpu":
        n = max(10, n // SLOW_EXAMPLE_FRACTION)
    return n


def speed(backend: str, device: str) -> str:
    return "slow" if backend in SLOW_BACKENDS and device == "cpu" else "fast"


@st.composite
def shapes(draw, min_rank: int = 1, max_rank: int = 4, max_numel: int = 2048, rank: int | None = None):
    """Shapes of rank `rank` (else min_rank..max_rank) with at most `max_numel` elements; one
    in eight has a zero-size dimension (the batch, or another one)."""
    r = rank if rank is not None else draw(st.integers(min_rank, max_rank))
    dims = []
    for _ in range(r):
        budget = max_numel // max(1, math.prod(dims))
        dims.append(draw(st.sampled_from([n for n in SIZES if n <= budget] or [1])))
    if draw(st.integers(0, 7)) == 0:
        dims[draw(st.sampled_from((0, r - 1)))] = 0
    return tuple(dims)


def _grads(draw, op: str, alpha_form: str, leaves: tuple[str, ...]) -> str:
    """"all", "none", one input, or a subset such as "h+alpha"."""
    choice = draw(st.sampled_from(("all", "none", "one", "subset")))
    names = [n for n in _grad_subsets(op, alpha_form) if n != "none"]
    names = [n for n in names if n in leaves]
    if choice in ("all", "none") or not names:
        return choice if names else "none"
    if choice == "one":
        return draw(st.sampled_from(names))
    subset = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    return "+".join(sorted(subset))


def _alpha_form(draw, weight_forms=WEIGHT_FORMS_OVER_FEATURES) -> tuple[str, str]:
    form = draw(st.sampled_from(SCALAR_FORMS + ("int",) + weight_forms))
    if form == "int":
        return form, draw(st.sampled_from(("zero", "one")))
    return form, draw(st.sampled_from(AVALUES))


@st.composite
def feature_cases(draw, op: str, *, max_numel: int, device: str = "cpu") -> Case:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes(max_numel=max_numel))
    layout = draw(st.sampled_from(FEATURE_LAYOUTS))
    has_alpha = op != "ste_forward"
    alpha, avalue = _alpha_form(draw) if has_alpha else ("s32", "mid")
    fields = dict(op=op, dtype=dtype, shape=shape, layout=layout, alpha=alpha, avalue=avalue,
                  device=device)
    if device != "cpu":
        fields["host_scalars"] = draw(st.booleans())
    if op != "multiply_valve_multiplier":
        alias = draw(st.integers(0, 5)) == 0
        fields["alias"] = alias
        if not alias:
            if draw(st.booleans()):
                fields["seed_layout"] = draw(st.sampled_from(FEATURE_LAYOUTS))
            if draw(st.booleans()):
                fields["seed_dtype"] = draw(st.sampled_from([d for d in DTYPES if d != dtype]))
    if op == "blend_multiply":
        fields["seed_input"] = draw(st.sampled_from(("none", "given", "h", "s", "f32")))
    if op == "blend_gate":
        fields["gate"] = draw(st.sampled_from(("host", "f32")))
        fields["gate_form"] = draw(st.sampled_from(("ps", "ps", "scalar", "bc", "vec", "full")))
    fields["specials"] = draw(st.integers(0, 4)) == 0
    if draw(st.integers(0, 5)) == 0:
        fields["mode"] = "inference"
    else:
        fields["grads"] = _grads(draw, op, alpha, _leaf_names(op, fields))
    return Case(**fields)


def _leaf_names(op: str, fields: dict) -> tuple[str, ...]:
    if op == "multiply_valve_multiplier":
        return ("alpha", "m")
    names = ["h", "s"] + (["alpha"] if op != "ste_forward" else [])
    if op == "blend_gate":
        names.append("gate")
    if op == "blend_multiply" and fields.get("seed_input") not in ("none", None):
        names.append("r")
    return tuple(names)


@st.composite
def gate_pair_cases(draw, *, device: str = "cpu") -> Case:
    """gate_effective_alpha: `dtype` and `shape` are the gate's; alpha any form over it."""
    dtype = draw(st.sampled_from(DTYPES))
    rank = draw(st.integers(1, 4))
    batch = draw(st.sampled_from((0,) + SIZES))
    shape = (batch,) + (1,) * (rank - 1)
    gate = draw(st.sampled_from(("ps", "ps", "scalar")))
    alpha, avalue = _alpha_form(draw, ("ps", "psh", "vec", "full"))
    fields = dict(op="gate_effective_alpha", dtype=dtype, shape=shape, alpha=alpha, avalue=avalue,
                  gate=gate, specials=draw(st.integers(0, 4)) == 0, device=device)
    if device != "cpu":
        fields["host_scalars"] = draw(st.booleans())
    if draw(st.integers(0, 5)) == 0:
        fields["mode"] = "inference"
    else:
        fields["grads"] = _grads(draw, "gate_effective_alpha", alpha, ("alpha", "gate"))
    return Case(**fields)


@st.composite
def pool_cases(draw, op: str, *, max_numel: int, device: str = "cpu") -> Case:
    dtype = draw(st.sampled_from(DTYPES))
    topology = draw(st.sampled_from(("cnn", "transformer")))
    shape = draw(shapes(rank=4 if topology == "cnn" else 3, max_numel=max_numel))
    if op == "gate_network":  # the network needs at least one channel to have weights
        c = 1 if topology == "cnn" else 2
        shape = shape[:c] + (max(1, shape[c]),) + shape[c + 1:]
    layout = draw(st.sampled_from(("contig", "cl", "slice", "transpose", "expand", "offset", "step")))
    fields = dict(op=op, dtype=dtype, shape=shape, layout=layout, topology=topology,
                  specials=draw(st.integers(0, 4)) == 0, device=device)
    if draw(st.integers(0, 5)) == 0:
        fields["mode"] = "inference"
    elif op == "gate_network":
        fields["grads"] = draw(st.sampled_from(("all", "x", "weights", "none")))
    else:
        fields["grads"] = draw(st.sampled_from(("all", "none")))
    return Case(**fields)


def cases(op: str, backend: str, device: str = "cpu"):
    """The strategy for `op`'s cases on `backend` and `device`."""
    max_numel = MAX_NUMEL[speed(backend, device)]
    if op in FEATURE_OPS:
        return feature_cases(op, max_numel=max_numel, device=device)
    if op == "gate_effective_alpha":
        return gate_pair_cases(device=device)
    if op in POOL_OPS:
        return pool_cases(op, max_numel=max_numel, device=device)
    raise AssertionError(op)

