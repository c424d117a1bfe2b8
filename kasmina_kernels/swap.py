"""Swap the drop-ins into code that already imported the eager blend functions.

Python binds ``from module import name`` at import time, so each module that imported a blend
function holds its own reference; replacing the function in one module does not reach the
others. `swap_in` replaces the names in every namespace it is given and returns a
`SwapHandle` that puts the originals back (`undo`, or leaving a ``with`` block)::

    import kasmina_kernels as kk
    with kk.swap_in("esper.kasmina.blend_ops", "esper.kasmina.isolation", "esper.kasmina.slot"):
        train()

A namespace is a module, a module name (imported), any object whose attributes hold the
names (a class, an instance), or a mutable mapping (a registry dict). Only the names the
namespace already holds are replaced; a namespace holding none of them is an error.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, MutableMapping
from types import ModuleType

from . import blend_ops, isolation, nn
from .optable import OPS

__all__ = ["DROP_INS", "SwapHandle", "swap_in"]

#: What `swap_in` puts in place of each name by default.
DROP_INS: Mapping[str, object] = {
    **{op.name: getattr({"blend_ops": blend_ops, "isolation": isolation}[op.drop_in], op.name)
       for op in OPS if op.drop_in},
    "GatedBlend": nn.GatedBlend,
}


class SwapHandle:
    """The replacements one `swap_in` call made. `undo()` restores the originals (most recent
    first; a second call does nothing). Also a context manager that undoes on exit."""

    def __init__(self) -> None:
        self._records: list[tuple[object, str, object]] = []

    @property
    def replaced(self) -> list[tuple[object, str]]:
        """(namespace, name) for each replacement still in place, in the order made."""
        return [(target, name) for target, name, _ in self._records]

    def _replace(self, target: object, name: str, value: object) -> None:
        original = _stored(target, name)
        if isinstance(original, staticmethod):  # a function kept on a class stays unbound
            value = staticmethod(value)
        _set(target, name, value)
        self._records.append((target, name, original))

    def undo(self) -> None:
        while self._records:
            target, name, original = self._records.pop()
            if original is _INHERITED:
                delattr(target, name)  # uncovers the class attribute again
            else:
                _set(target, name, original)

    def __enter__(self) -> "SwapHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __repr__(self) -> str:
        names = ", ".join(f"{_describe(t)}.{n}" for t, n in self.replaced)
        return f"SwapHandle([{names}])"


_INHERITED = object()  # the name was found on the target's class, not stored on the target


def _stored(target: object, name: str) -> object:
    """What the target itself stores under `name` (a class's raw attribute, staticmethod
    wrapper included), or `_INHERITED` when the value comes from its class or a base."""
    if isinstance(target, Mapping):
        return target[name]
    own = getattr(target, "__dict__", None)
    if own is None:  # __slots__ objects: the attribute is the target's own
        return getattr(target, name)
    return own.get(name, _INHERITED)


def _set(target: object, name: str, value: object) -> None:
    if isinstance(target, Mapping):
        target[name] = value  # type: ignore[index]
    else:
        setattr(target, name, value)


def _describe(target: object) -> str:
    if isinstance(target, ModuleType):
        return target.__name__
    return getattr(target, "__qualname__", type(target).__name__)


def swap_in(*namespaces: object, replacements: Mapping[str, object] | None = None) -> SwapHandle:
    """Replace, in each namespace, every name of `replacements` (default `DROP_INS`) that the
    namespace holds. Returns the `SwapHandle` that undoes it.

    Raises ValueError when no namespace is given or a namespace holds none of the names (a
    typo would otherwise leave the eager code running unnoticed); nothing is replaced then.
    """
    if not namespaces:
        raise ValueError("swap_in: give at least one namespace (module, module name, object or dict)")
    table = DROP_INS if replacements is None else replacements
    if not isinstance(table, Mapping) or not all(isinstance(k, str) for k in table):
        raise TypeError("swap_in: replacements must map names (str) to objects")
    plan: list[tuple[object, str]] = []
    for namespace in namespaces:
        target = importlib.import_module(namespace) if isinstance(namespace, str) else namespace
        if isinstance(target, Mapping):
            if not isinstance(target, MutableMapping):
                raise TypeError(f"swap_in: a mapping namespace must be mutable, got {type(target).__name__}")
            names = [name for name in table if name in target]
        else:
            names = [name for name in table if hasattr(target, name)]
        if not names:
            raise ValueError(f"swap_in: {_describe(target)} holds none of the names {', '.join(table)}")
        plan.extend((target, name) for name in names)
    handle = SwapHandle()
    for target, name in plan:
        handle._replace(target, name, table[name])
    return handle
