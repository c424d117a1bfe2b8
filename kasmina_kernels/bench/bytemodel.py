"""Bytes that must cross memory per call: docs/semantics.md#performance-model.

Each op's traffic is a multiple of its feature tensor's size N*e (N elements of e bytes);
per-sample weights (alpha, gate: B elements) are left out. Forward+backward here means the
backward that produces the gradient of every input that requires grad: every input in the
op-isolation entries; in Esper's calls alpha and seed_input need none (see `traffic`).

Counts the performance model gives: ADD/GATE 3 forward, 5 backward; MULTIPLY with a seed input 4 and 7
(3 and 5 when r is h); pool 1 and 1. Counts derived here by the same rule (read every operand
once, write every result once) for the ops the performance model does not list: the isolation blend is ADD;
the straight-through estimator reads h and s and writes y (3), backward reads g and writes dh
and ds (3); the valve reads m and writes the multiplier (2), backward reads g and m and writes
dm (3); the gate network is its pooling (1 and 1: the MLP on (B, C) is negligible);
`gate_effective_alpha` works on per-sample tensors only, so its "feature" is alpha itself
(3 and 5) and its figures are latency, not bandwidth.

The pool's backward count (write dx: N) is the floor for a dense dx. The native CPU kernels
return dx as a stride-0 broadcast of the (B, C) values instead (the report says so), so their
backward GB/s for the pool and the gate network count a write they do not do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Traffic:
    forward: int  # multiples of N*e
    backward: int
    operand: int  # index of the argument that is the feature tensor
    from_design: bool  # counts given by docs/semantics.md#performance-model (else derived, see module doc)


_TRAFFIC = {
    "blend_add": Traffic(3, 5, 0, True),
    "blend_with_isolation": Traffic(3, 5, 0, False),
    "blend_gate": Traffic(3, 5, 0, True),
    "ste_forward": Traffic(3, 3, 0, False),
    "multiply_valve_multiplier": Traffic(2, 3, 1, False),
    "gate_effective_alpha": Traffic(3, 5, 0, False),
    "gated_pool": Traffic(1, 1, 0, True),
    "gate_network": Traffic(1, 1, 0, False),
}

# (op, backend, device type) whose backward moves fewer bytes than the count above says (the
# stride-0 dx of the module doc): their backward GB/s may exceed a copy's without that being
# a timing artefact
BACKWARD_OVERSTATED = {("gated_pool", "native", "cpu"), ("gate_network", "native", "cpu")}


def overstated(op: str, impl: str, device_type: str, mode: str) -> bool:
    """True when the byte count of `mode` over-states what `impl` moves (BACKWARD_OVERSTATED;
    and the straight-through estimator's backward everywhere: every implementation, eager's
    autograd included, hands the incoming gradient on as dh and ds, moving no feature bytes
    when the seed has the host's dtype)."""
    if mode != "forward" and op == "ste_forward":
        return True
    return mode != "forward" and (op, impl, device_type) in BACKWARD_OVERSTATED


# ops whose figures are about bandwidth at large sizes (the size sweep and GB/s plots)
BANDWIDTH_OPS = ("blend_add", "blend_multiply", "blend_gate", "gated_pool")


def traffic(op: str, kwargs: dict, no_grad: frozenset = frozenset()) -> Traffic:
    """`no_grad`: argument names passed without grad ("alpha", "seed_input", "gate"). With
    neither alpha nor gate needing a gradient, ADD/GATE's backward needs only g (read g, write
    dh, ds: 3, the performance model's figure); MULTIPLY with a seed input that needs no gradient does not
    write dr (6, derived)."""
    if op == "blend_multiply":
        with_seed = kwargs.get("seed_input") is not None
        if with_seed and "seed_input" in no_grad:
            return Traffic(4, 6, 0, False)
        return Traffic(4 if with_seed else 3, 7 if with_seed else 5, 0, True)
    t = _TRAFFIC[op]
    if op in ("blend_add", "blend_with_isolation") and "alpha" in no_grad:
        return Traffic(t.forward, 3, t.operand, t.from_design)
    if op == "blend_gate" and {"alpha", "gate"} <= no_grad:
        return Traffic(t.forward, 3, t.operand, t.from_design)
    return t


def feature(op: str, args: list, kwargs: dict) -> torch.Tensor:
    return args[traffic(op, kwargs).operand]


def bytes_moved(op: str, args: list, kwargs: dict, no_grad: frozenset = frozenset()) -> tuple[int, int]:
    """(forward bytes, backward bytes) that must cross memory for one call."""
    t = traffic(op, kwargs, no_grad)
    x = args[t.operand]
    ne = x.numel() * x.element_size()
    return t.forward * ne, t.backward * ne


def copy_bytes(x: torch.Tensor) -> int:
    """A same-size device copy reads and writes the tensor once."""
    return 2 * x.numel() * x.element_size()
