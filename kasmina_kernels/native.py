"""The native backend: the compiled extension `kasmina_kernels._C` (C++ CPU kernels, and CUDA
kernels when built with CUDA), and the one registration every backend's ops go through
(`register`): the schemas of the op table, fake kernels (what torch.compile traces the ops
with), a vmap rule and the extension's C++ autograd kernel."""

from __future__ import annotations

import functools

import torch

from . import _C  # registers the C++ CPU (and CUDA) kernels of torch.ops.kasmina
from .optable import OPS


def _vmap_rule(op):
    """torch.func.vmap runs the op once per batch entry."""
    def rule(info, in_dims, *args):
        rows = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                for i in range(info.batch_size)]
        return torch.stack(rows), 0
    return rule


#: The inputs the eager math reads only through a clamp (a copy), so never saves as given: the
#: autograd kernel saves a copy of one made under inference_mode, which autograd cannot save.
CLAMPED = ("alpha", "gate")


def register(library: torch.library.Library, prefix: str = "", kernels=None, dense_pooled=False):
    """Defines each kernel op of the table (`Op.kernel`) as ``kasmina::<prefix><name>``, with
    its backward op ``kasmina::<prefix><name>_backward``, in `library`; registers their fake
    kernels and vmap rule, and the C++ autograd kernel, which runs the backward op with the
    forward's inputs and one ``need_<input>_grad`` flag per input whose gradient may be
    skipped (and, where the extension defines ``<name>_for_backward``, the residual it kept).
    `kernels` maps an op's name to its (forward, backward) Python kernels for CPU and CUDA
    tensors; without it, the ops run the extension's C++ kernels."""
    names = []
    for op in OPS:
        if op.kernel != op.name:
            continue
        forward, backward = kernels[op.name] if kernels else (None, None)
        backward_fake = functools.partial(op.backward_fake, dense_pooled=dense_pooled)
        # the value-and-residual op: the extension's CPU kernels only
        for_backward = op.for_backward if kernels is None else ""
        for schema, kernel, fake in ((op.schema, forward, op.forward_fake), (op.backward, backward, backward_fake),
                                     (for_backward, None, op.for_backward_fake)):
            if not schema:  # STE: its gradient is the identity, no backward op
                continue
            name = prefix + schema[:schema.index("(")]
            library.define(prefix + schema)
            for key in ("CPU", "CUDA") if kernel else ():
                library.impl(name, kernel, key)
            torch.library.register_fake(f"kasmina::{name}", fake, lib=library)
            names.append(name)
        torch.library.register_vmap(f"kasmina::{prefix}{op.name}",
                                    _vmap_rule(getattr(torch.ops.kasmina, prefix + op.name).default), lib=library)
    _C.register_autograd(names, list(CLAMPED))


def functions(prefix: str = "") -> dict:
    """A backend's functions, by op name, for the ops `register` defined with `prefix`: the ops'
    OpOverloads (the cheapest way into the dispatcher from Python); the ops with a keyword-only
    argument take it as the public functions do."""
    fns = {op.name: getattr(torch.ops.kasmina, prefix + op.kernel).default for op in OPS}
    multiply, network = fns["blend_multiply"], fns["gate_network"]

    def blend_multiply(h, s, alpha, *, seed_input=None):
        return multiply(h, s, alpha, seed_input)

    def gate_network(x, w1, b1, w2, b2, *, topology):
        return network(x, w1, b1, w2, b2, topology)

    return {**fns, "blend_multiply": blend_multiply, "gate_network": gate_network}


_library = torch.library.Library("kasmina", "DEF")  # kept alive: dropping it drops the ops
register(_library)
globals().update(functions())


def build_info() -> dict:
    return dict(_C.build_info())
