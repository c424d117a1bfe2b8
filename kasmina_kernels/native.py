"""The native backend: the compiled extension `kasmina_kernels._C` (C++ CPU kernels, and CUDA
kernels when built with CUDA). Importing this module defines the `torch.ops.kasmina` schemas
and their fake kernels (what torch.compile traces the ops with; the table's mirror the C++
allocations) from the op table, then loads the extension, which registers the CPU/CUDA
kernels and C++ autograd."""

from __future__ import annotations

import torch

from .optable import OPS

_library = torch.library.Library("kasmina", "DEF")  # kept alive: dropping it drops the schemas
for _op in OPS:
    if _op.kernel == _op.name:
        _library.define(_op.schema)
        torch.library.register_fake(f"kasmina::{_op.name}", _op.forward_fake)
        if _op.backward:
            _library.define(_op.backward)
            torch.library.register_fake(f"kasmina::{_op.name}_backward", _op.backward_fake)

from . import _C  # noqa: E402  (registers the kernels and autograd of torch.ops.kasmina)

_ops = torch.ops.kasmina


def build_info() -> dict:
    return dict(_C.build_info())


# The backend's functions are the ops' OpOverloads (the cheapest way into the dispatcher from
# Python); the ops with a keyword-only argument take it as the public functions do.
for _op in OPS:
    if not _op.kwonly:
        globals()[_op.name] = getattr(_ops, _op.kernel).default
del _op
_blend_multiply = _ops.blend_multiply.default
_gate_network = _ops.gate_network.default


def blend_multiply(h, s, alpha, *, seed_input=None):
    return _blend_multiply(h, s, alpha, seed_input)


def gate_network(x, w1, b1, w2, b2, *, topology):
    return _gate_network(x, w1, b1, w2, b2, topology)
