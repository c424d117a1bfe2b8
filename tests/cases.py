"""The equivalence matrix: which cases run for which backend and how their inputs are built
(layouts, weight forms, special values, aliasing, mixed dtypes) from the package's input
makers; each case runs and is judged through `kasmina_kernels.opcases.Check`, as the `check`
and `bench` commands judge theirs (`case_check`, `run_case`).

`cases_for(backend)` is the single entry point. Backends whose runs are slow on this
machine's tensors (Triton on CPU runs under its interpreter) get `reduced_cases()`: small
shapes only, but still every op, every half/single dtype, both alpha forms (0-dim and
per-sample), mixed layouts and dtypes, and every gradient. Set KASMINA_TEST_REDUCED=1 to give
every backend the reduced set (the poisoned-allocator rerun uses that).

KASMINA_TEST_DEVICE=cuda runs the same matrix on CUDA tensors (inputs are drawn on the CPU
from the same generators, then moved, then laid out, so a layout is the same on either
device). There every backend runs the full matrix, and the 0-dim alpha forms keep their
contract: a float32/bf16/fp16/int 0-dim alpha stays a CPU tensor beside the device features,
the host-dtype one ("sh") lives on the device.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace

import torch

import kasmina_kernels as kk
from kasmina_kernels.backends import backend_status
from kasmina_kernels.opcases import Check, blend_weights, gate_weights, per_sample, randn
from kasmina_kernels.optable import BY_NAME, NAMES, OPS

from equivalence import assert_verdicts, case_generator
from oracles import longdouble_oracle

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16, F64)
_DT = {F32: "f32", F64: "f64", BF16: "bf16", F16: "f16"}

# the op groups of the matrix, in the table's order
BLEND_OPS = tuple(op.name for op in OPS if op.inputs[:3] == ("h", "s", "alpha"))
FEATURE_OPS = tuple(op.name for op in OPS if op.features)  # the blends, STE and the valve
WEIGHT_OPS = tuple(n for n in FEATURE_OPS if "alpha" in BY_NAME[n].inputs)  # alpha over features
ALL_OPS = NAMES

# Backends whose CPU runs are slow (Triton's interpreter): they get the reduced set.
SLOW_BACKENDS = frozenset({"triton"})

TEST_DEVICE = torch.device(os.environ.get("KASMINA_TEST_DEVICE", "cpu"))


@dataclass(frozen=True)
class Case:
    op: str
    dtype: torch.dtype                 # the host's (features') dtype
    shape: tuple
    layout: str = "contig"             # contig | cl | cl_host | cl_seed | slice | transpose
                                       # | expand | offset | step (see _feature())
    alpha: str = "s32"                 # see _alpha()
    avalue: str = "mid"                # 0-dim alpha value: mid | zero | one | neg | over
    grads: str = "all"                 # which inputs require grad (see _requires())
    seed_dtype: torch.dtype | None = None  # None: the host's dtype (gate_network: the weights')
    seed_input: str = "none"           # MULTIPLY: none | given | h | s | f32
    alias: bool = False                # s is h
    mode: str = "grad"                 # grad | inference
    specials: bool = False             # NaN / Inf planted in h and s
    topology: str | None = None        # gated_pool / gate_network
    gate: str = "host"                 # gate dtype: host | f32 ; gate_effective_alpha: form
    big: bool = False
    # the fields below default to the matrix's behaviour and appear in `id` only when set
    seed_layout: str | None = None     # the seed's (and seed_input's) layout; None: `layout`
    gate_form: str = "ps"              # blend_gate's gate shape: an alpha form (see _weight_shape)
    device: str = "cpu"                # where the inputs live (built on CPU, then moved)
    host_scalars: bool = False         # off-CPU cases: 0-dim alpha/gate stay CPU tensors
    autocast: torch.dtype | None = None  # run kernel and reference under torch.autocast(device, this)

    @property
    def id(self) -> str:
        parts = [self.op, _DT[self.dtype], "x".join(map(str, self.shape)) or "scalar"]
        if self.topology:
            parts.append(self.topology)
        if self.layout != "contig":
            parts.append(self.layout)
        if self.op in WEIGHT_OPS or self.op in ("blend_gate", "gate_effective_alpha"):
            parts.append(f"a-{self.alpha}-{self.avalue}" if self.alpha.startswith(("s", "i")) else f"a-{self.alpha}")
        if self.op in ("blend_gate", "gate_effective_alpha") and self.gate != "host":
            parts.append(f"gate-{self.gate}")
        if self.seed_dtype is not None:
            parts.append(f"seed-{_DT[self.seed_dtype]}")
        if self.op == "blend_multiply":
            parts.append(f"r-{self.seed_input}")
        if self.seed_layout is not None:
            parts.append(f"seed-layout-{self.seed_layout}")
        if self.op == "blend_gate" and self.gate_form != "ps":
            parts.append(f"gate-form-{self.gate_form}")
        if self.device != "cpu":
            parts.append(self.device + ("-cpu-scalars" if self.host_scalars else ""))
        if self.autocast is not None:
            parts.append(f"autocast-{_DT[self.autocast]}")
        if self.alias:
            parts.append("s-is-h")
        if self.specials:
            parts.append("nan-inf")
        parts.append("inference" if self.mode == "inference" else f"grad-{self.grads}")
        return "/".join(parts)


# ----------------------------------------------------------------------------- the matrix
SMALL_SHAPES = {
    "small": (8, 64, 16, 16),
    "tiny": (2, 3, 4, 5),
    "primes": (3, 5, 7, 11),
    "ones": (1, 1, 1, 1),
    "batch1": (1, 7, 1, 3),
    "zero_batch": (0, 4, 3, 3),
    "d1": (17,),
    "d2": (6, 33),
    "d3": (4, 9, 24),
    "d5": (2, 3, 4, 5, 2),
}
LAYOUTS_4D = ("cl", "cl_host", "cl_seed", "slice", "transpose")
ALPHA_FORMS = ("s32", "sbf", "s16", "sh", "int", "ps", "psh", "bc", "vec", "full", "fullh")
AVALUES = ("zero", "one", "neg", "over")

BIG = {
    "esper_cnn_a": (512, 8, 32, 32),
    "esper_cnn_b": (512, 32, 8, 8),
    "esper_transformer": (32, 256, 384),
}


def _grad_subsets(op: str, alpha_form: str) -> tuple[str, ...]:
    float_alpha = alpha_form != "int"
    if op in ("blend_add", "blend_with_isolation"):
        return ("h", "s") + (("alpha",) if float_alpha else ()) + ("none",)
    if op == "blend_multiply":
        return ("h", "s") + (("alpha",) if float_alpha else ()) + ("none",)
    if op == "blend_gate":
        return ("h", "s", "gate") + (("alpha",) if float_alpha else ()) + ("none",)
    if op == "ste_forward":
        return ("h", "s", "none")
    if op == "multiply_valve_multiplier":
        return ("m",) + (("alpha",) if float_alpha else ()) + ("none",)
    if op == "gate_effective_alpha":
        return ("gate",) + (("alpha",) if float_alpha else ()) + ("none",)
    if op == "gated_pool":
        return ("none",)
    if op == "gate_network":
        return ("x", "weights", "none")
    raise AssertionError(op)


def full_cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    for op in FEATURE_OPS:
        has_alpha = op != "ste_forward"
        for dt in DTYPES:
            base = Case(op, dt, SMALL_SHAPES["primes"])
            # shapes (every rank, size-1 dims, primes, zero batch)
            for shape in SMALL_SHAPES.values():
                add(replace(base, shape=shape))
                if has_alpha and len(shape) >= 1:
                    add(replace(base, shape=shape, alpha="ps"))
            # layouts
            for layout in LAYOUTS_4D:
                add(replace(base, layout=layout, alpha="ps" if has_alpha else "s32"))
            add(replace(base, shape=SMALL_SHAPES["d3"], layout="slice"))
            add(replace(base, shape=SMALL_SHAPES["d3"], layout="transpose", alpha="ps" if has_alpha else "s32"))
            add(replace(base, shape=SMALL_SHAPES["d2"], layout="transpose"))
            add(replace(base, shape=SMALL_SHAPES["d1"], layout="slice"))
            # alpha forms and values
            if has_alpha:
                for form in ALPHA_FORMS:
                    if form == "int":
                        for v in ("zero", "one"):
                            add(replace(base, alpha="int", avalue=v))
                    else:
                        add(replace(base, alpha=form))
                for v in AVALUES:
                    add(replace(base, avalue=v))
                    add(replace(base, alpha="sbf", avalue=v))
                add(replace(base, alpha="bc", layout="cl"))
            # which inputs require grad
            for sub in _grad_subsets(op, "s32"):
                add(replace(base, grads=sub))
            if has_alpha:
                add(replace(base, alpha="ps", grads="alpha"))
            add(replace(base, mode="inference"))
            add(replace(base, mode="inference", layout="cl_host", alpha="ps" if has_alpha else "s32"))
            add(replace(base, specials=True))
            add(replace(base, specials=True, alpha="ps" if has_alpha else "s32", layout="cl"))
            if has_alpha:
                add(replace(base, specials=True, avalue="zero"))
                add(replace(base, specials=True, alpha="full"))
            add(replace(base, alias=True))
            add(replace(base, alias=True, layout="cl", alpha="ps" if has_alpha else "s32"))
            # mixed dtypes: half host with an fp32 seed (autocast)
            if dt in (BF16, F16) and op != "multiply_valve_multiplier":
                for layout in ("contig", "cl_host"):
                    add(replace(base, seed_dtype=F32, layout=layout))
                    if has_alpha:
                        add(replace(base, seed_dtype=F32, layout=layout, alpha="ps"))
                add(replace(base, seed_dtype=F32, grads="s"))
                add(replace(base, seed_dtype=F32, specials=True))
        if op == "blend_multiply":
            for dt in DTYPES:
                base = Case(op, dt, SMALL_SHAPES["primes"])
                for r in ("given", "h", "s"):
                    add(replace(base, seed_input=r))
                    add(replace(base, seed_input=r, alpha="ps", layout="cl_host"))
                add(replace(base, seed_input="given", grads="r"))
                add(replace(base, seed_input="given", grads="none"))
                add(replace(base, seed_input="given", specials=True))
                add(replace(base, seed_input="given", shape=SMALL_SHAPES["d3"], alpha="ps", layout="slice"))
                add(replace(base, seed_input="given", mode="inference"))
                add(replace(base, seed_input="given", alias=True))
                if dt in (BF16, F16):
                    add(replace(base, seed_input="f32", seed_dtype=F32))
                    add(replace(base, seed_input="f32", seed_dtype=F32, alpha="ps", layout="cl_host"))
                    add(replace(base, seed_input="f32"))
                    add(replace(base, seed_input="given", seed_dtype=F32, grads="r"))
        if op == "blend_gate":
            for dt in (BF16, F16):
                base = Case(op, dt, SMALL_SHAPES["primes"], gate="f32")
                add(base)
                add(replace(base, alpha="ps", layout="cl_host"))
                add(replace(base, grads="gate"))
                add(replace(base, seed_dtype=F32, alpha="sbf"))
    # many short samples under a per-sample weight, no weight gradient: the CPU loops take
    # whole samples per call, the weight one value further per sample
    for op in BLEND_OPS + ("multiply_valve_multiplier",):
        for dt in (F32, BF16):
            for layout in ("contig", "cl"):
                add(Case(op, dt, (300, 2, 3, 2), layout=layout, alpha="ps",
                         grads="m" if op == "multiply_valve_multiplier" else "h+s"))
    cases += scalar_cases(DTYPES)
    # gate_effective_alpha: (alpha form, gate form) pairs; `dtype` is the gate's
    for dt in DTYPES:
        for shape in ((8, 1, 1, 1), (5, 1, 1), (1, 1, 1, 1), (0, 1, 1, 1), (7,)):
            base = Case("gate_effective_alpha", dt, shape, alpha="s32", gate="ps")
            add(base)
            add(replace(base, alpha="ps"))
            if len(shape) == 4 and shape[0] == 8:
                for form in ("sbf", "sh", "psh", "s64"):
                    add(replace(base, alpha=form))
                for v in ("zero", "one"):
                    add(replace(base, alpha="int", avalue=v))
                for v in AVALUES:
                    add(replace(base, avalue=v))
                add(replace(base, gate="scalar", alpha="ps"))
                add(replace(base, gate="scalar", alpha="s32"))
                for sub in ("alpha", "gate", "none"):
                    add(replace(base, grads=sub, alpha="ps"))
                add(replace(base, mode="inference"))
                add(replace(base, specials=True, alpha="ps"))
        # an effective alpha of more values than samples: (8,1,1,1) gate beside a (1,3,1,1) alpha
        for specials in (False, True):
            add(Case("gate_effective_alpha", dt, (8, 3, 1, 1), alpha="bc", gate="ps", specials=specials))
    # pooling and the gate network
    for op in ("gated_pool", "gate_network"):
        for dt in DTYPES:
            for topo, shapes, layouts in (
                ("cnn", [SMALL_SHAPES["small"], (3, 5, 7, 11), (1, 1, 1, 1), (2, 33, 1, 1), (0, 4, 3, 3), (2, 40, 3, 3)],
                 ("cl", "slice", "transpose")),
                ("transformer", [(4, 9, 24), (2, 1, 7), (1, 13, 36), (0, 3, 5), (3, 17, 64)], ("slice", "transpose")),
            ):
                base = Case(op, dt, shapes[1], topology=topo)
                for shape in shapes:
                    add(replace(base, shape=shape))
                for layout in layouts:
                    add(replace(base, layout=layout))
                for sub in _grad_subsets(op, "s32"):
                    add(replace(base, grads=sub))
                add(replace(base, mode="inference"))
                add(replace(base, specials=True))
    cases += esper_cases()
    return _dedupe(cases)


def scalar_cases(dtypes, *, full: bool = True) -> list[Case]:
    """0-dim features (Esper's eager functions accept them): every feature op with a 0-dim
    alpha (and gate) of several dtypes, each gradient subset, a float32 seed beside a half
    host, seed_input, NaN/Inf, inference, the exact identities at alpha 0."""
    cases: list[Case] = []
    add = cases.append
    for op in FEATURE_OPS:
        has_alpha = op != "ste_forward"
        for dt in dtypes:
            base = Case(op, dt, (), gate_form="scalar" if op == "blend_gate" else "ps")
            add(base)
            if op == "blend_multiply":
                add(replace(base, seed_input="given"))
            if dt in (BF16, F16) and op != "multiply_valve_multiplier":
                add(replace(base, seed_dtype=F32, gate="f32" if op == "blend_gate" else "host",
                            seed_input="f32" if op == "blend_multiply" else "none"))
            if not full:
                continue
            if has_alpha:
                for form in ("sh", "sbf", "s64"):
                    add(replace(base, alpha=form))
                add(replace(base, alpha="int", avalue="one"))
                add(replace(base, avalue="zero"))
                add(replace(base, avalue="over"))
            for sub in _grad_subsets(op, "s32"):
                add(replace(base, grads=sub))
            add(replace(base, mode="inference"))
            add(replace(base, specials=True))
            add(replace(base, alias=True))
            if op == "blend_multiply":
                add(replace(base, seed_input="given", grads="r"))
                add(replace(base, seed_input="h"))
            if op == "blend_gate":
                add(replace(base, gate="f32"))
    return cases


# Esper's calls (docs/semantics.md#espers-calls): a channels_last host requiring grad beside an NCHW
# seed (and seed input, without grad), a 0-dim alpha in the host's dtype without grad or a
# per-sample alpha_override, a per-sample gate with grad.
ESPER_SHAPES = ((3, 5, 7, 11), (4, 16, 9, 9), (2, 40, 5, 6))


def esper_cases(shapes=ESPER_SHAPES, dtypes=DTYPES) -> list[Case]:
    cases = []
    for dt in dtypes:
        for shape in shapes:
            for alpha in ("sh", "psh"):
                base = Case("blend_add", dt, shape, layout="cl_host", alpha=alpha, grads="h+s")
                cases += [
                    base,
                    replace(base, op="blend_with_isolation"),
                    replace(base, op="blend_multiply", seed_input="given"),
                    replace(base, op="blend_gate", grads="h+s+gate"),
                ]
            ste = Case("ste_forward", dt, shape, layout="cl_host", grads="h+s")
            cases += [ste, replace(ste, specials=True)]
    return cases


def big_cases() -> list[Case]:
    b = BIG
    return [
        Case("blend_add", BF16, b["esper_cnn_a"], layout="cl_host", alpha="ps", big=True),
        Case("blend_add", F16, b["esper_transformer"], alpha="ps", big=True),
        Case("blend_multiply", BF16, b["esper_cnn_b"], layout="cl", alpha="ps", seed_input="given", big=True),
        Case("blend_multiply", F32, b["esper_transformer"], alpha="s32", big=True),
        Case("blend_gate", BF16, b["esper_cnn_a"], layout="cl", alpha="s32", big=True),
        Case("blend_gate", F32, b["esper_transformer"], alpha="ps", big=True),
        Case("blend_gate", BF16, b["esper_cnn_b"], alpha="s32", seed_dtype=F32, gate="f32", big=True),
        Case("ste_forward", BF16, b["esper_cnn_a"], layout="cl", big=True),
        Case("multiply_valve_multiplier", BF16, b["esper_cnn_b"], alpha="ps", big=True),
        Case("gated_pool", BF16, b["esper_cnn_a"], layout="cl", topology="cnn", big=True),
        Case("gated_pool", F32, b["esper_transformer"], topology="transformer", big=True),
        Case("gate_network", BF16, b["esper_cnn_b"], layout="cl", topology="cnn", big=True),
        Case("gate_network", BF16, b["esper_transformer"], topology="transformer", big=True),
    ]


def reduced_cases() -> list[Case]:
    """Small shapes; every op, fp32/bf16/fp16, 0-dim and per-sample alpha, mixed layouts and
    dtypes, every gradient."""
    cases: list[Case] = []
    add = cases.append
    for dt in (F32, BF16, F16):
        for op in FEATURE_OPS:
            has_alpha = op != "ste_forward"
            add(Case(op, dt, (2, 3, 4, 5), alpha="s32"))
            add(Case(op, dt, (3, 2, 3, 5), layout="cl_host", alpha="ps" if has_alpha else "s32",
                     seed_input="given" if op == "blend_multiply" else "none"))
            if op in BLEND_OPS:
                add(Case(op, dt, (2, 5, 7), layout="transpose", alpha="ps" if dt == F32 else "sbf",
                         avalue="over" if dt != F32 else "mid"))
            if dt != F32 and op in ("blend_add", "blend_multiply", "blend_gate", "ste_forward"):
                add(Case(op, dt, (2, 3, 4, 5), seed_dtype=F32, alpha="ps" if has_alpha else "s32",
                         seed_input="f32" if op == "blend_multiply" else "none",
                         gate="f32" if op == "blend_gate" else "host"))
        add(Case("blend_multiply", dt, (2, 3, 4, 5), alpha="s32", seed_input="h"))
        add(Case("gate_effective_alpha", dt, (4, 1, 1, 1), alpha="s32", gate="ps"))
        add(Case("gate_effective_alpha", dt, (4, 1, 1), alpha="ps", gate="ps"))
        for op in ("gated_pool", "gate_network"):
            add(Case(op, dt, (2, 5, 3, 4), topology="cnn"))
            add(Case(op, dt, (2, 5, 3, 4), topology="cnn", layout="cl"))
            add(Case(op, dt, (2, 7, 12), topology="transformer", layout="slice"))
    cases += scalar_cases((F32, BF16), full=False)
    cases += esper_cases(shapes=((3, 5, 7, 11),), dtypes=(F32, BF16, F16))
    # mixed layouts the other way round (NCHW host, channels_last seed and seed_input) and a
    # shape whose C and H*W are multiples of no block side, every gradient
    for dt in (F32, BF16):
        for op in BLEND_OPS + ("ste_forward",):
            has_alpha = op != "ste_forward"
            add(Case(op, dt, (2, 9, 5, 7), layout="cl_seed", alpha="psh" if has_alpha else "s32",
                     seed_input="given" if op == "blend_multiply" else "none"))
            add(Case(op, dt, (2, 9, 5, 7), layout="cl_host", alpha="sh" if has_alpha else "s32",
                     seed_input="given" if op == "blend_multiply" else "none"))
    return _dedupe(cases)


def _dedupe(cases: list[Case]) -> list[Case]:
    seen: dict[str, Case] = {}
    for c in cases:
        seen.setdefault(c.id, c)
    return list(seen.values())


def cases_for(backend: str) -> list[Case]:
    """The equivalence cases `backend` runs on TEST_DEVICE tensors."""
    slow = backend in SLOW_BACKENDS and TEST_DEVICE.type == "cpu"
    if slow or os.environ.get("KASMINA_TEST_REDUCED") == "1":
        return reduced_cases()
    return full_cases() + big_cases()


def backends_under_test() -> list[tuple[str, str | None]]:
    """Every non-reference backend with None (runs on TEST_DEVICE here) or the reason it
    cannot."""
    out = []
    for name in kk.BACKENDS:
        if name == "reference":
            continue
        out.append((name, backend_status(name, TEST_DEVICE.type)))
    return out


# ----------------------------------------------------------------------------- inputs
# Built from the package's input makers (`kasmina_kernels.opcases`): the matrix adds layouts,
# weight forms, special values, aliasing and mixed dtypes.
def _randn(shape, gen, dtype, scale=1.0):
    return randn(shape, dtype, TEST_DEVICE, gen, scale)


def _uniform(shape, gen, lo, hi):
    return torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo


def _feature(shape, dtype, layout, role, gen):
    """A random feature tensor laid out as `layout` prescribes for `role` ("h" or "s").

    Besides the layouts of the matrix: "expand" repeats one sample along dim 0 (stride 0),
    "offset" starts 3 elements into its storage, "step" takes every third element of a wider
    last dimension from element 1 on (a strided view with a storage offset)."""
    shape = tuple(shape)
    rank = len(shape)
    if layout == "expand":
        return _randn((1,) + shape[1:], gen, dtype).expand(shape)
    if layout == "offset":
        return _randn((math.prod(shape) + 3,), gen, dtype)[3:].view(shape)
    if layout == "step":
        return _randn(shape[:-1] + (3 * shape[-1] + 1,), gen, dtype)[..., 1::3]
    cl = (layout == "cl") or (layout == "cl_host" and role == "h") or (layout == "cl_seed" and role == "s")
    if cl and rank == 4:
        return _randn(shape, gen, dtype).contiguous(memory_format=torch.channels_last)
    if layout == "slice":
        if rank == 1:
            return _randn((shape[0] * 2,), gen, dtype)[::2]
        return _randn((shape[0], shape[1] * 2) + shape[2:], gen, dtype)[:, ::2]
    if layout == "transpose" and rank >= 2:
        return _randn(shape[:-2] + (shape[-1], shape[-2]), gen, dtype).transpose(-1, -2)
    return _randn(shape, gen, dtype)


_SCALAR_VALUES = {"zero": 0.0, "one": 1.0, "neg": -0.3, "over": 1.7}


def _scalar_value(avalue, gen):
    if avalue == "mid":
        return float(_uniform((), gen, 0.05, 0.95))
    return _SCALAR_VALUES[avalue]


def _weight_shape(form: str, shape) -> tuple:
    """The shape of a non-0-dim blend weight of `form` over features of `shape`."""
    if form in ("ps", "psh"):
        return per_sample(shape)
    if form == "bc":  # a general broadcast: (1, C, 1, ...)
        return (1, shape[1]) + (1,) * (len(shape) - 2) if len(shape) >= 2 else (1,)
    if form == "vec":  # trailing-dim vector
        return (shape[-1],)
    if form in ("full", "fullh"):
        return tuple(shape)
    raise AssertionError(form)


def _alpha(case: Case, shape, gen) -> torch.Tensor:
    form, host = case.alpha, case.dtype
    if form in ("s32", "sbf", "s16", "sh", "s64"):
        dt = {"s32": F32, "sbf": BF16, "s16": F16, "sh": host, "s64": F64}[form]
        device = TEST_DEVICE if form == "sh" else "cpu"
        return torch.tensor(_scalar_value(case.avalue, gen), dtype=dt, device=device)
    if form == "int":
        return torch.tensor(int(_scalar_value(case.avalue, gen)), dtype=torch.int64)
    dt = host if form in ("psh", "fullh") else F32
    return blend_weights(_weight_shape(form, shape), gen).to(TEST_DEVICE, dt)


def _gate(case: Case, shape, gen, dtype, form) -> torch.Tensor:
    if form == "scalar":
        return torch.tensor(float(_uniform((), gen, -0.2, 1.2)), dtype=dtype, device=TEST_DEVICE)
    return blend_weights(_weight_shape(form, shape), gen).to(TEST_DEVICE, dtype)


def _plant_specials(t: torch.Tensor, gen, values) -> None:
    if t.numel() == 0:
        return
    for v in values:
        idx = tuple(int(torch.randint(0, n, (), generator=gen)) for n in t.shape)
        t[idx] = v


def inputs(case: Case) -> dict:
    """The case's inputs by name, built on the CPU, then moved to `case.device`."""
    leaves = _inputs_on_cpu(case)
    return leaves if case.device == "cpu" else _moved(leaves, case.device, keep_cpu_scalars=case.host_scalars)


def _moved(leaves: dict, device: str, *, keep_cpu_scalars: bool) -> dict:
    """The leaves on `device` with the same sizes, strides, storage offsets and aliasing
    (their whole storage is copied, then viewed as before)."""
    made: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in leaves.items():
        if not isinstance(t, torch.Tensor) or (keep_cpu_scalars and t.dim() == 0):
            out[name] = t
            continue
        if id(t) not in made:
            storage = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
            made[id(t)] = storage.to(device).as_strided(t.shape, t.stride(), t.storage_offset())
        out[name] = made[id(t)]
    return out


def _inputs_on_cpu(case: Case) -> dict:
    gen = case_generator(case.id)
    op, dt, shape = case.op, case.dtype, case.shape
    if op == "multiply_valve_multiplier":
        m = _feature(shape, dt, case.layout, "h", gen)
        alpha = _alpha(case, shape, gen)
        if case.specials:
            _plant_specials(m, gen, (float("nan"), float("inf"), float("-inf")))
        return {"alpha": alpha, "m": m}
    if op in FEATURE_OPS:
        h = _feature(shape, dt, case.layout, "h", gen)
        seed_layout = case.seed_layout or case.layout
        s = h if case.alias else _feature(shape, case.seed_dtype or dt, seed_layout, "s", gen)
        if case.specials:
            _plant_specials(h, gen, (float("nan"), float("inf")))
            if not case.alias:
                _plant_specials(s, gen, (float("nan"), float("inf"), float("-inf")))
        leaves = {"h": h, "s": s}
        if op != "ste_forward":
            leaves["alpha"] = _alpha(case, shape, gen)
        if op == "blend_gate":
            leaves["gate"] = _gate(case, shape, gen, F32 if case.gate == "f32" else dt, case.gate_form)
        if op == "blend_multiply":
            r = {"none": None, "h": h, "s": s}.get(case.seed_input)
            if case.seed_input in ("given", "f32"):
                r = _feature(shape, F32 if case.seed_input == "f32" else case.seed_dtype or dt,
                             seed_layout, "s", gen)
            leaves["seed_input"] = r
        return leaves
    if op == "gate_effective_alpha":
        gate = _gate(case, shape, gen, dt, "scalar" if case.gate == "scalar" else "full")
        alpha = _alpha(case, shape, gen)
        if case.specials:
            _plant_specials(gate, gen, (float("nan"),))
            if alpha.is_floating_point() and alpha.dim():
                _plant_specials(alpha, gen, (float("inf"),))
        return {"alpha": alpha, "gate": gate}
    if op in ("gated_pool", "gate_network"):
        x = _feature(shape, dt, case.layout, "h", gen)
        if case.specials:
            _plant_specials(x, gen, (float("nan"),) if op == "gated_pool" else (float("inf"),))
        leaves = {"x": x, "topology": case.topology}
        if op == "gate_network":
            channels = shape[1] if case.topology == "cnn" else shape[2]
            leaves.update(zip(("w1", "b1", "w2", "b2"),
                              gate_weights(channels, case.seed_dtype or dt, TEST_DEVICE, gen)))
        return leaves
    raise AssertionError(op)


def _requires(case: Case, leaves: dict) -> tuple:
    if case.mode == "inference" or case.grads == "none":
        return ()
    floats = [n for n, t in leaves.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if case.grads == "all":
        return tuple(floats)
    if case.grads == "weights":
        return ("w1", "b1", "w2", "b2")
    # a name or a subset, e.g. "h+alpha"; "r" (in case ids) is MULTIPLY's seed_input
    names = tuple("seed_input" if n == "r" else n for n in case.grads.split("+"))
    assert set(names) <= set(floats), (case.id, names, floats)
    return names


# ----------------------------------------------------------------------------- running
def kernel_fn(op: str, backend: str):
    return functools.partial(getattr(kk, op), backend=backend)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and values bit for bit (NaN matches NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def under_autocast(fn, device: str, dtype: torch.dtype | None):
    """`fn` called inside torch.autocast(device, dtype) (unchanged when dtype is None)."""
    if dtype is None:
        return fn

    def wrapped(*args, **kwargs):
        with torch.autocast(device_type=device, dtype=dtype):
            return fn(*args, **kwargs)

    return wrapped


def case_check(case: Case) -> Check:
    """The case's inputs with the reference's and the oracle's outputs on them (both under
    the case's autocast, if any, which leaves the oracle's float64 alone); the incoming
    gradient is drawn from the case id, laid out like the output."""
    op, leaves = BY_NAME[case.op], inputs(case)
    ref_fn = under_autocast(op.reference, case.device, case.autocast)
    with torch.no_grad():
        y0 = op.call(ref_fn, leaves)
    g = _randn(y0.shape, case_generator(case.id + "/grad"), y0.dtype).to(y0.device)
    if y0.dim() == 4 and y0.is_contiguous(memory_format=torch.channels_last) and not y0.is_contiguous():
        g = g.contiguous(memory_format=torch.channels_last)
    requires, inference = _requires(case, leaves), case.mode == "inference"
    return Check.on(op, leaves, requires=requires, grad=g, ref_fn=ref_fn, inference=inference,
                    oracle=make_oracle(case, leaves, requires, g))


def run_case(backend: str, case: Case) -> None:
    """Runs `case` through `backend` (under the case's autocast, if any) and judges it by the
    equivalence rule against the reference and the oracle (`case_check`)."""
    check = case_check(case)
    before = {n: t.detach().clone() for n, t in check.leaves.items() if isinstance(t, torch.Tensor)}
    kern = check.run(under_autocast(kernel_fn(case.op, backend), case.device, case.autocast))
    for n, t in before.items():
        assert same_bits(check.leaves[n], t), f"{case.id}: the {backend} kernel wrote into input {n!r}"
    _assert_no_output_shares_an_input(case, backend, kern, check.leaves)
    assert_verdicts(check.judge(kern), f"[{backend}] {case.id}: " + describe_inputs(check.leaves))


def _assert_no_output_shares_an_input(case: Case, backend: str, outputs: dict, leaves: dict) -> None:
    """An output or gradient that is a view of an input would let the caller write into
    that input through it (docs/semantics.md#operators: no op writes into an input)."""
    for name, out in outputs.items():
        if not isinstance(out, torch.Tensor) or out.numel() == 0:
            continue
        for leaf_name, leaf in leaves.items():
            if isinstance(leaf, torch.Tensor) and leaf.numel() and \
                    out.untyped_storage().data_ptr() == leaf.untyped_storage().data_ptr():
                raise AssertionError(f"[{backend}] {case.id}: output {name!r} shares storage with input {leaf_name!r}")


def make_oracle(case: Case, leaves: dict, requires: tuple, g: torch.Tensor) -> dict | None:
    """For float64 cases the long-double oracle (see equivalence.py); None (`Check`'s float64
    oracle) otherwise."""
    if case.dtype != F64:
        return None
    return longdouble_oracle(case.op, leaves, requires, g, topology=case.topology,
                             inference=case.mode == "inference")


def describe_inputs(leaves: dict) -> str:
    parts = []
    for n, t in leaves.items():
        if isinstance(t, torch.Tensor):
            parts.append(f"{n}={tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}:stride{t.stride()}")
        else:
            parts.append(f"{n}={t!r}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- params
def backend_params(*, include_reference: bool = False):
    """pytest params for every backend: available ones run, the others are skipped with the
    reason `backend_status` gives (so CI shows why, e.g. Triton without TRITON_INTERPRET)."""
    import pytest

    params = []
    for name in kk.BACKENDS:
        if name == "reference" and not include_reference:
            continue
        why = backend_status(name, TEST_DEVICE.type)
        if why is None:
            params.append(pytest.param(name, id=name))
        else:
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(
                reason=f"backend {name!r} cannot run on {TEST_DEVICE.type} here: {why}")))
    return params


def device_status(backend: str, device: str) -> str | None:
    """Why `backend` cannot run on `device` in this process (None when it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return backend_status(backend, device)


def backend_device_params(devices=("cpu", "cuda")):
    """pytest params (backend, device) for every fused backend on each device; those that
    cannot run here are skipped with the reason (e.g. no GPU, Triton without its interpreter)."""
    import pytest

    params = []
    for device in devices:
        for name in kk.BACKENDS:
            if name == "reference":
                continue
            why = device_status(name, device)
            marks = [] if why is None else [
                pytest.mark.skip(reason=f"backend {name!r} cannot run on {device} here: {why}")]
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params
