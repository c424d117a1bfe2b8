"""A process-wide install of the drop-ins into Esper (docs/esper.md): `install` imports
`ESPER_NAMESPACES` and replaces (with `swap.swap_in`) the names of `swap.DROP_INS` that each
holds, in the package ``esper.kasmina`` too where it re-exports them, and ``GatedBlend`` in
the catalog Esper rebuilds its gates from (``BlendCatalog._algorithms["gated"]``)::

    handle = kk.esper.install()
    ...                 # Esper's slots run the fused blends
    handle.uninstall()  # Esper's originals again

Modules imported afterwards bind the drop-ins; other modules that imported a name before keep
the eager function (give them to `swap_in`). `install` is idempotent while in place, and
raises `EsperNotFoundError` (an ImportError), replacing nothing, when Esper's layout is not
the expected one.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import MutableMapping
from types import ModuleType

from . import nn
from .swap import DROP_INS, SwapHandle, swap_in

__all__ = ["ESPER_NAMESPACES", "EsperInstall", "EsperNotFoundError", "install", "installed"]

#: The modules whose bindings `install` replaces (each must exist and hold some of the names).
ESPER_NAMESPACES = (
    "esper.kasmina.blend_ops",
    "esper.kasmina.isolation",
    "esper.kasmina.slot",
    "esper.kasmina.blending",
)
_PACKAGE = "esper.kasmina"  # replaced too where it re-exports a name; not required to
_CATALOG_MODULE, _CATALOG, _GATED = "esper.kasmina.blending", "BlendCatalog", "gated"


class EsperNotFoundError(ImportError):
    """Esper, or a namespace `install` expects in it, is missing or laid out differently."""


class EsperInstall(SwapHandle):
    """The drop-ins installed into Esper by `install`: a `SwapHandle` whose `uninstall()` (or
    leaving a ``with`` block) puts Esper's originals back; a second call does nothing."""

    def __init__(self, modules: dict[str, ModuleType], handle: SwapHandle) -> None:
        super().__init__()
        self._modules, self._records = modules, handle._records

    @property
    def active(self) -> bool:
        return bool(self._records)

    def _current(self) -> bool:
        """Installed into the Esper modules that are imported now (not into modules since
        dropped from sys.modules and imported again)."""
        return all(sys.modules.get(name) is mod for name, mod in self._modules.items())

    def undo(self) -> None:
        global _installed
        with _lock:
            super().undo()
            if _installed is self:
                _installed = None

    uninstall = undo

    def __repr__(self) -> str:
        state = "active" if self.active else "uninstalled"
        return f"EsperInstall({state}, {len(self.replaced)} names replaced)"


_lock = threading.RLock()
_installed: EsperInstall | None = None


def installed() -> EsperInstall | None:
    """The install in place, or None."""
    return _installed


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise EsperNotFoundError(
            f"kasmina_kernels.esper.install: cannot import {name} ({exc}); install expects "
            f"Esper's modules {', '.join(ESPER_NAMESPACES)}. Nothing was replaced; to swap the "
            "drop-ins into other modules use kasmina_kernels.swap_in"
        ) from exc


def install() -> EsperInstall:
    """Installs the drop-ins into Esper's namespaces and catalog (see the module docstring);
    returns the `EsperInstall` whose `uninstall()` undoes it. Raises `EsperNotFoundError`,
    replacing nothing, when Esper's layout is not the expected one."""
    global _installed
    with _lock:
        if _installed is not None:
            if _installed.active and _installed._current():
                return _installed
            _installed.uninstall()  # Esper's modules were imported again since: start over
        modules = {name: _import(name) for name in ESPER_NAMESPACES}
        catalog = getattr(modules[_CATALOG_MODULE], _CATALOG, None)
        registry = getattr(catalog, "_algorithms", None)
        if not isinstance(registry, MutableMapping) or _GATED not in registry:
            raise EsperNotFoundError(
                f"kasmina_kernels.esper.install: {_CATALOG_MODULE}.{_CATALOG}._algorithms "
                f"with a {_GATED!r} entry not found; nothing was replaced"
            )
        namespaces: list[object] = list(modules.values())
        package = sys.modules.get(_PACKAGE)
        if package is not None and any(n in vars(package) for n in DROP_INS):
            namespaces.append(package)
        try:
            handle = swap_in(*namespaces)
        except ValueError as exc:  # a module holds none of the names; swap_in replaced nothing
            raise EsperNotFoundError(f"kasmina_kernels.esper.install: {exc}; nothing was replaced") from None
        handle._replace(registry, _GATED, nn.GatedBlend)  # a mapping holding _GATED: cannot fail
        if package is not None:
            modules[_PACKAGE] = package
        _installed = EsperInstall(modules, handle)
        return _installed
