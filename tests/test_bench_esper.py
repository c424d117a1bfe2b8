"""The benchmark's Esper sections: the Esper-call workload really has the layouts, dtypes and
requires-grad flags of docs/semantics.md#espers-calls, its check runs on those very inputs, and the
report's first section is Esper's calls (tiny shapes, CPU)."""

from __future__ import annotations

import math

import torch

from kasmina_kernels.bench import esper, plan, report, sweep, workload
from kasmina_kernels.optable import BY_NAME

CL = torch.channels_last


def _build(op, shape=(4, 6, 3, 5), pattern="esper", dtype=torch.float32):
    return workload.build(BY_NAME[op], shape, dtype, "cpu", torch.Generator().manual_seed(0), 1 << 16,
                          pattern=pattern)


def _named(w, s):
    named = dict(zip(w.op.inputs, s.args))
    named.update(s.kwargs)
    return named


def test_cnn_esper_pattern_has_esper_layouts_and_flags():
    for op in esper.OPS:
        w = _build(op, dtype=torch.bfloat16)
        assert w.n_sets > 1
        for s in w.sets:
            t = _named(w, s)
            h, sf = t["h"], t["s"]
            assert h.is_contiguous(memory_format=CL) and not h.is_contiguous() and h.requires_grad
            assert sf.is_contiguous() and sf.requires_grad
            assert s.grad.is_contiguous(memory_format=CL) and not s.grad.is_contiguous()
            if "alpha" in t:
                a = t["alpha"]
                assert a.dim() == 0 and a.dtype == h.dtype and not a.requires_grad
                assert 0 < a.item() < 1
            if op == "blend_multiply":
                r = t["seed_input"]
                assert r.is_contiguous() and not r.requires_grad
                torch.testing.assert_close(r, h.detach(), rtol=0, atol=0)
            if op == "blend_gate":
                g = t["gate"]
                assert g.shape == (4, 1, 1, 1) and g.requires_grad and g.dtype == h.dtype
            assert {id(x) for x in s.leaves} == {id(x) for x in t.values() if x.requires_grad}
        # the inputs the report states are the ones built
        assert w.inputs["h"]["layout"] == "channels_last" and w.inputs["grad"]["layout"] == "channels_last"


def test_override_and_transformer_patterns():
    w = _build("blend_gate", pattern="esper_override")
    t = _named(w, w.sets[0])
    assert t["alpha"].shape == (4, 1, 1, 1) and not t["alpha"].requires_grad
    w = _build("blend_multiply", shape=(2, 5, 8), pattern="esper_override")
    t = _named(w, w.sets[0])
    assert all(x.is_contiguous() for x in t.values())
    assert t["alpha"].shape == (2, 1, 1) and not t["seed_input"].requires_grad
    assert t["h"].requires_grad and t["s"].requires_grad


def test_check_runs_with_the_patterns_flags():
    w = _build("blend_multiply")
    check = w.check()
    ref, oracle = check.expected
    assert set(ref) == set(oracle) == {"y", "dh", "ds"}  # no gradient for alpha or seed_input
    assert ref["y"].is_contiguous(memory_format=CL) and check.grad is w.sets[0].grad
    assert all(v.ok for v in check(BY_NAME["blend_multiply"].public))


def test_plan_puts_esper_calls_first():
    p = plan.make_plan(torch.device("cpu"), quick=True, ops=None, dtypes=None)
    first = [e for e in p.entries if e.group == "esper-call"]
    assert p.entries[:len(first)] == first
    assert {e.op for e in first} == set(esper.OPS)
    assert {e.pattern for e in first} == {"esper", "esper_override"}
    full = plan.make_plan(torch.device("cpu"), quick=False, ops=None, dtypes=None, esper_only=True)
    assert {e.shape for e in full.entries} == set(esper.SHAPES)
    assert {e.dtype for e in full.entries} == {"float32", "bfloat16"}


def test_time_limit_lists_each_skipped_entry_with_its_alpha_form():
    p = plan.make_plan(torch.device("cpu"), quick=True, ops=["blend_add"], dtypes=None, esper_only=True)
    records, skipped = sweep.run(p, torch.device("cpu"), ["native"], compile_peer=False, time_limit_s=-1.0)
    assert records == [] and skipped == p.entries
    text = report.markdown({"device": "cpu", "device_type": "cpu", "date": "today"}, records, skipped, {}, [])
    listed = text.split("entries not run (time limit reached)**: ")[1].splitlines()[0].split(", ")
    assert sorted(listed) == ["blend_add (128,16,16,16) float32 (esper)",
                              "blend_add (128,16,16,16) float32 (esper_override)"]


def test_entry_times_and_report_section_comes_first(monkeypatch):
    monkeypatch.setattr(esper, "QUICK_SHAPES", ((4, 6, 3, 5),))
    p = plan.make_plan(torch.device("cpu"), quick=True, ops=["blend_gate"], dtypes=None,
                       esper_only=True)
    p.effort = plan.Effort(rounds=2, budget_s=0.002, calls=5, call_rounds=2)
    records, skipped = sweep.run(p, torch.device("cpu"), ["native"], compile_peer=False)
    assert not skipped and len(records) == 2
    for r in records:
        assert not r["failures"], r["failures"]
        assert r["impls"]["native"]["check"]["ok"]
        assert r["impls"]["native"]["speedup"]["eager"]["forward+backward"] > 0
        assert r["inputs"]["alpha"]["requires_grad"] is False
    meta = {"device": "cpu", "device_type": "cpu", "date": "today"}
    text = report.markdown(meta, records, [], {}, p.notes)
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0].startswith("## Esper's calls")
    assert "*Inputs (B,C,H,W):* h: channels_last, h's dtype, requires grad" in text
    assert "alpha: (K*B,1,1,1), h's dtype, no grad | 0-dim, h's dtype, no grad" in text
    # the gradients' layouts as returned: eager's ds follows the channels_last incoming gradient
    legend = next(line for line in text.splitlines() if line.startswith("*Gradients returned"))
    assert "eager: dh channels_last, ds channels_last, dgate contiguous" in legend
    assert "native: dh channels_last, ds contiguous, dgate contiguous" in legend


# ---------------------------------------------------------------------------- training step
from types import SimpleNamespace  # noqa: E402

from kasmina_kernels.bench import esper_models, step  # noqa: E402
from kasmina_kernels.reference import (  # noqa: E402
    blend_gate, blend_multiply, blend_with_isolation, ste_forward)
from kasmina_kernels.nn import EagerGatedBlend  # noqa: E402


def test_slots_call_the_blends_with_esper_layouts_and_flags():
    seen = {}

    def spy(name, fn):
        def call(*args, **kwargs):
            seen[name] = (args, kwargs)
            return fn(*args, **kwargs)
        return call

    class SpyGatedBlend(EagerGatedBlend):
        def get_alpha_for_blend(self, x):
            seen["gate_input"] = x
            return super().get_alpha_for_blend(x)

    blends = SimpleNamespace(
        blend_with_isolation=spy("add", blend_with_isolation),
        blend_multiply=spy("multiply", blend_multiply), blend_gate=spy("gate", blend_gate),
        ste_forward=spy("ste", ste_forward), GatedBlend=SpyGatedBlend)
    model = esper_models.CNNHost(4, blends=blends)
    esper_models.set_alphas(model, 0.5)
    x, y = esper_models.image_batches(1, 3, image_size=8)[0]
    model(x).sum().backward()
    assert set(seen) == {"add", "multiply", "gate", "ste", "gate_input"}
    for name in ("add", "multiply", "gate", "ste"):
        args, kwargs = seen[name]
        h, s = args[0], args[1]
        assert h.is_contiguous(memory_format=CL) and not h.is_contiguous() and h.requires_grad
        assert s.is_contiguous() and s.requires_grad
        if name != "ste":
            alpha = args[2]
            assert alpha.dim() == 0 and alpha.dtype == h.dtype and not alpha.requires_grad
    r = seen["multiply"][1]["seed_input"]
    assert r.is_contiguous() and not r.requires_grad
    torch.testing.assert_close(r, seen["multiply"][0][0].detach(), rtol=0, atol=0)
    gate = seen["gate"][0][3]
    assert gate.shape == (3, 1, 1, 1) and gate.requires_grad
    assert seen["gate_input"].is_contiguous() and not seen["gate_input"].requires_grad


def _tiny_hosts():
    return [step.cnn_host(batch=4, image=8, width=4), step.transformer_host(2, 5, 16, 1, 2, 4)]


def test_step_benchmark_runs_eager_and_native_and_losses_agree():
    result = {"variants": [step.EAGER, "native"], "excluded": {}, "modes": ["eager"],
              "agree_steps": 20, "hosts": []}
    for host in _tiny_hosts():
        record = step.run_host(host, torch.device("cpu"), result["variants"], modes=("eager",),
                               agree_steps=20, rounds=2, budget_s=0.01, n_batches=2,
                               log=lambda m: None)
        result["hosts"].append(record)
        eager = record["rows"][f"{step.EAGER} / eager"]
        native = record["rows"]["native / eager"]
        assert len(eager["losses"]) == len(native["losses"]) == 20
        assert native["max_rel_loss_diff"] <= 1e-5
        for row in (eager, native):
            assert row["ms_per_step"] > 0 and row["kernels_per_step"] > 0
            assert 0 < row["blend_share"] < 1
            assert row["blend_share_method"] == "blend ranges + their backward nodes"
        assert eager["kasmina_ops_per_step"] == 0 and native["kasmina_ops_per_step"] > 0
        assert native["kernels_per_step"] < eager["kernels_per_step"]
    assert not step.failures(result)
    text = "\n".join(report.step_section(result, "cpu"))
    assert "## A whole training step" in text
    assert text.count("| eager blends | eager |") == 2 and text.count("| native | eager |") == 2


def test_step_under_autocast_reports_loss_differences_without_judging_them():
    host = _tiny_hosts()[0]
    record = step.run_host(host, torch.device("cpu"), [step.EAGER, "native"], modes=("eager",),
                           autocast=True, agree_steps=3, rounds=1, budget_s=0.01, n_batches=2,
                           log=lambda m: None)
    native = record["rows"]["native / eager"]
    assert all(math.isfinite(v) for v in native["losses"]) and native["max_rel_loss_diff"] < 0.1
    result = {"agree_steps": 3, "autocast": True, "hosts": [record]}
    record["rows"]["native / eager"]["max_rel_loss_diff"] = 1.0  # judged only in float32
    assert not step.failures(result)
    assert step.failures(dict(result, autocast=False))
    text = "\n".join(report.step_section(result, "cuda"))
    assert "*Precision:* bf16 autocast" in text and "| kernel ms/step |" in text


def test_step_compile_failure_is_reported_not_raised(monkeypatch):
    def broken(fn, *a, **k):
        raise RuntimeError("inductor exploded\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    host = _tiny_hosts()[1]
    record = step.run_host(host, torch.device("cpu"), [step.EAGER, "native"],
                           modes=("eager", "compile"), agree_steps=2, rounds=1, budget_s=0.01,
                           n_batches=2, log=lambda m: None)
    assert record["rows"]["native / compile"]["error"] == "RuntimeError: inductor exploded"
    assert "ms_per_step" in record["rows"]["native / eager"]
    result = {"agree_steps": 2, "hosts": [record]}
    assert "| native | compile | FAILED: RuntimeError: inductor exploded |" in "\n".join(
        report.step_section(result, "cpu"))


def _esper_calls_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "esper_calls.py"
    spec = importlib.util.spec_from_file_location("esper_calls", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_esper_calls_tool_times_each_call_from_unset_grads():
    """tools/esper_calls.py: every timed call starts with its own leaves' .grad unset, so no
    call adds into a .grad left by the one before, and a gradient in another layout than its
    leaf still reaches the leaf in the leaf's layout."""
    tool = _esper_calls_tool()
    h = torch.randn(2, 3, 4, 5).contiguous(memory_format=CL).requires_grad_()
    s = torch.randn(2, 3, 4, 5, requires_grad=True)
    other = torch.randn(2, 3, 4, 5, requires_grad=True)
    alpha = torch.tensor(0.5)
    assert {id(t) for t in tool.leaves_of(torch.lerp(h, s, alpha) * 2)} == {id(h), id(s)}
    torch.manual_seed(0)
    samples = tool.measure([lambda: torch.lerp(h, s, alpha)], calls_per_round=3, rounds=2)
    assert len(samples) == 1 and samples[0].median > 0
    torch.manual_seed(0)
    grad = torch.randn_like(torch.lerp(h, s, alpha).detach())  # measure's incoming gradient
    # one call's gradient after 3 * 2 timed calls and the warm-up: never a sum of calls
    torch.testing.assert_close(h.grad, grad * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, grad * 0.5, rtol=0, atol=0)
    assert s.grad.is_contiguous() and h.grad.is_contiguous(memory_format=CL)
    assert other.grad is None
