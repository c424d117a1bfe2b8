"""`kasmina_kernels.swap_in` on dummy module namespaces standing in for Esper's modules."""

from __future__ import annotations

import sys
import types
from types import MappingProxyType

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels import blend_ops, isolation, reference
from kasmina_kernels.nn import EagerGatedBlend, GatedBlend
from kasmina_kernels.swap import DROP_INS


def _esper_like_slot_module(name: str = "fake_esper_slot") -> types.ModuleType:
    """A module that did `from ...blend_ops import blend_gate, blend_multiply`,
    `from ...isolation import blend_with_isolation, ste_forward` and holds GatedBlend."""
    mod = types.ModuleType(name)
    mod.blend_gate = reference.blend_gate
    mod.blend_multiply = reference.blend_multiply
    mod.blend_with_isolation = reference.blend_with_isolation
    mod.ste_forward = reference.ste_forward
    mod.GatedBlend = EagerGatedBlend
    mod.unrelated = object()
    return mod


ORIGINALS = ("blend_gate", "blend_multiply", "blend_with_isolation", "ste_forward", "GatedBlend")


def test_drop_ins_table_names_the_drop_in_objects():
    assert DROP_INS["blend_add"] is blend_ops.blend_add
    assert DROP_INS["ste_forward"] is isolation.ste_forward
    assert DROP_INS["GatedBlend"] is GatedBlend
    assert set(DROP_INS) == set(blend_ops.__all__) | set(isolation.__all__) | {"GatedBlend"}


def test_swap_replaces_the_names_the_module_holds_and_undo_restores_them():
    mod = _esper_like_slot_module()
    before = {n: getattr(mod, n) for n in (*ORIGINALS, "unrelated")}
    handle = kk.swap_in(mod)
    for n in ORIGINALS:
        assert getattr(mod, n) is DROP_INS[n]
    assert mod.unrelated is before["unrelated"]
    assert not hasattr(mod, "blend_add")  # names the module never had are not added
    assert sorted(n for _, n in handle.replaced) == sorted(ORIGINALS)
    # code looking the names up in the module now runs the drop-ins on the native backend
    h, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with kk.use_backend("native"):
        y = mod.blend_gate(h, s, torch.tensor(0.5), mod.GatedBlend(3)(h))
    assert y.shape == h.shape
    handle.undo()
    for n, v in before.items():
        assert getattr(mod, n) is v
    assert handle.replaced == []
    handle.undo()  # a second undo does nothing
    for n, v in before.items():
        assert getattr(mod, n) is v


def test_swap_several_namespaces_and_nested_swaps_undo_in_order():
    a, b = _esper_like_slot_module("a"), _esper_like_slot_module("b")
    outer = kk.swap_in(a, b)
    assert a.ste_forward is b.ste_forward is isolation.ste_forward
    sentinel = object()
    inner = kk.swap_in(a, replacements={"ste_forward": sentinel})
    assert a.ste_forward is sentinel
    inner.undo()
    assert a.ste_forward is isolation.ste_forward
    outer.undo()
    assert a.ste_forward is b.ste_forward is reference.ste_forward


def test_context_manager_undoes_on_exit_and_on_error():
    mod = _esper_like_slot_module()
    with kk.swap_in(mod) as handle:
        assert mod.blend_multiply is blend_ops.blend_multiply
        assert isinstance(handle, kk.SwapHandle)
    assert mod.blend_multiply is reference.blend_multiply
    with pytest.raises(RuntimeError, match="boom"):
        with kk.swap_in(mod):
            raise RuntimeError("boom")
    assert mod.blend_multiply is reference.blend_multiply


def test_module_given_by_name(monkeypatch):
    mod = _esper_like_slot_module("fake_esper.kasmina.slot")
    monkeypatch.setitem(sys.modules, "fake_esper.kasmina.slot", mod)
    with kk.swap_in("fake_esper.kasmina.slot"):
        assert mod.blend_gate is blend_ops.blend_gate
    assert mod.blend_gate is reference.blend_gate


def test_registry_dict_and_class_namespaces():
    registry = {"gated": EagerGatedBlend}  # like Esper's BlendCatalog._algorithms
    with kk.swap_in(registry, replacements={"gated": GatedBlend}):
        assert registry["gated"] is GatedBlend
    assert registry["gated"] is EagerGatedBlend

    class Holder:
        blend_add = staticmethod(reference.blend_add)

    args = (torch.ones(2), torch.zeros(2), torch.tensor(0.0))
    with kk.swap_in(Holder):
        assert Holder.blend_add is blend_ops.blend_add
        assert Holder().blend_add(*args).tolist() == [1.0, 1.0]  # still a staticmethod
    assert isinstance(vars(Holder)["blend_add"], staticmethod)
    assert Holder.blend_add is reference.blend_add
    assert Holder().blend_add(*args).tolist() == [1.0, 1.0]

    instance = Holder()  # the name lives on the class: undo uncovers it again
    with kk.swap_in(instance):
        assert instance.blend_add is blend_ops.blend_add
        assert Holder.blend_add is reference.blend_add
    assert "blend_add" not in vars(instance) and instance.blend_add is reference.blend_add


def test_bad_namespaces_are_errors_and_change_nothing():
    good = _esper_like_slot_module()
    with pytest.raises(ValueError, match="holds none of the names"):
        kk.swap_in(good, types.ModuleType("empty"))
    assert good.blend_gate is reference.blend_gate  # nothing replaced when any namespace is bad
    with pytest.raises(ValueError, match="at least one namespace"):
        kk.swap_in()
    with pytest.raises(TypeError, match="must be mutable"):
        kk.swap_in(MappingProxyType({"blend_add": reference.blend_add}))
    with pytest.raises(TypeError, match="replacements"):
        kk.swap_in(good, replacements=[("blend_gate", None)])
    with pytest.raises(ModuleNotFoundError):
        kk.swap_in("no_such_module_for_kasmina_swap")
