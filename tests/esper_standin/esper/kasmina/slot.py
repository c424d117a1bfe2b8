"""Stand-in for esper.kasmina.slot: binds the blend functions with from-imports, and
rebuilds its GatedBlend through the catalog when a checkpoint is loaded."""

import torch
from torch import nn

from esper.kasmina.blend_ops import blend_add, blend_gate, blend_multiply
from esper.kasmina.blending import BlendCatalog
from esper.kasmina.isolation import blend_with_isolation, ste_forward


class SeedSlot(nn.Module):
    def __init__(self, channels: int, mode: str = "gate"):
        super().__init__()
        self.channels, self.mode = channels, mode
        self.seed = nn.Conv2d(channels, channels, 1)
        self.alpha_schedule = BlendCatalog.create("gated", channels=channels, topology="cnn")
        self.register_buffer("alpha", torch.tensor(0.4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = h.detach() if h.is_contiguous() else h.contiguous().detach()
        s = self.seed(r)
        if self.mode == "add":
            return blend_add(h, s, self.alpha)
        if self.mode == "multiply":
            return blend_multiply(h, s, self.alpha, seed_input=r)
        if self.mode == "isolation":
            return blend_with_isolation(h, s, self.alpha)
        if self.mode == "ste":
            return ste_forward(h, s)
        return blend_gate(h, s, self.alpha, self.alpha_schedule.get_alpha_for_blend(r))

    def get_extra_state(self):
        return {"algorithm": "gated", "channels": self.channels}

    def set_extra_state(self, state):
        # as Esper does on a checkpoint load: build the blend algorithm again by name
        self.alpha_schedule = BlendCatalog.create(state["algorithm"], channels=state["channels"], topology="cnn")
