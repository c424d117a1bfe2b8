"""Input checks shared by every backend: bad input gets a clear error, never a crash or a
silently broadcast answer. Shape and device problems raise ValueError, dtype problems
TypeError (as `InputValueError` and `InputTypeError`, so that the drop-ins can tell an input
the fused ops do not take from any other failure). The checks of the feature ops return True
for (valid) 0-dim features, which `kasmina_kernels.ops` runs as 1-element 1-D tensors, so the
fast path tests once."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

_FEATURE_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})


class Topology(NamedTuple):
    """A topology's features: their rank, their channel dim, the dims the gated pool averages
    over, their layout as the messages write it, and Esper's name for the topology."""
    rank: int
    channel_dim: int
    positions: tuple[int, ...]
    layout: str
    esper_name: str

    def channels(self, x) -> int:
        return x.shape[self.channel_dim]

    def per_sample(self, samples: int) -> tuple[int, ...]:
        """The shape of one value per sample (the gate's): (B,1,1,1) or (B,1,1)."""
        return (samples,) + (1,) * (self.rank - 1)


TOPOLOGIES = {"cnn": Topology(4, 1, (2, 3), "(B,C,H,W)", "CNN"),
              "transformer": Topology(3, 2, (1,), "(B,T,C)", "Transformer")}


class InputError(Exception):
    """An input the fused ops do not take. Raised as one of the two classes below."""


class InputValueError(InputError, ValueError):
    """A shape or device the fused ops do not take."""


class InputTypeError(InputError, TypeError):
    """A type or dtype the fused ops do not take."""


#: What a fused op raises for a call it does not serve: an input outside its contract
#: (InputError), or a call its autograd cannot record (NotImplementedError, naming the op):
#: forward-mode AD, a differentiating torch.func transform, an inference tensor to save for
#: the backward. The drop-ins answer both with Esper's eager math, as Esper's code does.
DECLINED = (InputError, NotImplementedError)


def warn_eager_answer(message, stacklevel: int) -> None:
    """The drop-ins' warning that a call ran Esper's eager math instead of a fused kernel;
    `message()` builds its text. Not while torch.compile traces: a compiled graph holds that
    math as it holds any eager code, and Dynamo can neither trace a Python warning nor format
    the symbolic sizes a message may hold (fullgraph=True would fail where Esper's code
    compiles)."""
    if not torch.compiler.is_compiling():
        warnings.warn(message(), stacklevel=stacklevel + 1)


def _fmt(shape) -> str:
    return str(tuple(shape))


class _Deferred:
    """A message built when it is read."""

    def __init__(self, build):
        self.build = build

    def __str__(self) -> str:
        return self.build()


def _text(build):
    """The message `build()` makes, for a raise. While torch.compile traces, the message is
    built only when read: sizes may be symbolic there and Dynamo cannot format them, and a
    drop-in that catches the error for its eager answer never reads it."""
    return _Deferred(build) if torch.compiler.is_compiling() else build()


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(_text(lambda: f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}"))


def check_features(op: str, name: str, t) -> None:
    check_tensor(op, name, t)
    if t.dtype not in _FEATURE_DTYPES:
        raise InputTypeError(_text(lambda: f"{op}: {name} has dtype {t.dtype}; expected float32, float64, "
                                           "bfloat16 or float16"))


def check_weight(op: str, name: str, w, features: torch.Tensor) -> None:
    """A real-valued weight that broadcasts to `features` without enlarging it."""
    check_tensor(op, name, w)
    if w.dtype == torch.bool or w.is_complex():
        raise InputTypeError(_text(lambda: f"{op}: {name} must be a real number tensor, got dtype {w.dtype}"))
    if w.dim() == 0 and w.device.type == "cpu":
        return  # a CPU scalar goes with features anywhere and broadcasts to any shape
    if w.device != features.device:
        raise InputValueError(_text(lambda: f"{op}: {name} is on {w.device} but the features are on {features.device} "
                                            "(only a 0-dim CPU scalar may live elsewhere)"))
    ws, fs = w.shape, features.shape
    if broadcast_shape(ws, fs) != tuple(fs):
        raise InputValueError(_text(lambda: f"{op}: {name} of shape {_fmt(ws)} does not broadcast to {_fmt(fs)}"))


# Weight dtypes the fast paths accept without further checks (check_weight decides the rest).
_REAL_DTYPES = _FEATURE_DTYPES | {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}
_Tensor = torch.Tensor


def _cpu_scalar_ok(w) -> bool:
    """A 0-dim real CPU tensor: Esper's alpha, which every op accepts beside any features."""
    return isinstance(w, _Tensor) and w.ndim == 0 and w.is_cpu and w.dtype in _REAL_DTYPES


def _same_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    # is_cpu is a cheap flag; building two torch.device objects to compare is not
    return (a.is_cpu and b.is_cpu) or a.device == b.device


def check_pair(op: str, h, name: str, t) -> bool | None:
    """Host features `h` and features `t` (the seed, seed_input) of the same shape and device;
    True when the (valid) features are 0-dim."""
    # the common case in few attribute reads (these run on every eager call); anything
    # unusual goes through the full checks, which raise the precise error
    if (isinstance(h, _Tensor) and isinstance(t, _Tensor)
            and h.dtype in _FEATURE_DTYPES and t.dtype in _FEATURE_DTYPES
            and h.ndim and h.shape == t.shape and _same_device(h, t)):
        return
    check_features(op, "host", h)
    check_features(op, name, t)
    if t.shape != h.shape:
        raise InputValueError(_text(lambda: f"{op}: {name} shape {_fmt(t.shape)} differs from the host shape "
                                            f"{_fmt(h.shape)}"))
    if t.device != h.device:
        raise InputValueError(_text(lambda: f"{op}: {name} is on {t.device} but the host is on {h.device}"))
    return h.ndim == 0


def check_blend(op: str, h, s, alpha) -> bool | None:
    """Raises for bad input; True when the (valid) features are 0-dim."""
    scalar = check_pair(op, h, "seed", s)
    if not _cpu_scalar_ok(alpha):
        check_weight(op, "alpha", alpha, h)
    return scalar


def check_gate(op: str, gate, h) -> None:
    """GATE's gate: a floating-point weight that broadcasts to `h` without enlarging it."""
    if isinstance(gate, _Tensor) and gate.dtype in _FEATURE_DTYPES and _same_device(gate, h):
        ws = gate.shape
        n = len(ws)
        # Esper's per-sample gate, (B,1,1,1) or (B,1,1), in plain comparisons
        if n == h.ndim and n > 0 and ws[0] in (1, h.shape[0]) and ws[1:] == (1,) * (n - 1):
            return
    check_weight(op, "gate", gate, h)
    if not gate.is_floating_point():
        raise InputTypeError(_text(lambda: f"{op}: gate must be a floating-point tensor, got {gate.dtype}"))


def check_valve(op: str, alpha, m) -> bool | None:
    """multiply_valve_multiplier's checks: m features, alpha a weight that fits m; True when
    the (valid) m is 0-dim."""
    if isinstance(m, _Tensor) and m.dtype in _FEATURE_DTYPES and m.ndim and _cpu_scalar_ok(alpha):
        return
    check_features(op, "m", m)
    check_weight(op, "alpha", alpha, m)
    return m.ndim == 0


def broadcast_shape(a, b) -> tuple[int, ...] | None:
    """The broadcast of shapes `a` and `b`, or None where they do not broadcast.

    For eager host code: torch.broadcast_shapes goes through the tracing machinery and costs
    as much as a whole op on (B,) weights."""
    la, lb = len(a), len(b)
    out = [0] * max(la, lb)
    for i in range(1, len(out) + 1):
        x = a[-i] if i <= la else 1
        y = b[-i] if i <= lb else 1
        if x == y or y == 1:
            out[-i] = x
        elif x == 1:
            out[-i] = y
        else:
            return None
    return tuple(out)


def check_gate_pair(op: str, alpha, gate) -> None:
    if _cpu_scalar_ok(alpha) and isinstance(gate, _Tensor) and gate.dtype in _FEATURE_DTYPES:
        return  # a 0-dim CPU alpha broadcasts with any floating gate on any device
    check_tensor(op, "alpha", alpha)
    check_tensor(op, "gate", gate)
    for name, t in (("alpha", alpha), ("gate", gate)):
        if t.dtype == torch.bool or t.is_complex():
            raise InputTypeError(_text(lambda: f"{op}: {name} must be a real number tensor, got dtype {t.dtype}"))
    if not (alpha.is_floating_point() or gate.is_floating_point()):
        raise InputTypeError(_text(lambda: f"{op}: alpha or gate must be a floating-point tensor"))
    if alpha.device != gate.device and not any(t.dim() == 0 and t.is_cpu for t in (alpha, gate)):
        raise InputValueError(_text(lambda: f"{op}: alpha is on {alpha.device} but gate is on {gate.device}"))
    if broadcast_shape(alpha.shape, gate.shape) is None:
        raise InputValueError(_text(lambda: f"{op}: alpha of shape {_fmt(alpha.shape)} and gate of shape "
                                            f"{_fmt(gate.shape)} do not broadcast"))


# The device types autocast knows (torch.is_autocast_enabled raises for others, such as meta),
# settled at import so that a traced call only tests membership.
_AUTOCAST_DEVICE_TYPES = frozenset(
    t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu",
                torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(t))


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type`: False for a device type autocast does not know."""
    return device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def check_topology(op: str, x, topology) -> None:
    if topology not in TOPOLOGIES:
        raise InputValueError(_text(lambda: f"{op}: unknown topology {topology!r}: expected 'cnn' or 'transformer'"))
    check_features(op, "x", x)
    t = TOPOLOGIES[topology]
    if x.dim() != t.rank:
        raise InputValueError(_text(lambda: f"{op}: topology {topology!r} expects x of rank {t.rank} {t.layout}, "
                                            f"got shape {_fmt(x.shape)}"))


def check_gate_network(op: str, x, w1, b1, w2, b2, topology) -> None:
    if (isinstance(x, _Tensor) and isinstance(w1, _Tensor) and isinstance(b1, _Tensor)
            and isinstance(w2, _Tensor) and isinstance(b2, _Tensor)
            and x.dtype in _FEATURE_DTYPES and w1.dtype in _FEATURE_DTYPES and b1.dtype in _FEATURE_DTYPES
            and w2.dtype in _FEATURE_DTYPES and b2.dtype in _FEATURE_DTYPES):
        # the common case: rank, shapes and devices in plain comparisons
        t = TOPOLOGIES.get(topology)
        ws = w1.shape
        if (t is not None and x.ndim == t.rank and len(ws) == 2 and x.shape[t.channel_dim] == ws[1]
                and b1.shape == (ws[0],) and w2.shape == (1, ws[0]) and b2.shape == (1,)
                and ((x.is_cpu and w1.is_cpu and b1.is_cpu and w2.is_cpu and b2.is_cpu)
                     or x.device == w1.device == b1.device == w2.device == b2.device)):
            return
    check_topology(op, x, topology)
    channels = TOPOLOGIES[topology].channels(x)
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        check_features(op, name, t)
        if t.device != x.device:
            raise InputValueError(_text(lambda: f"{op}: {name} is on {t.device} but x is on {x.device}"))
    hidden = w1.shape[0]
    expected = {"w1": (hidden, channels), "b1": (hidden,), "w2": (1, hidden), "b2": (1,)}
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if tuple(t.shape) != expected[name]:
            raise InputValueError(_text(lambda: f"{op}: {name} has shape {_fmt(t.shape)}, expected {expected[name]} "
                                                f"for {channels} channels and hidden width {hidden}"))
