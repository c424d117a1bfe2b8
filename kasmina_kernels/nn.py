"""Drop-in for Esper's `GatedBlend` (`kasmina.blending`): the learned per-sample gate that
feeds the GATE blend, its forward computed by the fused `gate_network` op.

`GatedBlend` keeps Esper's constructor, errors, attributes and submodule ``gate``
(``Linear(C, max(8, C // 4)), ReLU, Linear(hidden, 1), Sigmoid``), so ``state_dict`` keys are
the same and checkpoints load either way with ``strict=True``. `EagerGatedBlend` computes the
same gate the eager way: what the fused one is tested against. Neither keeps a cache or any
global state: every call reads the module's current parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops, reference
from .validation import DECLINED, TOPOLOGIES, autocast_enabled, warn_eager_answer

__all__ = ["GatedBlend", "EagerGatedBlend"]


class GatedBlend(nn.Module):
    """Learned per-sample blend gate: ``sigmoid(W2 relu(W1 pool(x) + b1) + b2)``.

    ``pool`` is the mean over (H, W) of a ``(B, C, H, W)`` input (``topology="cnn"``) or over
    T of a ``(B, T, C)`` input (``"transformer"``). Calling the module returns the gate shaped
    ``(B, 1, 1, 1)`` or ``(B, 1, 1)``, the ``gate`` of ``blend_gate``, on the default backend.

    Raises ValueError for ``channels <= 0``, an unknown topology and ``total_steps <= 0``. An
    input fails as in Esper's module, with the same exception type and a clearer message: the
    wrong rank raises AssertionError (Esper's ``assert``), the wrong channel count RuntimeError
    (Esper's Linear), a non-tensor AttributeError. The fused gate network runs where it computes
    what calling ``gate`` would (a plain Linear, ReLU, Linear, Sigmoid with biases and no hooks)
    and Esper's Linear layers take the input (x and the parameters of one dtype, or autocast on
    x's device type and no float64 among them); anything else gets Esper's answer from its
    eager math: its error, or its gate with a warning that no fused kernel ran.
    """

    algorithm_id = "gated"

    def __init__(self, channels: int, topology: str = "cnn", total_steps: int = 10):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"GatedBlend requires channels > 0, got {channels}")
        if topology not in TOPOLOGIES:
            raise ValueError(f"Unknown topology {topology!r} for GatedBlend: expected 'cnn' or 'transformer'")
        if total_steps <= 0:
            raise ValueError(f"GatedBlend requires total_steps > 0, got {total_steps}")
        self.channels = channels
        self.topology = topology
        self.total_steps = total_steps
        self._current_step = 0
        hidden = reference.gate_hidden_size(channels)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def step(self, step: int) -> None:
        """Sets ``_current_step`` to ``step``, as Esper's ``BlendAlgorithm.step`` does (whatever
        the value). Only the slot's bookkeeping reads it, not the gate."""
        self._current_step = step

    def reset_cache(self) -> None:
        """Esper's interface (its blends cache alpha per thread); this module caches nothing."""

    def _check_input(self, x: torch.Tensor) -> None:
        """Esper's failures for x, with its exception types (see the class docstring)."""
        if not isinstance(x, torch.Tensor):
            raise AttributeError(f"{type(self).__name__}: x must be a torch.Tensor, got {type(x).__name__}")
        rank, channel_dim, _, layout, esper_name = TOPOLOGIES[self.topology]
        if x.dim() != rank:
            # the opening words of Esper's assert
            raise AssertionError(f"{esper_name} topology expects {rank}D input, got "
                                 f"{x.dim()}D of shape {tuple(x.shape)} ({type(self).__name__}(channels="
                                 f"{self.channels}, topology={self.topology!r}) takes {layout})")
        if x.shape[channel_dim] != self.channels:
            raise RuntimeError(f"{type(self).__name__}(channels={self.channels}, topology={self.topology!r}) "
                               f"expects x of shape {layout} with {self.channels} channels, "
                               f"got shape {tuple(x.shape)}")

    def _eager_answer(self, x: torch.Tensor, why) -> torch.Tensor:
        """Esper's gate for an input the fused gate network does not take (`why()` says why)."""
        gate = EagerGatedBlend.get_alpha_for_blend(self, x)
        warn_eager_answer(lambda: f"{type(self).__name__}: {why()}; the gate was computed with Esper's eager "
                                  "math, not the fused gate network", stacklevel=3)
        return gate

    def get_alpha_for_blend(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample gate for host features ``x``: ``(B,1,1,1)`` (cnn) or ``(B,1,1)``."""
        topology = self.topology
        rank, channel_dim, _, _, _ = TOPOLOGIES[topology]
        if not (isinstance(x, torch.Tensor) and x.ndim == rank and x.shape[channel_dim] == self.channels):
            self._check_input(x)  # raises the precise error
        layers = _plain_gate_layers(self.gate)
        if layers is None:
            return self._eager_answer(x, lambda: "its gate is not a plain Linear, ReLU, Linear, Sigmoid without hooks")
        (w1, b1), (w2, b2) = layers
        # the dtypes Esper's Linear layers take: autocast casts all but float64 operands
        dtypes = {x.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype}
        if autocast_enabled(x.device.type):
            linear_takes = torch.float64 not in dtypes
        else:
            linear_takes = len(dtypes) == 1
        if not linear_takes:
            return self._eager_answer(x, lambda: f"x and the gate's parameters have dtypes {sorted(map(str, dtypes))}")
        try:
            return ops.gate_network(x, w1, b1, w2, b2, topology=topology)
        except DECLINED as rejected:
            return self._eager_answer(x, lambda: str(rejected))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_alpha_for_blend(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, topology={self.topology!r}, total_steps={self.total_steps}"


def _plain_gate_layers(gate: nn.Module):
    """((w1, b1), (w2, b2)) of `gate` when the fused gate network computes exactly what calling
    it would: a Sequential of plain Linear, ReLU, Linear, Sigmoid modules with biases and no
    hooks; None for anything else there (a replaced, parametrized or hooked layer), which
    Esper's module calls as it is."""
    modules = gate._modules
    if type(gate) is not nn.Sequential or len(modules) != 4:
        return None
    first, relu, second, sigmoid = modules.values()
    if not (type(first) is nn.Linear and type(relu) is nn.ReLU and type(second) is nn.Linear
            and type(sigmoid) is nn.Sigmoid):
        return None
    for m in (gate, first, relu, second, sigmoid):
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return None
    # straight from the registries: nn.Module.__getattr__ costs as much as the fused op's Python side
    p1, p2 = first._parameters, second._parameters
    w1, b1, w2, b2 = p1["weight"], p1["bias"], p2["weight"], p2["bias"]
    return None if b1 is None or b2 is None else ((w1, b1), (w2, b2))


class EagerGatedBlend(GatedBlend):
    """`GatedBlend` computed eagerly as Esper does: pool with `reference.gated_pool`, call the
    ``gate`` Sequential, view per sample. Same parameters, checks and methods; what torch
    raises past the checks is what it raises in Esper's module."""

    def get_alpha_for_blend(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        pooled = reference.gated_pool(x, self.topology)
        return self.gate(pooled).view((-1,) + (1,) * (x.dim() - 1))  # one gate per sample
