"""What a benchmark run covers: ops, dtypes, shapes, the size sweep, and the timing effort, for
the full run and for `--quick`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import optable
from . import esper
from .timing import MIN_ROUNDS

ESPER_SHAPES = ((512, 8, 32, 32), (512, 32, 8, 8), (512, 16, 32, 32), (32, 256, 384))
SMALL_SHAPES = ((8, 64, 16, 16),)
QUICK_ESPER_SHAPE = (32, 256, 384)  # the smallest of Esper's shapes (3.1M elements)
ALL_OPS = optable.NAMES
# the headline ops, also the ops of the size sweep: their figures are about bandwidth at large sizes
HEADLINE_OPS = ("blend_add", "blend_multiply", "blend_gate", "gated_pool")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ESPER_GROUP = "esper-call"  # the group of Esper's calls
NAMED_GROUPS = ("esper", "small")  # the op-isolation entries at Esper's and the small shape

# size sweep: (B, 16, 16, 16), B a power of two; the top is bandwidth-bound (16 MiB per float32
# tensor on CPU, several inputs of it beyond the last-level cache; 128 MiB on GPU, an op's
# inputs and outputs together several times the 50 MB L2 of an H100)
SWEEP_INNER = (16, 16, 16)
SWEEP_LOG2_NUMEL = {"cpu": (14, 16, 18, 20, 22), "cuda": (18, 20, 22, 24, 25)}
QUICK_SWEEP_LOG2_NUMEL = {"cpu": (16, 20), "cuda": (16, 20, 24)}


def default_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass(frozen=True)
class Entry:
    op: str
    shape: tuple[int, ...]
    dtype: str
    group: str  # "esper-call" (Esper's calls, first in the report), "esper", "small" or "sweep"
    compile_peer: bool = True  # time torch.compile of the reference here
    compile_dynamic: bool = False  # compile with dynamic shapes, once per (op, dtype)
    pattern: str = "isolated"  # inputs: "isolated" (all require grad) or an esper.PATTERNS key

    @property
    def name(self) -> str:
        return entry_name(vars(self))


def entry_name(e: dict) -> str:
    """An entry's (or its record's) name in progress lines and the report: op, shape, dtype and
    the input pattern where it is not the isolated one."""
    pattern = e.get("pattern", "isolated")
    shape = "(" + ",".join(str(v) for v in e["shape"]) + ")"
    return f"{e['op']} {shape} {e['dtype']}" + ("" if pattern == "isolated" else f" ({pattern})")


@dataclass
class Effort:
    rounds: int
    budget_s: float  # timed seconds per step (candidate x mode)
    calls: int  # calls per batch for the per-call wall time
    call_rounds: int
    kernel_iters: int = 5  # CUDA: profiled runs per step for the device-busy (kernel) time


@dataclass
class Plan:
    entries: list[Entry]
    effort: Effort
    notes: list[str] = field(default_factory=list)


def make_plan(device: torch.device, *, quick: bool, ops: list[str] | None,
              dtypes: list[str] | None, esper_only: bool = False) -> Plan:
    dtypes = dtypes or (["float32"] if quick else ["float32", "bfloat16"])
    # Esper's calls (esper.py) first: the 0-dim alpha form, then the alpha_override form;
    # bf16 autocast joins bfloat16 on CUDA
    esper_dtypes = [d for d in dtypes if d in ("float32", "bfloat16", esper.AUTOCAST)]
    if device.type == "cuda" and "bfloat16" in esper_dtypes and esper.AUTOCAST not in esper_dtypes:
        esper_dtypes.append(esper.AUTOCAST)
    first = [Entry(op, shape, dt, ESPER_GROUP, pattern=pattern)
             for pattern, esper_ops in (("esper", esper.OPS), ("esper_override", esper.OVERRIDE_OPS))
             for dt in esper_dtypes for shape in (esper.QUICK_SHAPES if quick else esper.SHAPES)
             for op in esper_ops if not ops or op in ops]
    notes = []
    if quick:
        notes.append("--quick: Esper's calls in float32 at " + ", ".join(
            str(s) for s in esper.QUICK_SHAPES) + " only (the full run: all four of Esper's "
            "shapes, float32 and bfloat16, and bf16 autocast on CUDA).")
    notes.append(f"Esper's calls, alpha_override form: alpha of shape (K*B,1,1,1) ((K*B,1,1) "
                 f"for (B,T,C)) without grad, K={esper.OVERRIDE_K} configurations of "
                 f"B = batch/{esper.OVERRIDE_K} samples (e.g. K=2 at B=64 for (128,16,16,16)).")
    # on GPU a call takes microseconds: 30 ms of timed calls per step is hundreds of calls
    effort = (Effort(rounds=MIN_ROUNDS, budget_s=0.05, calls=20, call_rounds=5) if quick else
              Effort(rounds=MIN_ROUNDS, budget_s=0.3 if device.type == "cpu" else 0.03, calls=50, call_rounds=7))
    if esper_only:
        return Plan(first, effort, notes)
    ops = ops or list(HEADLINE_OPS if quick else ALL_OPS)
    dtypes = [d for d in dtypes if d in DTYPES]
    sizes = (QUICK_SWEEP_LOG2_NUMEL if quick else SWEEP_LOG2_NUMEL)[device.type]
    named = ([("small", SMALL_SHAPES[0]), ("esper", QUICK_ESPER_SHAPE)] if quick else
             [("esper", s) for s in ESPER_SHAPES] + [("small", s) for s in SMALL_SHAPES])
    if quick:
        notes.append(
            "--quick: ops " + ", ".join(ops) + "; dtypes " + ", ".join(dtypes) + "; shapes "
            + ", ".join(str(s) for _, s in named) + "; size sweep numel 2^"
            + ", 2^".join(str(k) for k in sizes) + " without the torch.compile peer; 5 rounds "
            "(torch.compile of every shape and the float64 check of Esper-sized outputs take "
            "seconds each on CPU; bench/README.md). The full run covers every op, float32 and "
            "bfloat16, all of Esper's shapes and the whole size sweep with torch.compile.")
    sweep_dynamic = not quick and device.type == "cuda"
    named_entries = [Entry(op, shape, dt, group) for dt in dtypes for group, shape in named for op in ops]
    # priority order, so that a --time-limit drops the least important entries: the headline
    # ops at the named shapes, then the size sweep, then the other ops at the named shapes
    entries = first + [e for e in named_entries if e.op in HEADLINE_OPS]
    entries += [Entry(op, ((1 << k) // math.prod(SWEEP_INNER),) + SWEEP_INNER, dt, "sweep",
                      not quick, sweep_dynamic)
                for dt in dtypes for k in sizes for op in ops if op in HEADLINE_OPS]
    entries += [e for e in named_entries if e.op not in HEADLINE_OPS]
    if sweep_dynamic:
        notes.append("size sweep on CUDA: torch.compile with dynamic=True, compiled once per op "
                     "and dtype and reused across sizes (compiling every size afresh does not fit "
                     "the GPU run's time); Esper's and the small shape are compiled per shape.")
    return Plan(entries, effort, notes)

