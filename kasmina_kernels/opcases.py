"""Representative inputs for every op, and a runner that returns an op's output and the
gradients of all its differentiable inputs. Shared by the `check` command and benchmarks;
the tests build a much wider matrix of their own on top of `run_with_grads`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import equivalence, ops, optable, reference


@dataclass(frozen=True)
class OpCase:
    op: optable.Op
    make: Callable  # (shape, dtype, device, generator) -> (args, kwargs)

    @property
    def name(self) -> str:  # public op name in kasmina_kernels and kasmina_kernels.reference
        return self.op.name

    @property
    def arg_names(self) -> tuple[str, ...]:
        return self.op.inputs

    @property
    def elementwise(self) -> frozenset[str]:
        """Outputs judged elementwise, named as `named_outputs` names them."""
        return frozenset("out" if o == "y" else o[1:] for o in self.op.elementwise)


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _per_sample(shape):
    return (shape[0],) + (1,) * (len(shape) - 1)


def _alpha(shape, device, gen):
    # values spread over and beyond [0, 1] so the clamps' gradient masks are exercised
    return (torch.rand(_per_sample(shape), generator=gen, dtype=torch.float64) * 1.4 - 0.2).to(
        device=device, dtype=torch.float32
    )


def _blend(shape, dtype, device, gen):
    return (_randn(shape, dtype, device, gen), _randn(shape, dtype, device, gen),
            _alpha(shape, device, gen)), {}


def _gate(shape, dtype, device, gen):
    (h, s, a), _ = _blend(shape, dtype, device, gen)
    return (h, s, a, _alpha(shape, device, gen)), {}


def _multiply(shape, dtype, device, gen):
    (h, s, a), _ = _blend(shape, dtype, device, gen)
    return (h, s, a), {"seed_input": _randn(shape, dtype, device, gen)}


def _ste(shape, dtype, device, gen):
    return (_randn(shape, dtype, device, gen), _randn(shape, dtype, device, gen)), {}


def _valve(shape, dtype, device, gen):
    return (_alpha(shape, device, gen).to(dtype), _randn(shape, dtype, device, gen)), {}


def _effective(shape, dtype, device, gen):
    return (_alpha(shape, device, gen).to(dtype), _alpha(shape, device, gen).to(dtype)), {}


def _pool(shape, dtype, device, gen):
    x = _randn(shape, dtype, device, gen)
    return (x, "cnn" if len(shape) == 4 else "transformer"), {}


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


_MAKE = {"blend_add": _blend, "blend_with_isolation": _blend, "blend_multiply": _multiply,
         "blend_gate": _gate, "ste_forward": _ste, "multiply_valve_multiplier": _valve,
         "gate_effective_alpha": _effective, "gated_pool": _pool, "gate_network": _gate_net}
CASES = tuple(OpCase(op, _MAKE[op.name]) for op in optable.OPS)


def run_with_grads(fn, args, kwargs, grad_seed: int = 1234, grad_dtype: torch.dtype | None = None,
                   *, no_grad: frozenset = frozenset(), grad_like_output: bool = False):
    """Runs fn on fresh leaf copies of args/kwargs; returns {"out": y, <input name>: grad}.

    The incoming gradient is drawn from `grad_seed` and rounded to `grad_dtype` (default: the
    output's dtype), so a float64 oracle run can see exactly the values a low-precision run
    saw. Copies keep each input's memory format. `no_grad`: inputs (``"argN"`` or a keyword's
    name) passed without requires_grad, so they get no gradient; `grad_like_output`: the
    incoming gradient takes the output's memory format (as a layer's would), not contiguous."""
    leaves = {}

    def leaf(name, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            t = value.detach().clone()
            if name in no_grad:
                return t
            t.requires_grad_()
            leaves[name] = t
            return t
        return value

    args = [leaf(f"arg{i}", a) for i, a in enumerate(args)]
    kwargs = {k: leaf(k, v) for k, v in kwargs.items()}
    out = fn(*args, **kwargs)
    gen = torch.Generator(device="cpu").manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grad = grad.to(grad_dtype or out.dtype).to(out.device, out.dtype)
    if grad_like_output:
        grad = torch.empty_like(out).copy_(grad)
    inputs = list(leaves.values())
    grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    result = {"out": out.detach()}
    for name, g in zip(leaves, grads):
        result[name] = g
    return result


def named_outputs(case: OpCase, results: dict) -> dict:
    """Renames argN keys to the case's argument names."""
    named = {}
    for key, value in results.items():
        if key.startswith("arg"):
            key = case.arg_names[int(key[3:])]
        named[key] = value
    return named


def upcast(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    return value


def expected_outputs(case: OpCase, args, kwargs, dtype: torch.dtype, *, ref_fn=None,
                     **run_kw) -> tuple[dict, dict]:
    """(eager reference outputs, float64 oracle outputs) of `case` on args/kwargs, each as
    {output name: tensor}; the oracle sees the incoming gradient rounded to `dtype`.
    `ref_fn`: the reference to run (default: the op's; e.g. one wrapped in autocast);
    `run_kw`: `run_with_grads`'s keyword-only options."""
    ref_fn = ref_fn or reference_op(case.name)
    ref = named_outputs(case, run_with_grads(ref_fn, args, kwargs, **run_kw))
    oracle = named_outputs(case, run_with_grads(
        ref_fn, [upcast(a) for a in args], {k: upcast(v) for k, v in kwargs.items()},
        grad_dtype=dtype, **run_kw))
    return ref, oracle


def judge(case: OpCase, fn, args, kwargs, expected: tuple[dict, dict],
          **run_kw) -> list[tuple[str, "equivalence.Verdict"]]:
    """Runs fn (output and every gradient) and judges each output against `expected`
    (from `expected_outputs` with the same `run_kw`) by the equivalence rule; one
    (output name, Verdict) per output."""
    ref, oracle = expected
    got = named_outputs(case, run_with_grads(fn, args, kwargs, **run_kw))
    host = args[0].dtype if args and isinstance(args[0], torch.Tensor) else None
    return [(name, equivalence.compare(
                name, got[name], r, oracle[name], elementwise=name in case.elementwise,
                computed_in=None if host is None else equivalence.computation_dtype(
                    case.name, name, host)))
            for name, r in ref.items() if r is not None]


def public_op(name: str):
    return getattr(ops, name)


def reference_op(name: str):
    return getattr(reference, name)
