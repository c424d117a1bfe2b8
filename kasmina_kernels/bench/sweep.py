"""Runs a plan, entry by entry: build the inputs, compile the torch.compile peer (timed apart),
check every implementation against the reference (a backend that does not match is a failure
and is not timed), then time forward, backward and forward+backward side by side with a
same-size device copy, the per-call wall time where calls are short, and the bytes saved."""

from __future__ import annotations

import contextlib
import sys
import time
import zlib
from dataclasses import asdict

import torch

from .. import backends, opcases, optable
from . import bytemodel, esper, workload
from .plan import DTYPES, Entry, Plan
from .timing import Sample, compare, kernel_time, time_interleaved, wall_per_call

CPU_ROTATE_BYTES = 64 << 20
# per-call wall time (host overhead included) is measured where forward calls take at most
# this long: the microsecond regime of small shapes
CALL_REGIME_S = 1e-3
# the torch.compile peer is judged too (a note, never a failure) up to this size: judging costs
# seconds per output at Esper's sizes on CPU, and the peer is not what the check is for
PEER_CHECK_MAX_NUMEL = 1 << 20


def first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message, for a report's cell or note."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def rotate_bytes(device: torch.device) -> int:
    """Rotation target: twice the GPU's L2 cache (50 MB on an H100), 64 MiB on CPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return 2 * int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    return CPU_ROTATE_BYTES


def select_backends(device: torch.device, requested: list[str] | None) -> tuple[list[str], dict]:
    """Kernel backends to time on `device` and {backend: why it is left out}."""
    chosen, excluded = [], {}
    for name in requested or [b for b in backends.BACKENDS if b != "reference"]:
        if name == "reference":
            excluded[name] = "the eager reference is always timed, as the peer 'eager'"
        elif name == "triton" and device.type == "cpu":
            excluded[name] = ("Triton runs CPU tensors only in its interpreter "
                              "(TRITON_INTERPRET=1), orders of magnitude slower than compiled "
                              "code: its timings would say nothing about the kernels; the "
                              "Triton backend is timed on CUDA devices")
        elif (why := backends.backend_status(name, device.type)) is not None:
            excluded[name] = why
        else:
            chosen.append(name)
    return chosen, excluded


def check(impl, judge: opcases.Check) -> dict:
    """{"ok", "problems", "max_error_vs_reference"} of one implementation; an exception is a
    failed check."""
    try:
        verdicts = judge(impl.fn)
    except Exception as exc:
        return {"ok": False, "problems": [f"raised {type(exc).__name__}: {exc}"],
                "max_error_vs_reference": None}
    return {"ok": all(v.ok for v in verdicts), "problems": [v.message for v in verdicts if not v.ok],
            "max_error_vs_reference": max((v.error_vs_reference for v in verdicts), default=0.0)}


def _head(entry: Entry) -> dict:
    return {"op": entry.op, "shape": list(entry.shape), "dtype": entry.dtype, "group": entry.group,
            "pattern": entry.pattern}


def run_entry(entry: Entry, device: torch.device, kernel_backends: list[str], plan: Plan,
              compile_peer: bool, shared: dict) -> dict:
    """One entry, as a JSON-ready record. `shared`: dynamic-shape compiles reused across
    entries."""
    marks = [time.perf_counter()]  # phase_s: the inputs' building is the first phase
    gen = torch.Generator().manual_seed(zlib.crc32(f"{entry}".encode()))
    autocast = entry.dtype == esper.AUTOCAST  # its tensors are bfloat16
    dtype = torch.bfloat16 if autocast else DTYPES[entry.dtype]
    w = workload.build(optable.BY_NAME[entry.op], entry.shape, dtype, device, gen, rotate_bytes(device),
                       pattern=entry.pattern, autocast=autocast)
    feature, fwd_bytes, bwd_bytes, from_design = bytemodel.traffic(entry.op, w.base_args, w.base_kwargs,
                                                                   w.no_grad)
    record = {
        **_head(entry), "numel": feature.numel(), "feature_bytes": feature.numel() * feature.element_size(),
        "bytes": {"forward": fwd_bytes, "backward": bwd_bytes}, "bytes_from_design": from_design,
        "inputs": w.inputs, "n_sets": w.n_sets, "impls": {}, "failures": [], "notes": [], "phase_s": {},
    }

    def lap(name):  # seconds since the previous lap
        marks.append(time.perf_counter())
        record["phase_s"][name] = round(marks[-1] - marks[-2], 3)

    lap("inputs")
    impls = [workload.eager_impl(w)]
    if compile_peer and entry.compile_peer:
        try:
            impls.append(workload.compiled_impl(w, shared, dynamic=entry.compile_dynamic))
        except Exception as exc:  # e.g. no C++ compiler for inductor on CPU
            record["notes"].append(f"torch.compile peer failed to compile: {first_line(exc)}")
    impls += [workload.backend_impl(w, b) for b in kernel_backends]
    lap("compile")

    judge, timed = w.check(), [impls[0]]
    record["impls"]["eager"] = {"check": {"ok": True, "problems": [], "max_error_vs_reference": 0.0},
                                "compile_s": None}
    for impl in impls[1:]:
        peer = impl.name == "compile"
        result = (check(impl, judge) if not peer or w.base_args[0].numel() <= PEER_CHECK_MAX_NUMEL else
                  {"ok": None, "problems": ["not judged at this size"], "max_error_vs_reference": None})
        record["impls"][impl.name] = {"check": result, "compile_s": impl.compile_s,
                                      "compile_cache_hits": impl.cache_hits,
                                      "compile_dynamic": impl.dynamic, "compile_reused": impl.reused}
        if result["ok"] or peer:  # a peer's mismatch is reported, not the library's failure
            timed.append(impl)
        if result["ok"] is False:
            if peer:
                record["notes"].append("torch.compile of the reference does not match the eager "
                                       "reference by the equivalence rule: "
                                       + "; ".join(p[:300] for p in result["problems"]))
            else:
                record["failures"].append(f"{impl.name}: " + "; ".join(result["problems"]))
    del judge  # the reference and oracle outputs
    lap("check")

    # all implementations side by side per mode; a recompile would leak compile time into a
    # timed call, so it is an error here
    e = plan.effort
    with torch._dynamo.config.patch(error_on_recompile=True):
        for mode, make_step in workload.MODES.items():
            steps = [make_step(w, impl) for impl in timed]
            if mode == "forward":
                steps.append(workload.copy_step(feature, w.n_sets))
            samples = time_interleaved(steps, device, w.n_sets, rounds=e.rounds, budget_s=e.budget_s)
            if mode == "forward":
                copy = samples.pop()
                record["copy"] = {"time": asdict(copy), "GBps": 2 * record["feature_bytes"] / copy.median / 1e9}
            for impl, s in zip(timed, samples):
                record["impls"][impl.name][mode] = asdict(s)
            if device.type == "cuda":
                _kernel_times(record, mode, steps, timed, device, w.n_sets, e.kernel_iters)
            lap(mode)
        slowest = max(record["impls"][i.name]["forward"]["median"] for i in timed)
        if entry.group != "sweep" and slowest <= CALL_REGIME_S:
            calls = max(5, min(e.calls, int(e.budget_s / (e.call_rounds * slowest))))
            fns = [lambda i, s=workload.forward_step(w, impl): s.run(i, None) for impl in timed]
            for impl, s in zip(timed, wall_per_call(fns, device, w.n_sets, calls=calls, rounds=e.call_rounds)):
                record["impls"][impl.name]["call_us"] = s.median * 1e6
            lap("call")
    for impl in timed:
        d = record["impls"][impl.name]
        for what, measure in (("saved bytes not counted", workload.saved_for_backward),
                              ("gradient layouts not read", workload.gradient_layouts)):
            try:
                d.update(measure(w, impl))
            except Exception as exc:
                record["notes"].append(f"{impl.name}: {what} ({type(exc).__name__}: {exc})")
    lap("saved")
    derive(record, device.type)
    return record


def _kernel_times(record, mode, steps, timed, device, n_sets, iters) -> None:
    """Device-busy time per call of each implementation's step (and the copy's, for forward):
    what the kernels cost without the host's launch and autograd overhead between them."""
    try:
        samples = kernel_time(steps, device, n_sets, iters=iters)
    except Exception as exc:  # no CUPTI, a profiler that cannot start: say so, keep the rest
        record["notes"].append(f"kernel time not measured ({type(exc).__name__}: {exc})")
        return
    if samples is None:
        if not any(n.startswith("kernel time") for n in record["notes"]):
            record["notes"].append("kernel time not measured: the profiler trace had no "
                                   "marker-delimited device work")
        return
    if mode == "forward":
        copy = samples.pop()
        record["copy"]["kernel"] = asdict(copy)
        record["copy"]["kernel_GBps"] = record["copy"]["GBps"] * record["copy"]["time"]["median"] / copy.median
    for impl, s in zip(timed, samples):
        record["impls"][impl.name].setdefault("kernel", {})[mode] = asdict(s)


def derive(record: dict, device_type: str = "cpu") -> None:
    """GB/s, fraction of copy bandwidth and speedups from the medians, and whether the timings
    support each speedup (`_support`)."""
    fwd, bwd = record["bytes"]["forward"], record["bytes"]["backward"]
    mode_bytes = dict(zip(workload.MODES, (fwd, bwd, fwd + bwd)))
    copy = record.get("copy", {})
    for r in record["impls"].values():
        for kind, times in (("", r), ("kernel_", r.get("kernel", {}))):
            gbps = {m: n / times[m]["median"] / 1e9 for m, n in mode_bytes.items()
                    if m in times and times[m]["median"] > 0}
            if gbps:
                r[f"{kind}GBps"] = gbps
                if copy.get(f"{kind}GBps"):
                    r[f"{kind}copy_fraction"] = {m: g / copy[f"{kind}GBps"] for m, g in gbps.items()}
    for name, r in record["impls"].items():
        if "forward" not in r or name in ("eager", "compile"):
            continue
        r["speedup"], r["speedup_support"] = {}, {}
        for peer in ("eager", "compile"):
            p = record["impls"].get(peer)
            if p and "forward" in p:
                r["speedup"][peer] = {m: p[m]["median"] / r[m]["median"] for m in mode_bytes}
                r["speedup_support"][peer] = {
                    m: _support(p, r, peer, name, m, record["op"], device_type) for m in mode_bytes}


def _support(peer: dict, impl: dict, peer_name: str, impl_name: str, mode: str, op: str,
             device_type: str) -> dict:
    """Whether the timings support the ratio peer / impl in `mode` (timing.compare), and not when
    either one's GB/s is above the same-size copy's (an artefact) unless the byte count is
    known to over-state what that implementation moves (bytemodel.overstated)."""
    c = compare(Sample(**peer[mode]), Sample(**impl[mode]), peer_name=peer_name,
                candidate_name=impl_name)
    out = {"conclusive": c["conclusive"], "why": c["why"], "round_ratios": c["round_ratios"]}
    for name, d in ((peer_name, peer), (impl_name, impl)):
        fraction = d.get("copy_fraction", {}).get(mode, 0.0)
        if out["conclusive"] and fraction > 1.0 and not bytemodel.overstated(op, name, device_type, mode):
            out.update(conclusive=False, why=f"{name} GB/s above a same-size copy's ({fraction:.0%})")
    return out


def warm_up_inductor(device: torch.device) -> float | None:
    """Seconds of torch.compile's one-time start-up (imports, compile workers), measured on a
    trivial function so that no entry's compile time carries it; None when compile fails."""
    x = torch.randn(64, device=device, requires_grad=True)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        torch.compile(lambda t: (t * 2).sin(), dynamic=False, fullgraph=True)(x).sum().backward()
    except Exception:
        return None
    finally:
        torch._dynamo.reset()
    return time.perf_counter() - t0


def run(plan: Plan, device: torch.device, kernel_backends: list[str], *, compile_peer: bool = True,
        time_limit_s: float | None = None, on_record=None) -> tuple[list[dict], list[Entry]]:
    """Runs every entry in order; returns (records, entries not run for the time limit).
    Progress: a tqdm bar on a terminal, else one line per entry."""
    records, skipped, shared, start = [], [], {}, time.perf_counter()
    bar = None
    if sys.stderr.isatty():
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            bar = tqdm(total=len(plan.entries), file=sys.stderr, unit="case", dynamic_ncols=True)
    for n, entry in enumerate(plan.entries, 1):
        name = entry.name
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            skipped.append(entry)
            name = f"skipped (time limit) {name}"
        else:
            t0 = time.perf_counter()
            try:
                record = run_entry(entry, device, kernel_backends, plan, compile_peer, shared)
            except Exception as exc:
                record = {**_head(entry), "impls": {}, "notes": [],
                          "failures": [f"the entry raised {type(exc).__name__}: {exc}"]}
            record["wall_s"] = time.perf_counter() - t0
            records.append(record)
            if on_record is not None:
                on_record(records)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)
        else:
            print(f"[{n}/{len(plan.entries)} {time.perf_counter() - start:.0f}s] {name}",
                  file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    return records, skipped
