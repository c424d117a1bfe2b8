"""The op table: every public op once, with what each layer needs to know about it.

The readers: `reference` and `ops` (their ``__all__``), `native` (the library's schemas and
fake kernels, from which the C++ autograd reads each op's backward convention), `triton` (its
ops' schemas, fake kernels, gradient order), `blend_ops`, `isolation` and `swap` (Esper's
drop-ins), `equivalence` (which outputs are computed in the host's dtype), `opcases` and the
tests' cases (inputs, gradients, elementwise outputs and reductions), the benchmark plan.

Names: an op's inputs are its schema's argument names (the public functions' parameter
names); its outputs are ``"y"`` (the forward) and ``"d<input>"`` (the gradient of an input).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .validation import TOPOLOGIES

__all__ = ["Op", "OPS", "NAMES", "BY_NAME", "drop_ins"]


@dataclass(frozen=True)
class Op:
    name: str
    schema: str  # the forward op's schema, as torch.library writes it
    backward: str  # its backward op's: (grad, the forward's inputs, need_<input>_grad flags)
    grads: tuple[str, ...]  # inputs that take gradients, in the order the backward returns them
    elementwise: frozenset[str]  # outputs judged elementwise (rule 1); the others are reductions,
                                 # judged by rule 2 with a sqrt(n) slack (`equivalence.reduction_terms`)
    kwonly: tuple[str, ...] = ()  # inputs the Python function takes by keyword only
    weights: tuple[str, ...] = ()  # inputs broadcast over the features: their gradients are sums
    pooled: tuple[str, ...] = ()  # inputs read through a mean over positions (the pool's x)
    host_dtype: bool = False  # feature outputs (y and the features' gradients) in the host's dtype
    cast_to_host: tuple[str, ...] = ("s", "seed_input")  # inputs the op first casts to h's dtype
    drop_in: str | None = None  # the Esper module (kasmina_kernels.<it>) whose drop-in it is
    kernel: str = ""  # the torch.ops.kasmina op that computes it (default: its own name)
    fake: Callable | None = None  # the forward's fake kernel, where it is not empty_like(input 0)
    # what the native CPU forward keeps for the backward: the backward schema's last argument
    # (optional, recomputed when absent), which kasmina::<op>_for_backward returns beside the
    # value, and its fake kernel (the native backend's autograd kernel runs that op when a
    # gradient is wanted)
    residual: str = ""
    residual_fake: Callable | None = None
    inputs: tuple[str, ...] = field(init=False)  # the schema's arguments, in order

    def __post_init__(self):
        object.__setattr__(self, "inputs", _arg_names(self.schema))
        object.__setattr__(self, "kernel", self.kernel or self.name)

    @property
    def need_flags(self) -> tuple[str, ...]:
        """Inputs whose gradient the backward op takes a ``need_<input>_grad`` flag for, in the
        backward schema's order."""
        return tuple(a[len("need_"):-len("_grad")] for a in _arg_names(self.backward)
                     if a.startswith("need_") and a.endswith("_grad")) if self.backward else ()

    @property
    def features(self) -> tuple[str, ...]:
        """Tensor inputs laid out like the host (their gradients too)."""
        return tuple(n for n in self.grads if n not in self.weights and n not in self.pooled)

    @property
    def reference(self) -> Callable:
        from . import reference

        return getattr(reference, self.name)

    @property
    def public(self) -> Callable:
        from . import ops

        return getattr(ops, self.name)

    def call(self, fn: Callable, values: dict):
        """`fn` (this op's reference, public function or a drop-in) on `values`, a dict by
        input name: the positional inputs in order, the keyword-only ones by keyword."""
        args = [values[n] for n in self.inputs if n not in self.kwonly]
        return fn(*args, **{n: values[n] for n in self.kwonly})

    def backward_fake(self, *args, dense_pooled=False):
        """The backward's fake kernel, mirroring the C++ kernels' allocations: feature
        gradients follow their input's layout (empty_like), weight gradients are contiguous in
        the weight's shape, an optional input absent or wanting no gradient gets an empty
        placeholder, the pooled input's gradient is `pooled_input_grad` (empty_like with
        `dense_pooled`, for the Triton kernels, which write a dense one on every device)."""
        a = dict(zip(_arg_names(self.backward), args))
        out = []
        for n in self.grads:
            t = a[n]
            if t is None or a.get(f"need_{n}_grad") is False and re.search(rf"Tensor\? {n}\b", self.schema):
                out.append(a[self.inputs[0]].new_empty((0,)))
            elif n in self.weights:
                out.append(t.new_empty(t.shape))
            elif n in self.pooled and not dense_pooled:
                out.append(pooled_input_grad(t, a["topology"]))
            else:
                out.append(torch.empty_like(t))
        return out[0] if len(out) == 1 else tuple(out)

    def forward_fake(self, *args):
        return self.fake(*args) if self.fake is not None else torch.empty_like(args[0])

    @property
    def for_backward(self) -> str:
        """The schema of kasmina::<op>_for_backward (the value and the residual), if it has one."""
        if not self.residual:
            return ""
        return f"{self.name}_for_backward{self.schema[len(self.name):self.schema.index('->')]}-> (Tensor, Tensor)"

    def for_backward_fake(self, *args):
        return self.forward_fake(*args), self.residual_fake(*args)


def _arg_names(schema: str) -> tuple[str, ...]:
    inside = schema[schema.index("(") + 1:schema.index(")")]
    return tuple(a.split("=")[0].split()[-1] for a in inside.split(","))


# ---------------------------------------------------------------------------- irregular fakes
def _valve_fake(alpha, m):
    return torch.empty_like(m, dtype=torch.result_type(alpha, m))


def _effective_alpha_fake(alpha, gate):
    # a 0-dim CPU scalar defers to the other operand's device
    device = gate.device if alpha.dim() == 0 and alpha.device.type == "cpu" else alpha.device
    shape = torch.broadcast_shapes(alpha.shape, gate.shape)
    return torch.empty(shape, dtype=torch.result_type(alpha, gate), device=device)


def _multiply_tanh_fake(h, s, alpha, seed_input):
    # the CPU kernels keep the tanh's complement for float32 hosts, in the value's layout
    return torch.empty_like(h) if h.dtype == torch.float32 else h.new_empty((0,))


def _pool_fake(x, topology):
    return x.new_empty((x.shape[0], TOPOLOGIES[topology].channels(x)))


def _gate_network_fake(x, w1, b1, w2, b2, topology):
    return x.new_empty(TOPOLOGIES[topology].per_sample(x.shape[0]))


def pooled_input_grad(x: torch.Tensor, topology: str) -> torch.Tensor:
    """The pooled input's gradient as the native kernels allocate it: on CPU the (B, C)
    values broadcast over the positions with stride 0; on CUDA a dense dx."""
    if x.device.type != "cpu" or x.numel() == 0:
        return torch.empty_like(x)
    positions = TOPOLOGIES[topology].positions
    return x.new_empty([1 if d in positions else n for d, n in enumerate(x.shape)]).expand(x.shape)


# ---------------------------------------------------------------------------- the table
_FEATURES_OUT = frozenset({"y", "dh", "ds"})
_BLEND = "(Tensor h, Tensor s, Tensor alpha)"
_ADD_BACKWARD = ("blend_add_backward(Tensor grad, Tensor h, Tensor s, Tensor alpha, bool need_alpha_grad)"
                 " -> (Tensor, Tensor, Tensor)")

OPS: tuple[Op, ...] = (
    Op("blend_add", f"blend_add{_BLEND} -> Tensor", _ADD_BACKWARD,
       ("h", "s", "alpha"), _FEATURES_OUT, weights=("alpha",), host_dtype=True,
       drop_in="blend_ops"),
    # the isolation blend is ADD under Esper's other name: it runs kasmina::blend_add
    Op("blend_with_isolation", f"blend_with_isolation{_BLEND} -> Tensor", _ADD_BACKWARD,
       ("h", "s", "alpha"), _FEATURES_OUT, weights=("alpha",), host_dtype=True,
       drop_in="isolation", kernel="blend_add"),
    Op("blend_multiply", "blend_multiply(Tensor h, Tensor s, Tensor alpha, Tensor? seed_input) -> Tensor",
       "blend_multiply_backward(Tensor grad, Tensor h, Tensor s, Tensor alpha, Tensor? seed_input,"
       " bool need_alpha_grad, bool need_seed_input_grad, Tensor? tanh_complement=None)"
       " -> (Tensor, Tensor, Tensor, Tensor)",
       ("h", "s", "alpha", "seed_input"), _FEATURES_OUT | {"dseed_input"}, kwonly=("seed_input",),
       weights=("alpha",), host_dtype=True, cast_to_host=("s", "alpha", "seed_input"),
       drop_in="blend_ops", residual="tanh_complement", residual_fake=_multiply_tanh_fake),
    Op("blend_gate", "blend_gate(Tensor h, Tensor s, Tensor alpha, Tensor gate) -> Tensor",
       "blend_gate_backward(Tensor grad, Tensor h, Tensor s, Tensor alpha, Tensor gate,"
       " bool need_alpha_grad, bool need_gate_grad) -> (Tensor, Tensor, Tensor, Tensor)",
       ("h", "s", "alpha", "gate"), _FEATURES_OUT, weights=("alpha", "gate"), host_dtype=True,
       drop_in="blend_ops"),
    # STE's backward is the identity: autograd passes the gradient through, no backward op
    Op("ste_forward", "ste_forward(Tensor h, Tensor s) -> Tensor", "",
       ("h", "s"), _FEATURES_OUT, host_dtype=True, drop_in="isolation"),
    Op("multiply_valve_multiplier", "multiply_valve_multiplier(Tensor alpha, Tensor m) -> Tensor",
       "multiply_valve_multiplier_backward(Tensor grad, Tensor alpha, Tensor m,"
       " bool need_alpha_grad) -> (Tensor, Tensor)",
       ("alpha", "m"), frozenset({"y", "dm"}), weights=("alpha",), drop_in="blend_ops",
       fake=_valve_fake),
    Op("gate_effective_alpha", "gate_effective_alpha(Tensor alpha, Tensor gate) -> Tensor",
       "gate_effective_alpha_backward(Tensor grad, Tensor alpha, Tensor gate,"
       " bool need_alpha_grad, bool need_gate_grad) -> (Tensor, Tensor)",
       ("alpha", "gate"), frozenset({"y"}), weights=("alpha", "gate"), drop_in="blend_ops",
       fake=_effective_alpha_fake),
    # the pooled mean is a reduction; its input gradient is elementwise (a broadcast)
    Op("gated_pool", "gated_pool(Tensor x, str topology) -> Tensor",
       "gated_pool_backward(Tensor grad, Tensor x, str topology) -> Tensor",
       ("x",), frozenset({"dx"}), pooled=("x",), fake=_pool_fake),
    # every output of the gate network passes through a reduction (the pool, two Linear layers)
    Op("gate_network",
       "gate_network(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, str topology) -> Tensor",
       "gate_network_backward(Tensor grad, Tensor x, Tensor w1, Tensor b1, Tensor w2,"
       " Tensor b2, str topology) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
       ("x", "w1", "b1", "w2", "b2"), frozenset(), kwonly=("topology",),
       weights=("w1", "b1", "w2", "b2"), pooled=("x",), fake=_gate_network_fake),
)

NAMES: tuple[str, ...] = tuple(op.name for op in OPS)
BY_NAME: dict[str, Op] = {op.name: op for op in OPS}


def drop_ins(module: str) -> list[str]:
    """The ops that are drop-ins for Esper's functions of `module` ("blend_ops", "isolation")."""
    return [op.name for op in OPS if op.drop_in == module]
