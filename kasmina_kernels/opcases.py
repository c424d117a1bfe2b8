"""Representative inputs for every op (the `check` command's and the benchmarks'), and what the
tests and those commands share to judge a kernel: the runner (`run_forward_backward`: an op's
output and the gradients of the inputs that require grad, by input name), the oracle's view of
the inputs (`as_the_op_casts`) and the verdicts (`verdicts`, by `equivalence.judge`). The
tests build a much wider matrix of inputs (tests/cases.py) on the same runner and verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import equivalence, optable, reference


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _per_sample(shape):
    return (shape[0],) + (1,) * (len(shape) - 1)


def _alpha(shape, device, gen):
    # values spread over and beyond [0, 1] so the clamps' gradient masks are exercised
    return (torch.rand(_per_sample(shape), generator=gen, dtype=torch.float64) * 1.4 - 0.2).to(
        device=device, dtype=torch.float32
    )


def _gate_net(shape, dtype, device, gen):
    x = _randn(shape, dtype, device, gen)
    topology = "cnn" if len(shape) == 4 else "transformer"
    channels = shape[1] if topology == "cnn" else shape[-1]
    hidden = reference.gate_hidden_size(channels)
    w1 = _randn((hidden, channels), dtype, device, gen) / channels**0.5
    b1 = _randn((hidden,), dtype, device, gen) * 0.1
    w2 = _randn((1, hidden), dtype, device, gen) / hidden**0.5
    b2 = _randn((1,), dtype, device, gen) * 0.1
    return (x, w1, b1, w2, b2), {"topology": topology}


def make(op: optable.Op, shape, dtype, device, gen) -> tuple[list, dict]:
    """Representative (args, kwargs) of `op` over features of `shape`: random, never zero,
    contiguous, alpha and gate per-sample and partly outside [0, 1] (float32 beside features
    an op casts to the host's dtype, else in `dtype`)."""
    if op.name == "gate_network":
        return _gate_net(shape, dtype, device, gen)
    values = {}
    for name in op.inputs:
        if name == "topology":
            values[name] = "cnn" if len(shape) == 4 else "transformer"
        elif name in op.weights:
            alpha = _alpha(shape, device, gen)
            values[name] = alpha if op.host_dtype else alpha.to(dtype)
        else:
            values[name] = _randn(shape, dtype, device, gen)
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


def run_forward_backward(
    fn: Callable,
    leaves: dict[str, torch.Tensor],
    call: Callable[[Callable, dict[str, torch.Tensor]], torch.Tensor],
    requires: tuple[str, ...],
    grad_out: torch.Tensor | None,
    *,
    inference: bool = False,
    upcast_inputs: bool = False,
) -> dict[str, torch.Tensor]:
    """Runs `call(fn, leaves')` where leaves' are fresh leaf tensors (float64 copies when
    `upcast_inputs`), then the gradient of every leaf named in `requires` for the upstream
    gradient `grad_out`. Aliased leaves (the same tensor object under two names) stay aliased.
    Returns {"y": output, "d<name>": gradient, ...}."""
    made: dict[int, torch.Tensor] = {}
    fresh: dict[str, torch.Tensor] = {}
    for name, t in leaves.items():
        if t is None or not isinstance(t, torch.Tensor):
            fresh[name] = t
            continue
        key = id(t)
        if key not in made:
            base = upcast(t) if upcast_inputs else t.detach()
            wants = any(leaves[n] is t for n in requires)
            if wants and not inference:
                base = base.requires_grad_(True)
            made[key] = base
        fresh[name] = made[key]
    if inference:
        with torch.inference_mode():
            y = call(fn, fresh)
        return {"y": y}
    y = call(fn, fresh)
    out = {"y": y.detach()}
    names = [n for n in requires if fresh.get(n) is not None]
    unique: list[torch.Tensor] = []
    for n in names:
        if not any(fresh[n] is u for u in unique):
            unique.append(fresh[n])
    if unique:
        g = grad_out.to(torch.float64) if upcast_inputs else grad_out
        grads = torch.autograd.grad(y, unique, g, allow_unused=False)
        for n in names:
            for u, gr in zip(unique, grads):
                if fresh[n] is u:
                    out["d" + n] = gr
    return out


def as_the_op_casts(leaves: dict) -> dict:
    """The seed and seed_input as the op itself reads them: cast to the host's dtype (section 2:
    "cast s"). Upcasting an fp32 seed of a bf16 host straight to float64 would give the oracle
    a different function, one that skips that cast, and measure the cast as everyone's error.
    Aliases (s is h) stay aliases; a seed already in the host's dtype is unchanged."""
    h = leaves.get("h")
    if h is None:
        return leaves
    cast = dict(leaves)
    made: dict[int, torch.Tensor] = {}
    for name in ("s", "seed_input"):
        t = leaves.get(name)
        if isinstance(t, torch.Tensor) and t is not h and t.dtype != h.dtype:
            if id(t) not in made:  # s is r stays one tensor
                made[id(t)] = t.detach().to(h.dtype)
            cast[name] = made[id(t)]
    return cast


def upcast(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    return value


def verdicts(op: optable.Op, kernel: dict, expected: tuple[dict, dict], leaves: dict, requires,
             grad: torch.Tensor | None) -> list[equivalence.Verdict]:
    """Each output of a kernel run judged against `expected` (the reference and oracle outputs
    of the same leaves, requires and grad) by `equivalence.judge`: elementwise where the op
    table says so, in its computation dtype, a reduction with its sqrt(n) slack."""
    ref, oracle = expected
    host = leaves.get(op.inputs[0])
    host = host.dtype if isinstance(host, torch.Tensor) else None
    terms = equivalence.reduction_terms(op.name, as_the_op_casts(leaves), requires, grad,
                                        topology=leaves.get("topology"))
    computed_in = {n: equivalence.computation_dtype(op.name, n, host) for n in ref} if host else None
    return equivalence.judge(kernel, ref, oracle, elementwise=op.elementwise, computed_in=computed_in,
                             terms=terms)


@dataclass
class Check:
    """Judges kernels on one set of inputs (`of`): runs each on them and returns its verdicts
    against the reference and oracle outputs computed once here (`expected`)."""

    op: optable.Op
    leaves: dict  # the inputs by name
    requires: tuple[str, ...]  # those that take a gradient
    grad: torch.Tensor  # the incoming gradient
    expected: tuple[dict, dict]  # (eager reference outputs, float64 oracle outputs)

    @classmethod
    def of(cls, op: optable.Op, args, kwargs, *, no_grad=frozenset(), grad=None, ref_fn=None) -> "Check":
        """`no_grad`: inputs passed without grad; `grad`: the incoming gradient (default: a
        random one like the output); `ref_fn`: the reference to run (default: the op's; e.g.
        one wrapped in autocast). The oracle runs the reference on the inputs as the op casts
        them (`as_the_op_casts`), upcast to float64."""
        ref_fn = ref_fn or op.reference
        leaves = leaves_of(op, args, kwargs)
        requires = grad_inputs(op, leaves, no_grad)
        if grad is None:
            with torch.no_grad():
                grad = incoming_grad(op.call(ref_fn, leaves))
        ref = run_forward_backward(ref_fn, leaves, op.call, requires, grad)
        oracle = run_forward_backward(ref_fn, as_the_op_casts(leaves), op.call, requires, grad,
                                      upcast_inputs=True)
        return cls(op, leaves, requires, grad, (ref, oracle))

    def __call__(self, fn) -> list[equivalence.Verdict]:
        kernel = run_forward_backward(fn, self.leaves, self.op.call, self.requires, self.grad)
        return verdicts(self.op, kernel, self.expected, self.leaves, self.requires, self.grad)
