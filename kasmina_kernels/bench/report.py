"""The benchmark report: run metadata, markdown tables and the JSON file."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
from pathlib import Path

import torch

from .. import backends
from . import esper, step as step_bench
from .plan import ESPER_GROUP, NAMED_GROUPS, entry_name
from .timing import MIN_ROUNDS, SPREAD_LIMIT

PEERS = ("eager", "compile")
PEER_NAMES = {"eager": "eager PyTorch", "compile": "torch.compile of the reference"}
FB = "forward+backward"
INCONCLUSIVE = "~"  # a ratio the timings do not support (legend)
ABOVE_COPY = "(!)"  # GB/s above a same-size copy's (legend)
HEADER_KEYS = ("device", "cpu_count", "usable cores", "load average at start", "threads", "residuals",
               "L2_cache_bytes", "platform", "python", "torch", "torch CUDA", "triton",
               "native built with CUDA", "native CPU capability",
               "transparent huge pages", "date", "rotation_bytes", "inductor_warmup_s", "command")
METHOD = (
    "Method (docs/benchmarks.md#reading-the-report): each implementation is checked against the "
    "eager reference (docs/semantics.md#equivalence) before it is timed. Times are medians after "
    "warm-up, implementations alternating round by round on rotating random inputs (never zero); "
    "CUDA times by device events, CPU times by perf_counter. Forward is the training forward; "
    "backward produces every gradient. GB/s: the byte counts of docs/semantics.md#performance-model; "
    "% copy: against a same-size device copy. µs/call: back-to-back forward calls, host overhead "
    "included. 'kernel' columns (CUDA): device-busy time per call. compile s: torch.compile's first "
    "forward+backward, never timed; '(cached)': inductor's on-disk cache served it.")


def machine(device: torch.device) -> dict:
    info = {"date": datetime.date.today().isoformat(), "device_type": device.type,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = props.name
        info["L2_cache_bytes"] = int(getattr(props, "L2_cache_size", 0) or 0)
        info["device_memory_bytes"] = int(props.total_memory)
    else:
        try:
            names = [line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        except OSError:
            names = []
        info["device"] = names[0] if names else info["processor"]
        info["transparent huge pages"] = transparent_huge_pages()
    info["cpu_count"] = os.cpu_count()
    info.update({k: str(v) for k, v in backends.build_summary().items()})
    return info


def transparent_huge_pages(sysfs: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> str:
    """The kernel's transparent-huge-page mode and torch's THP_MEM_ALLOC_ENABLE: together they
    decide whether large CPU outputs fault in 4 KiB pages (docs/benchmarks.md#cpu-memory-notes)."""
    try:
        text = Path(sysfs).read_text()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        mode = "unknown"
    return f"{mode} (THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')})"


def _us(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:,.0f}" if seconds >= 1e-4 else f"{seconds * 1e6:.1f}"


def _shape(s) -> str:
    return "(" + ",".join(str(v) for v in s) + ")"


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(head: list[str], left: int, rows: list[list[str]]) -> list[str]:
    """A markdown table: the first `left` columns left-aligned, the rest right-aligned."""
    rule = ["---"] * left + ["---:"] * (len(head) - left)
    return [markdown_row(cells) for cells in (head, rule, *rows)]


def _impl_names(records: list[dict]) -> list[str]:
    names = list(dict.fromkeys(n for r in records for n in r["impls"]))
    return [n for n in PEERS if n in names] + [n for n in names if n not in PEERS]


def _kernels(records: list[dict]) -> list[str]:
    return [n for n in _impl_names(records) if n not in PEERS]


def _why(d: dict, peer: str, mode: str) -> str | None:
    """Why the timings do not support `d`'s ratio against `peer` in `mode` (None: they do)."""
    return d.get("speedup_support", {}).get(peer, {}).get(mode, {}).get("why")


def conclusive(d: dict, peer: str, mode: str) -> bool:
    return _why(d, peer, mode) is None


def _ratio(d: dict, peer: str, mode: str) -> str:
    """An implementation's ratio against `peer`, marked INCONCLUSIVE where the timings do not
    support it."""
    r = d.get("speedup", {}).get(peer, {}).get(mode)
    if r is None:
        return "-"
    return f"{r:.2f}x" + ("" if conclusive(d, peer, mode) else f" {INCONCLUSIVE}")


def legend() -> list[str]:
    """What the marks mean and when a ratio counts (timing.compare's rule)."""
    return [
        "*Legend:* ratios are peer time / backend time (above 1.00x: the backend is faster). A "
        f"ratio is a verdict only when neither implementation's timings spread more than "
        f"{SPREAD_LIMIT:.0%} (IQR/median), every round's ratio (at least {MIN_ROUNDS} rounds) lies "
        "on the same side of 1.00x, and neither GB/s is above the same-size copy's "
        "(docs/benchmarks.md#reading-the-report). "
        f"`{INCONCLUSIVE}` after a ratio (e.g. `1.04x {INCONCLUSIVE}`): inconclusive, left out of "
        f"the counts ahead and behind and listed apart with its reason. `{ABOVE_COPY}` after a "
        "GB/s figure: above a same-size copy, a timing artefact, not a measured speed (except the "
        "native CPU backward of gated_pool and gate_network, which writes no dense dx: there the "
        "ratio still counts)."]


def side_by_side(rows: list[dict], mode: str, alpha: bool = False) -> list[str]:
    """`mode` times of every implementation side by side, and each backend's ratio against each
    peer; `alpha`: a column naming the alpha form of Esper's calls."""
    impls, kernels = _impl_names(rows), _kernels(rows)
    head = ["op", "shape", "dtype"] + ["alpha"] * alpha + [f"{n} µs" for n in impls]
    body = [[r["op"], _shape(r["shape"]), r["dtype"]] + [esper.PATTERNS.get(r.get("pattern"), "?")] * alpha
            + [_us(r["impls"].get(n, {}).get(mode, {}).get("median")) for n in impls]
            + [_ratio(r["impls"].get(k, {}), p, mode) for k in kernels for p in PEERS] for r in rows]
    return markdown_table(head + [f"{k} vs {p}" for k in kernels for p in PEERS], 3 + alpha, body)


def _bandwidth(d: dict, mode: str, kind: str = "") -> str:
    """GB/s and % copy of an implementation's record in `mode`; kind "kernel_": by kernel time."""
    gb, fr = d.get(f"{kind}GBps", {}), d.get(f"{kind}copy_fraction", {})
    if mode not in gb or mode not in fr:
        return "-"
    return f"{gb[mode]:.1f} ({fr[mode] * 100:.0f}%)" + (f" {ABOVE_COPY}" if fr[mode] > 1.0 else "")


def _has_kernel_time(records: list[dict]) -> bool:
    return any("kernel" in d for r in records for d in r["impls"].values())


def detail_table(records: list[dict]) -> list[str]:
    kernel = _has_kernel_time(records)
    head = ["op", "shape", "dtype", "inputs", "impl", "fwd µs", "bwd µs", "fwd+bwd µs", "µs/call",
            "fwd GB/s (% copy)", "bwd GB/s (% copy)"]
    head += ["kernel fwd µs", "kernel bwd µs", "kernel fwd GB/s (% copy)", "kernel bwd GB/s (% copy)"] * kernel
    rows = []
    for r in (r for r in records if r.get("group") != "sweep"):
        for name in _impl_names([r]):
            d = r["impls"][name]
            if "forward" not in d:
                continue
            comp = "reused (dynamic)" if d.get("compile_reused") else "-"
            if d.get("compile_s") is not None:
                comp = f"{d['compile_s']:.2f}" + (" (cached)" if d.get("compile_cache_hits") else "")
            cells = [r["op"], _shape(r["shape"]), r["dtype"], r.get("pattern", "isolated"), name,
                     _us(d["forward"]["median"]), _us(d["backward"]["median"]), _us(d[FB]["median"]),
                     f"{d['call_us']:.1f}" if "call_us" in d else "-",
                     _bandwidth(d, "forward"), _bandwidth(d, "backward")]
            if kernel:
                cells += [_us(d.get("kernel", {}).get(m, {}).get("median")) for m in ("forward", "backward")]
                cells += [_bandwidth(d, m, "kernel_") for m in ("forward", "backward")]
            rows.append(cells + [f"{d['saved_bytes'] / 2**20:.2f} ({d['saved_extra_bytes'] / 2**20:.2f})"
                                 if "saved_bytes" in d else "-", comp])
    return markdown_table(head + ["saved MiB (not inputs)", "compile s"], 5, rows)


def sweep_table(records: list[dict]) -> list[str]:
    rows = sorted((r for r in records if r.get("group") == "sweep" and "copy" in r),
                  key=lambda r: (r["op"], r["dtype"], r["numel"]))
    impls, kernel = _impl_names(rows), _has_kernel_time(rows)
    head = ["op", "dtype", "numel", "MiB/tensor", "copy GB/s"] + [f"{n} GB/s (% copy)" for n in impls]
    head += (["copy kernel GB/s"] + [f"{n} kernel GB/s (% copy)" for n in impls]) * kernel
    body = []
    for r in rows:
        cells = [r["op"], r["dtype"], f"{r['numel']:,}", f"{r['feature_bytes'] / 2**20:.2f}",
                 f"{r['copy']['GBps']:.1f}"] + [_bandwidth(r["impls"].get(n, {}), FB) for n in impls]
        if kernel:
            cells += [f"{ck:.1f}" if (ck := r["copy"].get("kernel_GBps")) else "-"]
            cells += [_bandwidth(r["impls"].get(n, {}), FB, "kernel_") for n in impls]
        body.append(cells)
    return markdown_table(head, 2, body)


def verdicts(records: list[dict], groups=NAMED_GROUPS) -> list[str]:
    """Plain statements of where a kernel backend is not ahead of a peer (forward+backward at
    the named shapes, or in the `groups` given), and a count of where it is; ratios the
    timings do not support (see `legend`) are counted in neither and listed apart."""
    lines = []
    rows = [r for r in records if r.get("group") in groups]
    for k, peer in itertools.product(_kernels(rows), PEERS):
        ahead, behind, unclear = 0, [], []
        for r in rows:
            d = r["impls"].get(k, {})
            sp = d.get("speedup", {}).get(peer, {}).get(FB)
            if sp is None:
                continue
            alpha = f" alpha {esper.PATTERNS[r['pattern']]}" if r.get("pattern") in esper.PATTERNS else ""
            case = f"{r['op']} {_shape(r['shape'])} {r['dtype']}{alpha}"
            if not conclusive(d, peer, FB):
                unclear.append(f"{case} ({sp:.2f}x {INCONCLUSIVE}: {_why(d, peer, FB)})")
            elif sp > 1.0:
                ahead += 1
            else:
                behind.append(f"{case} ({sp:.2f}x)")
        total, peer_name = ahead + len(behind), PEER_NAMES[peer]
        if not total and unclear:
            lines.append(f"- {k} against {peer_name}, forward+backward: no verdict, all "
                         f"{len(unclear)} cases inconclusive.")
        elif behind:
            lines.append(f"- **{k} is not ahead of {peer_name}** in forward+backward in "
                         f"{len(behind)} of {total} cases with a verdict: " + ", ".join(behind) + ".")
        elif total:
            lines.append(f"- {k} is ahead of {peer_name} in forward+backward in all {total} "
                         "cases with a verdict.")
        if unclear:
            lines.append(f"  - inconclusive, not counted ({len(unclear)} of "
                         f"{total + len(unclear)}): " + "; ".join(unclear) + ".")
    return lines


def inputs_legend(records: list[dict]) -> list[str]:
    """One line per feature rank: each input's layout, dtype relation and requires-grad flag,
    taken from the input sets as built (the records' "inputs"), so the statement cannot drift
    from what was timed."""
    def layout_words(d):
        nchw = d["layout"] == "contiguous" and len(d["shape"]) == 4 and d["shape"][1:] != [1, 1, 1]
        return "NCHW contiguous" if nchw else d["layout"]

    by_rank: dict[str, dict[str, set]] = {}
    for r in (r for r in records if r.get("inputs")):
        h = r["inputs"].get("h")
        names = by_rank.setdefault("(B,C,H,W)" if len(r["shape"]) == 4 else "(B,T,C)", {})
        for name, d in r["inputs"].items():
            if name == "grad":
                desc = f"{layout_words(d)}, the output's layout"
            elif name == "h" or d["shape"] == list(r["shape"]):
                desc = layout_words(d)
            elif not d["shape"]:
                desc = "0-dim"
            else:
                batch = "K*B" if r.get("pattern") == "esper_override" and name == "alpha" else "B"
                desc = "(" + ",".join([batch] + [str(v) for v in d["shape"][1:]]) + ")"
            if name != "grad":
                desc += ", " + ("h's dtype" if h is None or d["dtype"] == h["dtype"] else d["dtype"])
                desc += ", requires grad" if d["requires_grad"] else ", no grad"
            names.setdefault(name, set()).add(desc)
    labels = {"h": "h", "s": "s", "seed_input": "seed_input r", "alpha": "alpha", "gate": "gate",
              "grad": "incoming grad"}
    return [f"*Inputs {rank}:* " + "; ".join(f"{label}: " + " | ".join(sorted(names[name]))
                                             for name, label in labels.items() if name in names) + "."
            for rank, names in by_rank.items()]


def gradients_legend(records: list[dict]) -> list[str]:
    """The layouts of the gradients each implementation returned for the (B,C,H,W) rows: what
    a backward delivers besides its time (eager's follow the incoming gradient)."""
    by_impl: dict[str, dict[str, set]] = {}
    for r in (r for r in records if len(r["shape"]) == 4):
        for impl, d in r["impls"].items():
            for name, layout in d.get("grad_layouts", {}).items():
                by_impl.setdefault(impl, {}).setdefault(name, set()).add(layout)
    if not by_impl:
        return []
    return ["*Gradients returned (B,C,H,W):* " + "; ".join(
        f"{impl}: " + ", ".join(f"d{n} " + " | ".join(sorted(v)) for n, v in names.items())
        for impl, names in by_impl.items()) + ". A gradient in another layout than its input's "
        "leaves moving it to whatever consumes it (the seed's layers for ds), outside the timing."]


def esper_section(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("group") == ESPER_GROUP]
    if not rows:
        return []
    failures = [f"{r['op']} {_shape(r['shape'])} {r['dtype']} {r.get('pattern')}: {f}"
                for r in rows for f in r["failures"]]
    inputs = inputs_legend(rows)
    return ["## Esper's calls (docs/semantics.md#espers-calls), forward+backward", "",
            "The layouts, dtypes and requires-grad flags of Esper's `SeedSlot.forward` "
            "(kasmina_kernels/bench/esper.py): channels_last CNN host beside NCHW seed features and "
            "seed input, alpha without grad (0-dim: Esper's cached amplitude; (K*B,1,...): the "
            "alpha_override form), gate with grad. Backward produces the gradients of the inputs "
            "that require grad only. Every backend was checked on these very inputs first.", "",
            "**FAILED**: " + "; ".join(failures) if failures else
            "Check: every backend matched the reference on every one of these calls.", "",
            *verdicts(records, groups=(ESPER_GROUP,)), "", *inputs, "", *gradients_legend(rows), "",
            *side_by_side(rows, FB, alpha=True),
            "", "### Esper's calls, forward only", "", *inputs, "", *side_by_side(rows, "forward", alpha=True), ""]


def markdown(meta: dict, records: list[dict], skipped: list, excluded: dict, notes: list[str],
             step: dict | None = None) -> str:
    out = [f"# kasmina-kernels benchmark: {meta['device']} ({meta['device_type']}), {meta['date']}", "",
           "| | |", "| --- | --- |"]
    out += [f"| {key} | {meta[key]} |" for key in HEADER_KEYS if key in meta]
    out += ["", METHOD, "", *legend(), ""]
    out += [f"- {n}" for n in notes] + [f"- {name} excluded: {why}" for name, why in excluded.items()]
    if skipped:
        out.append(f"- **{len(skipped)} entries not run (time limit reached)**: "
                   + ", ".join(e.name for e in skipped))
    out += [""] + esper_section(records)
    if records:
        out += result_check(records)
        isolated = [r for r in records if r.get("group") in NAMED_GROUPS]
        if isolated:
            out += ["", "## Op isolation (every input requires grad, all contiguous): forward+backward "
                    "at Esper's shapes and the small shape", "",
                    "*Inputs:* as `kasmina_kernels.opcases` builds them: h, s (and seed_input) "
                    "contiguous, alpha (and gate) per sample (B,1,...) float32, every floating-point "
                    "input requires grad (so backward computes dalpha and dgate too); incoming grad "
                    "contiguous. Not Esper's call: see the first section for that.", "",
                    *verdicts(records), "", *side_by_side(isolated, FB)]
        out += ["", "## Forward, backward, per call, bandwidth, memory, compile time (every entry)", "",
                "*Inputs:* 'esper' / 'esper_override' rows are Esper's calls (first section's "
                "layouts and flags); 'isolated' rows have every input contiguous and requiring grad.",
                "", *detail_table(records)]
        if any(r.get("group") == "sweep" for r in records):
            out += ["", "## Size sweep: forward+backward GB/s (the performance model's byte counts) "
                    "and % of copy" + (" (by event time, then by kernel time)" if _has_kernel_time(records)
                                       else ""), "", *sweep_table(records)]
        out.append("")
    if step is not None:
        out += step_section(step, meta.get("device_type", "cpu"))
    return "\n".join(out)


def step_section(result: dict, device_type: str) -> list[str]:
    """The training-step section (step.py's result)."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    what = ("CUDA kernels" if device_type == "cuda" else
            "leaf aten/kasmina operator events, plus inductor's C++ kernels under compile")
    n = result["agree_steps"]
    lines = ["## A whole training step (docs/semantics.md#performance-model, item 2)", "",
             f"Forward, cross-entropy, backward and SGD (lr {step_bench.LR}) of an Esper-style host "
             "(kasmina_kernels/bench/esper_models.py): eager blends against the drop-ins under "
             "`kasmina_kernels.use_backend(backend)`, eager and with the step in `torch.compile` "
             "(columns: docs/benchmarks.md#reading-the-report); slots as Esper's `SeedSlot.forward`: "
             "s = seed(r), r = h.contiguous().detach(), gate = GatedBlend.get_alpha_for_blend(r), "
             f"alpha {step_bench.ALPHA}. ms/step: median after {n} loss-check steps and warm-up, "
             f"variants interleaved; '{INCONCLUSIVE}': inconclusive (the legend's rule). kernels/step: "
             f"{what}, torch.profiler over {step_bench.PROFILE_STEPS} steps. blend share: the blend "
             "ranges and their backward nodes over the step ('(ops)': the `kasmina::` operators under "
             f"compile). rel loss diff: max over {n} steps against eager blends in the same mode / in "
             "eager mode.",
             "", "*Precision:* " + ("bf16 autocast around the model (Esper's GPU training); the loss "
                                   "and its backward in float32. The blends run on bfloat16 features "
                                   "and round at different points than eager's (docs/rounding.md), so "
                                   "loss differences are shown, not judged."
                                   if result.get("autocast") else "float32 throughout."), ""]
    lines += [f"- {name} excluded: {why}" for name, why in result.get("excluded", {}).items()]
    cuda = device_type == "cuda"
    head = ["blends", "mode", "ms/step", "vs eager blends"] + ["kernel ms/step"] * cuda + [
        "kernels/step", "kasmina ops/step", "blend share", "rel loss diff (same mode / vs eager mode)",
        "first step s"]
    for host in result["hosts"]:
        rows = []
        for row in host["rows"].values():
            if "error" in row:
                rows.append([row["variant"], row["mode"], f"FAILED: {row['error'].replace('|', '/')}"]
                            + [""] * (len(head) - 3))
                continue
            share = fmt(row.get("blend_share"), ".1%")
            if row.get("blend_share_method") == "kasmina:: operators":
                share += " (ops)"
            unclear = not row.get("speedup_support", {}).get("conclusive", True)
            rows.append([row["variant"], row["mode"], fmt(row.get("ms_per_step"), ".1f"),
                         f"{fmt(row.get('speedup_vs_eager_blends'), '.2f')}x" + f" {INCONCLUSIVE}" * unclear]
                        + [fmt(row.get("kernel_ms_per_step"), ".2f")] * cuda
                        + [fmt(row.get("kernels_per_step"), ".0f"), fmt(row.get("kasmina_ops_per_step"), ".0f"),
                         share, f"{fmt(row.get('max_rel_loss_diff'), '.1e')} / "
                         f"{fmt(row.get('max_rel_loss_diff_vs_eager_mode'), '.1e')}",
                         fmt(row.get("first_step_s"), ".1f")])
            if row.get("profile_error"):
                rows.append(["", "", f"profile failed: {row['profile_error']}"] + [""] * (len(head) - 3))
        lines += ["", f"### {host['host']}: {host['description']}", "",
                  "*Inputs:* " + ("host features channels_last with grad; r NCHW no grad; s NCHW "
                                  "with grad; alpha 0-dim no grad; gate (B,1,1,1) with grad."
                                  if host["host"] == "cnn" else
                                  "(B,T,C) contiguous everywhere; r no grad; s with grad; alpha "
                                  "0-dim no grad; gate (B,1,1) with grad."), "",
                  *markdown_table(head, 2, rows)]
    return lines + [""]


def result_check(records: list[dict]) -> list[str]:
    """The library's outcome (each kernel backend's check, and entries that raised) apart from
    the peers': torch.compile of the reference not matching the equivalence rule is a fact
    about that peer, never counted as a failure of this library."""
    out = ["## Result check", "", "**The library** (kasmina-kernels backends, each checked against "
           "the eager reference by docs/semantics.md#equivalence before it was timed):", ""]
    kernels = _kernels(records)
    for k in kernels:
        checked = [r for r in records if k in r["impls"]]
        bad = [f"{entry_name(r)}: " + "; ".join(r["impls"][k]["check"]["problems"])
               for r in checked if r["impls"][k]["check"]["ok"] is False]
        out.append(f"- **{k}: FAILED in {len(bad)} of {len(checked)} entries**: " + "; ".join(bad) if bad
                   else f"- {k}: outputs and gradients matched the reference in all {len(checked)} entries.")
    raised = [f"{entry_name(r)}: {f}" for r in records for f in r["failures"] if f.startswith("the entry raised")]
    if raised:
        out.append(f"- **{len(raised)} entries raised** (nothing timed): " + "; ".join(raised))
    if not kernels and not raised:
        out.append("- no kernel backend was timed.")
    out += ["", "**The peers** (not this library; reported, never counted as its failure):", ""]
    comp = [r for r in records if "compile" in r["impls"]]
    judged = [r for r in comp if r["impls"]["compile"]["check"]["ok"] is not None]
    off = [r for r in judged if r["impls"]["compile"]["check"]["ok"] is False]
    if comp:
        out.append(f"- torch.compile of the reference: matched the equivalence rule in "
                   f"{len(judged) - len(off)} of {len(judged)} entries judged"
                   + (f" ({len(comp) - len(judged)} larger entries not judged: it costs seconds each)"
                      if len(comp) > len(judged) else "") + ".")
        out += [f"  - does not match in {entry_name(r)}: "
                + "; ".join(p[:300] for p in r["impls"]["compile"]["check"]["problems"]) for r in off]
    uncompiled = [r for r in records if any(n.startswith("torch.compile peer failed") for n in r["notes"])]
    if uncompiled:
        out.append(f"- torch.compile of the reference failed to compile in {len(uncompiled)} "
                   "entries (listed below).")
    if not comp and not uncompiled:
        out.append("- torch.compile of the reference was not run.")
    out.append("- eager: the reference itself.")
    other = [f"- {entry_name(r)}: {n}" for r in records for n in r["notes"]
             if not n.startswith("torch.compile of the reference does not match")]
    return out + (["", "Other notes:", "", *other] if other else [])


def write_json(path: Path, meta: dict, records: list[dict], skipped: list, excluded: dict,
               notes: list[str], step: dict | None = None) -> None:
    payload = {"meta": meta, "notes": notes, "excluded": excluded,
               "skipped": [{"op": e.op, "shape": list(e.shape), "dtype": e.dtype,
                            "pattern": e.pattern} for e in skipped],
               "records": records, "step": step}
    path.write_text(json.dumps(payload, indent=1, default=str))
