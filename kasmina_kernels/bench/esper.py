"""Esper's calls (docs/semantics.md#espers-calls): each blend op's inputs as Esper's
`SeedSlot.forward` passes them, for the first section of the benchmark report. The
`alpha_override` form reads the batch as K=2 configurations of batch/2 samples. Under bf16
autocast the features, seed input and gate are bfloat16 (what autocast's layers produce), alpha
a float32 0-dim buffer (the module's own dtype), and every call runs inside `torch.autocast`.
"""

from __future__ import annotations

import torch

from .. import opcases

SHAPES = ((128, 16, 16, 16), (512, 8, 32, 32), (512, 32, 8, 8), (32, 256, 384))
QUICK_SHAPES = ((128, 16, 16, 16),)
OPS = ("blend_add", "blend_multiply", "blend_gate", "ste_forward")
OVERRIDE_OPS = ("blend_add", "blend_multiply", "blend_gate")
OVERRIDE_K = 2
AUTOCAST = "bfloat16-autocast"  # the dtype name of the autocast entries
PATTERNS = {"esper": "0-dim", "esper_override": "(K*B,1,...)"}  # input pattern: alpha's shape
NO_GRAD = frozenset(("alpha", "seed_input"))  # arguments Esper passes without requires_grad


def make_inputs(op: str, pattern: str, shape, dtype: torch.dtype, device, gen, *,
                autocast: bool = False) -> tuple[list, dict]:
    """(args, kwargs) of `op` as Esper passes them: channels_last CNN host, NCHW seed and seed
    input; (B,T,C) all contiguous. Values are random, never zero: alpha in
    [0.1, 0.9] (a scheduled amplitude), gate in (0.05, 0.95)."""
    if op not in OPS or pattern not in PATTERNS:
        raise ValueError(f"no Esper pattern {pattern!r} for {op!r}: expected one of "
                         f"{', '.join(PATTERNS)} for one of {', '.join(OPS)}")

    def uniform(size, lo, hi, dt=dtype):
        return (torch.rand(size, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(device, dt)

    h = opcases.randn(shape, dtype, device, gen)
    if len(shape) == 4:
        h = h.contiguous(memory_format=torch.channels_last)
    s = opcases.randn(shape, dtype, device, gen)  # NCHW: a seed fed the contiguous copy r
    per_sample = opcases.per_sample(shape)
    alpha = uniform(per_sample if pattern == "esper_override" else (), 0.1, 0.9,
                    torch.float32 if autocast else dtype)
    if op == "ste_forward":
        return [h, s], {}
    if op == "blend_gate":
        return [h, s, alpha, uniform(per_sample, 0.05, 0.95)], {}
    # blend_multiply's seed input: Esper's isolation, an NCHW copy
    return [h, s, alpha], {"seed_input": h.contiguous()} if op == "blend_multiply" else {}


def layout(t: torch.Tensor) -> str:
    """"0-dim", "contiguous" (NCHW for 4-D), "channels_last", or "strided" for anything else."""
    if t.dim() == 0:
        return "0-dim"
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def describe(named: dict) -> dict:
    """{input name: {"shape", "dtype", "layout", "requires_grad"}} of one input set as built
    (the incoming gradient as "grad"): what the report states under each table."""
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                   "layout": layout(t), "requires_grad": t.requires_grad}
            for name, t in named.items() if isinstance(t, torch.Tensor)}
