"""The public ops: check the inputs once, pick the backend (`kasmina_kernels.backends`), call
it; the semantics are `kasmina_kernels.reference`'s.

Esper calls these thousands of times per epoch on small tensors, so the checks take a fast
path for the usual inputs (the full checks, and their exact errors, run otherwise), and when
the default backend is native (`backends.native_by_default`) an op calls its
``torch.ops.kasmina`` overload directly. 0-dim features run as 1-element 1-D views, viewed
back as 0-dim, so autograd flows through the views to the caller's tensors.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import backends, validation
from .backends import backend_module, native_by_default, resolve_backend
from .optable import NAMES

__all__ = list(NAMES)

_check_blend = validation.check_blend
_check_pair = validation.check_pair


def _impl(tensor: torch.Tensor, backend: str | None) -> ModuleType:
    return backend_module(resolve_backend(tensor, backend))


def _bound(name: str):
    """The C++ callable behind ``torch.ops.kasmina.<name>.default`` (what OpOverload.__call__
    calls, one Python frame less per call), for the eager fast path; None when the native
    backend did not load (then `native_by_default` is never true)."""
    if "native" not in backends.available_backends("cpu"):
        return None
    overload = getattr(torch.ops.kasmina, name).default
    return getattr(overload, "_op", overload)


_add, _gate, _multiply, _ste, _valve, _gea, _pool, _gate_network = map(_bound, (
    "blend_add", "blend_gate", "blend_multiply", "ste_forward", "multiply_valve_multiplier",
    "gate_effective_alpha", "gated_pool", "gate_network"))


def _one(t):
    """A 0-dim tensor as a 1-element 1-D view (None stays None)."""
    return None if t is None else t.reshape(1)


def blend_add(h, s, alpha, *, backend=None):
    """ADD: lerp(h, s.to(h.dtype), clamp01(alpha).to(h.dtype))."""
    if _check_blend("blend_add", h, s, alpha):  # 0-dim features
        return blend_add(_one(h), _one(s), alpha, backend=backend).reshape(())
    if backend is None and native_by_default(h):
        return _add(h, s, alpha)
    return _impl(h, backend).blend_add(h, s, alpha)


def blend_with_isolation(h, s, alpha, *, backend=None):
    """The isolation blend: identical to ADD."""
    if _check_blend("blend_with_isolation", h, s, alpha):  # 0-dim features
        return blend_with_isolation(_one(h), _one(s), alpha, backend=backend).reshape(())
    if backend is None and native_by_default(h):
        return _add(h, s, alpha)
    return _impl(h, backend).blend_with_isolation(h, s, alpha)


def blend_multiply(h, s, alpha, *, seed_input=None, backend=None):
    """MULTIPLY: h * (1 + clamp01(alpha) * tanh(s - r)), r = seed_input (default: h)."""
    if seed_input is h:
        # the same function; h's gradient then comes from one kernel, rounded once, rather than
        # as two host-dtype gradients that autograd rounds again as it adds them
        seed_input = None
    if s is h and seed_input is None:
        # tanh(h - h): the gradients through s and r cancel exactly, leaving h's through the
        # product alone; detached, they are neither formed nor rounded apart and summed
        s = seed_input = h.detach()
    scalar = _check_blend("blend_multiply", h, s, alpha)
    if seed_input is not None:
        _check_pair("blend_multiply", h, "seed_input", seed_input)
    if scalar:  # 0-dim features
        return blend_multiply(_one(h), _one(s), alpha, seed_input=_one(seed_input),
                              backend=backend).reshape(())
    if backend is None and native_by_default(h):
        return _multiply(h, s, alpha, seed_input)
    return _impl(h, backend).blend_multiply(h, s, alpha, seed_input=seed_input)


def blend_gate(h, s, alpha, gate, *, backend=None):
    """GATE: lerp with the effective alpha clamp01(clamp01(alpha) * clamp01(gate))."""
    scalar = _check_blend("blend_gate", h, s, alpha)
    validation.check_gate("blend_gate", gate, h)
    if scalar:  # 0-dim features (and so a 0-dim gate)
        return blend_gate(_one(h), _one(s), alpha, gate, backend=backend).reshape(())
    if backend is None and native_by_default(h):
        return _gate(h, s, alpha, gate)
    return _impl(h, backend).blend_gate(h, s, alpha, gate)


def gate_effective_alpha(alpha, gate, *, backend=None):
    """clamp01(clamp01(alpha) * clamp01(gate)), in the promoted dtype of alpha and gate."""
    validation.check_gate_pair("gate_effective_alpha", alpha, gate)
    # the operand whose device decides the backend: a 0-dim CPU scalar never does
    operand = gate if alpha.ndim == 0 and alpha.is_cpu else alpha
    if backend is None and native_by_default(operand):
        return _gea(alpha, gate)
    return _impl(operand, backend).gate_effective_alpha(alpha, gate)


def multiply_valve_multiplier(alpha, m, *, backend=None):
    """1 + clamp01(alpha) * tanh(m), in the promoted dtype of alpha and m."""
    if validation.check_valve("multiply_valve_multiplier", alpha, m):  # 0-dim m
        # two 0-dim operands promote as equals (a float64 alpha makes a float64 result),
        # where a 0-dim alpha beside 1-D m takes m's dtype: compute in the 0-dim promotion
        dtype = torch.result_type(alpha, m)
        m1 = _one(m) if m.dtype == dtype else _one(m).to(dtype)
        return multiply_valve_multiplier(alpha, m1, backend=backend).reshape(())
    if backend is None and native_by_default(m):
        return _valve(alpha, m)
    return _impl(m, backend).multiply_valve_multiplier(alpha, m)


def ste_forward(h, s, *, backend=None):
    """Straight-through: value h (NaN where s is not finite), gradient 1 to h and s."""
    if _check_pair("ste_forward", h, "seed", s):  # 0-dim features
        return ste_forward(_one(h), _one(s), backend=backend).reshape(())
    if backend is None and native_by_default(h):
        return _ste(h, s)
    return _impl(h, backend).ste_forward(h, s)


def gated_pool(x, topology, *, backend=None):
    """Mean over (H, W) of a (B,C,H,W) x ("cnn") or over T of a (B,T,C) x ("transformer")."""
    validation.check_topology("gated_pool", x, topology)
    if backend is None and native_by_default(x):
        return _pool(x, topology)
    return _impl(x, backend).gated_pool(x, topology)


def gate_network(x, w1, b1, w2, b2, *, topology, backend=None):
    """sigmoid(W2 relu(W1 pool(x) + b1) + b2), shaped (B,1,1,1) ("cnn") or (B,1,1).

    Under torch.autocast the result has the dtype eager's Linear layers give it there: a fused
    kernel (which autocast does not touch) computes in the features' dtype and rounds its
    result to that dtype once."""
    validation.check_gate_network("gate_network", x, w1, b1, w2, b2, topology)
    device_type = x.device.type
    # autocast does not cast float64 operands; the reference is autocast's own math
    if (validation.autocast_enabled(device_type)
            and torch.float64 not in (x.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype)
            and (name := resolve_backend(x, backend)) != "reference"):
        gate = backend_module(name).gate_network(x, w1, b1, w2, b2, topology=topology)
        dtype = torch.get_autocast_dtype(device_type)
        return gate if gate.dtype == dtype else gate.to(dtype)
    if backend is None and native_by_default(x):
        return _gate_network(x, w1, b1, w2, b2, topology)
    return _impl(x, backend).gate_network(x, w1, b1, w2, b2, topology=topology)
