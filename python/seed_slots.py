"""An Esper-style seed slot, written against the eager blend definitions.

Like Esper's ``kasmina.slot``, this module binds the blend functions and ``GatedBlend`` by name
when it is imported (here from `kasmina_kernels.reference` and `kasmina_kernels.nn`'s eager
module, which stand in for Esper's own). The examples run it as written for the eager baseline
and then with ``kk.swap_in(seed_slots)`` to run the same model on the fused backends.

A slot holds a seed module and one operator:

- ``"add"``: ``blend_with_isolation(host, seed(x), alpha)`` (Esper's ADD blend);
- ``"multiply"``: ``blend_multiply(host, seed(x), alpha, seed_input=x)``;
- ``"gate"``: ``blend_gate(host, seed(x), alpha, GatedBlend(host))``;
- ``"ste"``: ``ste_forward(host, seed(x))`` (a seed still training: output is the host's).

With isolation (the default) the seed's input ``x`` is ``host.detach()``, so no gradient
reaches the host through the seed. ``alpha`` ramps linearly from 0 to 1 over ``ramp_steps``
training steps (`advance_slots`).
"""

from __future__ import annotations

import torch
from torch import nn

from kasmina_kernels.nn import EagerGatedBlend as GatedBlend
from kasmina_kernels.reference import blend_gate, blend_multiply, blend_with_isolation, ste_forward

OPERATORS = ("add", "multiply", "gate", "ste")


class SeedSlot(nn.Module):
    def __init__(
        self,
        channels: int,
        seed: nn.Module,
        operator: str,
        *,
        topology: str = "cnn",
        ramp_steps: int = 10,
        isolate: bool = True,
    ):
        super().__init__()
        if operator not in OPERATORS:
            raise ValueError(f"unknown operator {operator!r}: expected one of {', '.join(OPERATORS)}")
        if ramp_steps <= 0:
            raise ValueError(f"ramp_steps must be > 0, got {ramp_steps}")
        self.operator = operator
        self.ramp_steps = ramp_steps
        self.isolate = isolate
        self.seed = seed
        self.register_buffer("alpha", torch.zeros(()))
        self.alpha_schedule = (
            GatedBlend(channels, topology=topology, total_steps=ramp_steps) if operator == "gate" else None
        )

    def advance(self, step: int) -> None:
        """Set alpha for training step `step` (0-based): ``min(1, (step + 1) / ramp_steps)``."""
        self.alpha.fill_(min(1.0, (step + 1) / self.ramp_steps))
        if self.alpha_schedule is not None:
            self.alpha_schedule.step(min(step + 1, self.ramp_steps))

    def forward(self, host: torch.Tensor) -> torch.Tensor:
        seed_input = host.detach() if self.isolate else host
        seed_features = self.seed(seed_input)
        if self.operator == "add":
            return blend_with_isolation(host, seed_features, self.alpha)
        if self.operator == "multiply":
            return blend_multiply(host, seed_features, self.alpha, seed_input=seed_input)
        if self.operator == "gate":
            gate = self.alpha_schedule.get_alpha_for_blend(host)
            return blend_gate(host, seed_features, self.alpha, gate)
        return ste_forward(host, seed_features)


def advance_slots(model: nn.Module, step: int) -> None:
    """Advance every SeedSlot in `model` to training step `step`."""
    for module in model.modules():
        if isinstance(module, SeedSlot):
            module.advance(step)
