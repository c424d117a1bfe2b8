"""`kasmina_kernels.esper.install()` against a stand-in for Esper laid out as Esper's kasmina
modules are (tests/esper_standin: from-imports in slot.py and isolation.py, a BlendCatalog
with ``_algorithms``, a SeedSlot whose ``set_extra_state`` builds GatedBlend through the
catalog): install before and after Esper is imported, idempotence, uninstall restoring the
originals, a missing namespace refused with nothing replaced, and a checkpoint reload through
the catalog building the fused GatedBlend. The stand-in is on sys.path only inside these
tests, and its modules are dropped from sys.modules after each."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels import blend_ops, isolation
from kasmina_kernels.esper import EsperNotFoundError, install, installed
from kasmina_kernels.nn import GatedBlend

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "esper_standin")
FUNCTIONS = {
    "esper.kasmina.blend_ops": ("blend_add", "blend_multiply", "blend_gate", "gate_effective_alpha",
                                "multiply_valve_multiplier"),
    "esper.kasmina.isolation": ("ste_forward", "blend_with_isolation", "blend_add"),
    "esper.kasmina.slot": ("blend_add", "blend_gate", "blend_multiply", "blend_with_isolation", "ste_forward"),
    "esper.kasmina.blending": ("GatedBlend",),
    "esper.kasmina": ("GatedBlend",),
}


def _drop_esper_modules():
    for name in [n for n in sys.modules if n == "esper" or n.startswith("esper.")]:
        del sys.modules[name]


@pytest.fixture
def standin():
    """The stand-in Esper importable; afterwards any install undone, its modules forgotten
    and sys.path as before."""
    assert "esper" not in sys.modules, "a real or stale esper package is imported"
    sys.path.insert(0, STANDIN)
    try:
        yield
    finally:
        handle = installed()
        if handle is not None:
            handle.uninstall()
        _drop_esper_modules()
        sys.path.remove(STANDIN)
        importlib.invalidate_caches()


def _bindings() -> dict:
    """Every (module, name) binding the install is about, and the catalog's gated entry."""
    out = {}
    for module_name, names in FUNCTIONS.items():
        module = sys.modules[module_name]
        for name in names:
            out[(module_name, name)] = getattr(module, name)
    out[("BlendCatalog", "gated")] = sys.modules["esper.kasmina.blending"].BlendCatalog._algorithms["gated"]
    return out


def _assert_drop_ins(bindings: dict) -> None:
    for (module_name, name), value in bindings.items():
        if name in ("GatedBlend", "gated"):
            assert value is GatedBlend, (module_name, name)
        else:
            assert value is kk.swap.DROP_INS[name], (module_name, name)


def test_install_after_esper_was_imported_and_uninstall(standin):
    import esper.kasmina.slot  # noqa: F401  (imports the whole kasmina layout)

    originals = _bindings()
    assert originals[("esper.kasmina.slot", "blend_add")] is originals[("esper.kasmina.blend_ops", "blend_add")]
    handle = install()
    assert handle.active
    _assert_drop_ins(_bindings())
    # names the install is not about stay Esper's
    blending = sys.modules["esper.kasmina.blending"]
    assert blending.BlendCatalog._algorithms["linear"] is blending.LinearBlend
    assert sys.modules["esper.kasmina.isolation"].GradientHealthMonitor.__module__ == "esper.kasmina.isolation"
    handle.uninstall()
    assert not handle.active and installed() is None
    after = _bindings()
    for key, value in originals.items():
        assert after[key] is value, key
    handle.uninstall()  # a second uninstall does nothing
    assert _bindings() == originals


def test_install_before_esper_is_imported(standin):
    assert "esper.kasmina.slot" not in sys.modules
    handle = install()
    # install imported the namespaces itself; code imported afterwards binds the drop-ins
    from esper.kasmina import late_user
    from esper.kasmina.blend_ops import blend_add
    from esper.kasmina.slot import SeedSlot

    assert blend_add is blend_ops.blend_add
    assert late_user.blend_add is blend_ops.blend_add and late_user.ste_forward is isolation.ste_forward
    _assert_drop_ins(_bindings())
    assert isinstance(SeedSlot(4).alpha_schedule, GatedBlend)
    handle.uninstall()
    assert sys.modules["esper.kasmina.slot"].blend_add.__module__ == "esper.kasmina.blend_ops"


def test_install_is_idempotent(standin):
    import esper.kasmina.slot  # noqa: F401

    originals = _bindings()
    first = install()
    count = len(first.replaced)
    second = install()
    assert second is first and len(second.replaced) == count
    _assert_drop_ins(_bindings())
    second.uninstall()
    # one uninstall restores Esper's originals: nothing was replaced twice
    after = _bindings()
    for key, value in originals.items():
        assert after[key] is value, key
    third = install()  # installs again after an uninstall
    assert third is not first and third.active
    _assert_drop_ins(_bindings())


def test_install_follows_esper_imported_again(standin):
    """An install into modules since dropped from sys.modules does not count: install again
    replaces the names in the modules imported now."""
    stale = install()
    _drop_esper_modules()
    import esper.kasmina.slot  # noqa: F401  (fresh module objects)

    fresh = install()
    assert fresh is not stale and not stale.active
    _assert_drop_ins(_bindings())


@pytest.mark.parametrize("missing", ["esper.kasmina.isolation", "esper.kasmina.slot", "esper"])
def test_missing_namespace_refused_and_nothing_replaced(standin, monkeypatch, missing):
    import esper.kasmina.blend_ops as ops_module

    original = ops_module.blend_add
    if missing == "esper":
        _drop_esper_modules()
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != STANDIN])
    monkeypatch.setitem(sys.modules, missing, None)  # importing it raises ImportError
    with pytest.raises(EsperNotFoundError, match=missing.replace(".", r"\.")) as info:
        install()
    assert isinstance(info.value, ImportError)
    assert installed() is None
    assert ops_module.blend_add is original


def test_layout_changes_refused_and_nothing_replaced(standin, monkeypatch):
    import esper.kasmina.slot as slot

    blending = sys.modules["esper.kasmina.blending"]
    original = slot.blend_add
    monkeypatch.setattr(blending.BlendCatalog, "_algorithms", {"linear": blending.LinearBlend})
    with pytest.raises(EsperNotFoundError, match="BlendCatalog._algorithms"):
        install()
    assert slot.blend_add is original and blending.GatedBlend is not GatedBlend
    monkeypatch.undo()
    for name in ("blend_add", "blend_gate", "blend_multiply", "blend_with_isolation", "ste_forward"):
        monkeypatch.delattr(slot, name)
    with pytest.raises(EsperNotFoundError, match="esper.kasmina.slot holds none"):
        install()
    assert sys.modules["esper.kasmina.blend_ops"].blend_add.__module__ == "esper.kasmina.blend_ops"
    assert installed() is None


def test_checkpoint_reload_through_the_catalog_builds_the_fused_gated_blend(standin):
    from esper.kasmina.blending import GatedBlend as EsperGatedBlend
    from esper.kasmina.slot import SeedSlot

    torch.manual_seed(0)
    eager_slot = SeedSlot(8)
    assert type(eager_slot.alpha_schedule) is EsperGatedBlend
    checkpoint = eager_slot.state_dict()
    h = torch.randn(3, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    want = eager_slot(h)
    (want_dh,) = torch.autograd.grad(want.square().sum(), h)

    with install():
        slot = SeedSlot(8)
        slot.load_state_dict(checkpoint, strict=True)
        assert type(slot.alpha_schedule) is GatedBlend  # built again through BlendCatalog
        for key, value in checkpoint.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(slot.state_dict()[key], value), key
        got = slot(h)
        (got_dh,) = torch.autograd.grad(got.square().sum(), h)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_dh, want_dh)
        # every slot mode runs the drop-ins
        for mode in ("add", "multiply", "isolation", "ste"):
            slot.mode = eager_slot.mode = mode
            torch.testing.assert_close(slot(h), eager_slot(h))
    assert type(SeedSlot(8).alpha_schedule) is EsperGatedBlend
