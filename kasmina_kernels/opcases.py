"""What the tests, the `check` command and the benchmarks share to build an op's inputs and
judge a kernel on them: input makers (`make`: representative inputs; `randn`,
`blend_weights`, `gate_weights`: the pieces the tests' wider matrix in tests/cases.py builds
its inputs from), the runner (`run_forward_backward`: an op's output and the gradients of the
inputs that require grad, by input name) and `Check`, which runs the reference and the
float64 oracle once and judges kernels against them (by `equivalence.judge`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import equivalence, optable, reference
from .validation import TOPOLOGIES


def randn(shape, dtype, device, gen, scale=1.0):
    """Normal values drawn in float64 from `gen` on the CPU, scaled, then cast and moved."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def per_sample(shape):
    return (shape[0],) + (1,) * (len(shape) - 1)


def blend_weights(shape, gen):
    """Blend weights (float64, CPU) uniform in [-0.5, 1.5], with exact 0, 1 and values just
    outside [0, 1] at the front, so the clamps' edges and gradient masks are exercised."""
    v = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 0.5
    flat = v.view(-1)
    for i, x in enumerate((0.0, 1.0, -0.25, 1.25)[:flat.numel()]):
        flat[i] = x
    return v


def gate_weights(channels, dtype, device, gen):
    """The gate network's w1, b1, w2, b2 for `channels` inputs, scaled as nn.Linear's."""
    hidden = reference.gate_hidden_size(channels)
    k1, k2 = channels ** -0.5, hidden ** -0.5
    return (randn((hidden, channels), dtype, device, gen, k1), randn((hidden,), dtype, device, gen, k1),
            randn((1, hidden), dtype, device, gen, k2), randn((1,), dtype, device, gen, k2))


def make(op: optable.Op, shape, dtype, device, gen) -> tuple[list, dict]:
    """Representative (args, kwargs) of `op` over features of `shape`: random, never zero,
    contiguous, alpha and gate per-sample and partly outside [0, 1] (float32 beside features
    an op casts to the host's dtype, else in `dtype`)."""
    values = {}
    for name in op.inputs:
        if name == "topology":
            values[name] = "cnn" if len(shape) == 4 else "transformer"
        elif name in op.weights and op.name != "gate_network":
            values[name] = blend_weights(per_sample(shape), gen).to(
                device, torch.float32 if op.host_dtype else dtype)
        elif name not in op.weights:
            values[name] = randn(shape, dtype, device, gen)
    if op.name == "gate_network":
        channels = shape[TOPOLOGIES[values["topology"]].channel_dim]
        values.update(zip(op.weights, gate_weights(channels, dtype, device, gen)))
    return [values[n] for n in op.inputs if n not in op.kwonly], {n: values[n] for n in op.kwonly}


def leaves_of(op: optable.Op, args, kwargs) -> dict:
    """The inputs of a call by the op's input names."""
    return {**dict(zip(op.inputs, args)), **kwargs}


def grad_inputs(op: optable.Op, leaves: dict, no_grad=frozenset()) -> tuple[str, ...]:
    """The inputs that take a gradient: the op's floating-point tensors not in `no_grad`."""
    return tuple(n for n in op.grads if n not in no_grad and isinstance(leaves.get(n), torch.Tensor)
                 and leaves[n].is_floating_point())


def incoming_grad(like: torch.Tensor, seed: int = 1234) -> torch.Tensor:
    """A random incoming gradient in `like`'s dtype, device and memory format."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grad = torch.randn(like.shape, generator=gen, dtype=torch.float64)
    return torch.empty_like(like).copy_(grad)


def run_with_grads(op: optable.Op, fn, args, kwargs, grad_seed: int = 1234) -> dict:
    """fn's output and the gradient of every floating-point input, {"y": ..., "d<input>": ...},
    for an incoming gradient drawn from `grad_seed`."""
    leaves = leaves_of(op, args, kwargs)
    with torch.no_grad():
        probe = op.call(fn, leaves)
    return run_forward_backward(fn, leaves, op.call, grad_inputs(op, leaves), incoming_grad(probe, grad_seed))


def run_forward_backward(fn: Callable, leaves: dict[str, torch.Tensor],
                         call: Callable[[Callable, dict[str, torch.Tensor]], torch.Tensor],
                         requires: tuple[str, ...], grad_out: torch.Tensor | None, *,
                         inference: bool = False, upcast_inputs: bool = False) -> dict[str, torch.Tensor]:
    """Runs `call(fn, leaves')` where leaves' are fresh leaf tensors (float64 copies when
    `upcast_inputs`), then the gradient of every leaf named in `requires` for the upstream
    gradient `grad_out`. Aliased leaves (the same tensor object under two names) stay aliased.
    Returns {"y": output, "d<name>": gradient, ...}."""
    made: dict[int, torch.Tensor] = {}

    def fresh(t):
        if isinstance(t, torch.Tensor) and id(t) not in made:
            base = t.detach()
            if upcast_inputs and base.is_floating_point():
                base = base.to(torch.float64)
            if not inference and any(leaves[n] is t for n in requires):
                base.requires_grad_(True)
            made[id(t)] = base
        return made[id(t)] if isinstance(t, torch.Tensor) else t

    values = {name: fresh(t) for name, t in leaves.items()}
    if inference:
        with torch.inference_mode():
            return {"y": call(fn, values)}
    y = call(fn, values)
    out = {"y": y.detach()}
    names = [n for n in requires if values.get(n) is not None]
    unique = list({id(values[n]): values[n] for n in names}.values())
    if unique:
        g = grad_out.to(torch.float64) if upcast_inputs else grad_out
        grads = dict(zip(map(id, unique), torch.autograd.grad(y, unique, g)))
        out.update({"d" + n: grads[id(values[n])] for n in names})
    return out


def as_the_op_casts(op: optable.Op, leaves: dict) -> dict:
    """The inputs the op first casts to the host's dtype (`op.cast_to_host`, section 2: "cast
    s"), as the op itself reads them. Upcasting an fp32 seed of a bf16 host straight to float64
    would give the oracle a different function, one that skips that cast, and measure the cast
    as everyone's error. Aliases (s is h) stay aliases; an input already in the host's dtype is
    unchanged."""
    h = leaves.get("h")
    if h is None:
        return leaves
    cast = dict(leaves)
    made: dict[int, torch.Tensor] = {}
    for name in op.cast_to_host:
        t = leaves.get(name)
        if isinstance(t, torch.Tensor) and t is not h and t.dtype != h.dtype:
            if id(t) not in made:  # s is r stays one tensor
                made[id(t)] = t.detach().to(h.dtype)
            cast[name] = made[id(t)]
    return cast


@dataclass
class Check:
    """Judges kernels on one set of inputs: runs each on them (`run`) and judges its outputs
    (`judge`) against the reference and oracle outputs computed once here (`expected`)."""

    op: optable.Op
    leaves: dict  # the inputs by name
    requires: tuple[str, ...]  # those that take a gradient
    grad: torch.Tensor  # the incoming gradient
    expected: tuple[dict, dict]  # (eager reference outputs, float64 oracle outputs)
    inference: bool = False  # forward only, under torch.inference_mode

    @classmethod
    def of(cls, op: optable.Op, args, kwargs, **options) -> "Check":
        """`Check.on` the inputs of a call `fn(*args, **kwargs)`."""
        return cls.on(op, leaves_of(op, args, kwargs), **options)

    @classmethod
    def on(cls, op: optable.Op, leaves: dict, *, no_grad=frozenset(), requires=None, grad=None,
           ref_fn=None, inference=False, oracle=None) -> "Check":
        """`no_grad`: inputs passed without grad, or `requires`: those with; `grad`: the
        incoming gradient (default: a random one like the output); `ref_fn`: the reference to
        run (default: the op's; e.g. one wrapped in autocast, which leaves float64 alone). The
        oracle (unless given) runs it on the inputs as the op casts them (`as_the_op_casts`),
        upcast to float64."""
        ref_fn = ref_fn or op.reference
        requires = grad_inputs(op, leaves, no_grad) if requires is None else requires
        if grad is None:
            with torch.no_grad():
                grad = incoming_grad(op.call(ref_fn, leaves))
        ref = run_forward_backward(ref_fn, leaves, op.call, requires, grad, inference=inference)
        if oracle is None:
            oracle = run_forward_backward(ref_fn, as_the_op_casts(op, leaves), op.call, requires, grad,
                                          inference=inference, upcast_inputs=True)
        return cls(op, leaves, requires, grad, (ref, oracle), inference)

    def run(self, fn) -> dict:
        """`fn`'s outputs on the inputs: {"y": ..., "d<input>": ...}."""
        return run_forward_backward(fn, self.leaves, self.op.call, self.requires, self.grad,
                                    inference=self.inference)

    def judge(self, kernel: dict) -> list[equivalence.Verdict]:
        """Each output of a kernel run judged by `equivalence.judge`: elementwise where the op
        table says so, in its computation dtype, a reduction with its sqrt(n) slack."""
        (ref, oracle), op, leaves = self.expected, self.op, self.leaves
        host = leaves.get(op.inputs[0])
        host = host.dtype if isinstance(host, torch.Tensor) else None
        grad = None if self.inference else self.grad
        terms = equivalence.reduction_terms(op.name, as_the_op_casts(op, leaves), self.requires, grad,
                                            topology=leaves.get("topology"))
        computed_in = {n: equivalence.computation_dtype(op.name, n, host) for n in ref} if host else None
        return equivalence.judge(kernel, ref, oracle, elementwise=op.elementwise,
                                 computed_in=computed_in, terms=terms)

    def __call__(self, fn) -> list[equivalence.Verdict]:
        return self.judge(self.run(fn))
