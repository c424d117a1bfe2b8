"""Bytes that must cross memory per call: docs/semantics.md#performance-model.

Each op's traffic is a multiple of its feature tensor's size N*e (N elements of e bytes);
per-sample weights (alpha, gate: B elements) are left out. Forward+backward means the backward
that produces the gradient of every input that requires grad: every input in the op-isolation
entries; in Esper's calls alpha and seed_input need none.

Counts the performance model gives: ADD/GATE 3 forward, 5 backward (3 when neither alpha nor
gate needs a gradient: read g, write dh, ds); MULTIPLY with a seed input 4 and 7 (3 and 5 when
r is h); pool 1 and 1. Counts derived by the same rule (read every operand once, write every
result once) for the others: the isolation blend is ADD; MULTIPLY with a seed input that needs
no gradient does not write dr (6); the straight-through estimator reads h and s and writes y
(3), backward reads g and writes dh and ds (3); the valve reads m and writes the multiplier
(2), backward reads g and m and writes dm (3); the gate network is its pooling (the MLP on
(B, C) is negligible); `gate_effective_alpha` works on per-sample tensors only, so its
"feature" is alpha itself (3 and 5) and its figures are latency, not bandwidth.

The pool's backward count (write dx: N) is the floor for a dense dx. The native CPU kernels
return dx as a stride-0 broadcast of the (B, C) values instead (the report says so), so their
backward GB/s for the pool and the gate network count a write they do not do.
"""

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
# (op, backend, device type) whose backward moves fewer bytes than counted (the stride-0 dx of
# the module doc): their backward GB/s may exceed a copy's without that being an artefact
BACKWARD_OVERSTATED = {("gated_pool", "native", "cpu"), ("gate_network", "native", "cpu")}
# ops whose figures are about bandwidth at large sizes (the size sweep and GB/s plots)
BANDWIDTH_OPS = ("blend_add", "blend_multiply", "blend_gate", "gated_pool")


def overstated(op: str, impl: str, device_type: str, mode: str) -> bool:
    """True when the byte count of `mode` over-states what `impl` moves (BACKWARD_OVERSTATED;
    and the straight-through estimator's backward everywhere: every implementation, eager's
    autograd included, hands the incoming gradient on as dh and ds, moving no feature bytes
    when the seed has the host's dtype)."""
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
