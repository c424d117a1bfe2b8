"""Bytes that must cross memory per call: docs/semantics.md#performance-model, and the counts
derived by the same rule for the other ops (docs/benchmarks.md#byte-counts)."""

from __future__ import annotations

# op: (forward, backward multiples of N*e, index of the feature argument, counts from the
# performance model rather than derived)
TRAFFIC = {
    "blend_add": (3, 5, 0, True),
    "blend_with_isolation": (3, 5, 0, False),
    "blend_gate": (3, 5, 0, True),
    "blend_multiply": (3, 5, 0, True),  # r is h; with a seed input see `traffic`
    "ste_forward": (3, 3, 0, False),
    "multiply_valve_multiplier": (2, 3, 1, False),
    "gate_effective_alpha": (3, 5, 0, False),
    "gated_pool": (1, 1, 0, True),
    "gate_network": (1, 1, 0, False),
}
# (op, backend, device type) whose backward writes a stride-0 dx, fewer bytes than counted: their
# backward GB/s may exceed a copy's without that being an artefact
BACKWARD_OVERSTATED = {("gated_pool", "native", "cpu"), ("gate_network", "native", "cpu")}


def overstated(op: str, impl: str, device_type: str, mode: str) -> bool:
    """True when the byte count of `mode` over-states what `impl` moves: BACKWARD_OVERSTATED, and
    the straight-through estimator's backward everywhere (it hands the gradient on as dh, ds)."""
    return mode != "forward" and (op == "ste_forward" or (op, impl, device_type) in BACKWARD_OVERSTATED)


def traffic(op: str, args: list, kwargs: dict, no_grad: frozenset = frozenset()):
    """(feature tensor, forward bytes, backward bytes, counts from the performance model) of
    one call; `no_grad`: argument names passed without grad."""
    forward, backward, operand, from_design = TRAFFIC[op]
    if op == "blend_multiply" and kwargs.get("seed_input") is not None:
        forward, backward = 4, 7
        if "seed_input" in no_grad:
            backward, from_design = 6, False
    elif (op in ("blend_add", "blend_with_isolation") and "alpha" in no_grad
          or op == "blend_gate" and {"alpha", "gate"} <= no_grad):
        backward = 3
    x = args[operand]
    ne = x.numel() * x.element_size()
    return x, forward * ne, backward * ne, from_design
