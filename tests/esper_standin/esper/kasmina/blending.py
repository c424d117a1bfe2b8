"""Stand-in for esper.kasmina.blending: the eager GatedBlend and the BlendCatalog."""

import torch
from torch import nn


class LinearBlend(nn.Module):
    algorithm_id = "linear"

    def __init__(self, total_steps: int = 10, **_):
        super().__init__()
        self.total_steps = total_steps


class GatedBlend(nn.Module):
    algorithm_id = "gated"

    def __init__(self, channels: int, topology: str = "cnn", total_steps: int = 10):
        super().__init__()
        self.channels, self.topology, self.total_steps = channels, topology, total_steps
        self._current_step = 0
        hidden = max(8, channels // 4)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def get_alpha_for_blend(self, x: torch.Tensor) -> torch.Tensor:
        if self.topology == "cnn":
            assert x.dim() == 4, f"CNN topology expects 4D input, got {x.dim()}D"
            return self.gate(x.mean(dim=(2, 3))).view(-1, 1, 1, 1)
        assert x.dim() == 3, f"Transformer topology expects 3D input, got {x.dim()}D"
        return self.gate(x.mean(dim=1)).view(-1, 1, 1)


class BlendCatalog:
    _algorithms = {"linear": LinearBlend, "gated": GatedBlend}

    @classmethod
    def create(cls, name: str, **kwargs):
        return cls._algorithms[name](**kwargs)
