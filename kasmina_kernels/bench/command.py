"""`kasmina-kernels bench`: arguments, the run, and the files it writes (report.md,
results.json, bandwidth.png, speedup.png under --out). Exits 1 when any backend's output does
not match the reference or an entry errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from ..backends import BACKEND_NAMES, keep_residuals
from . import plots, report, step, sweep
from .esper import AUTOCAST
from .plan import ALL_OPS, DTYPES, default_device, make_plan

SMALL_MACHINE_CORES = 2  # at most this many usable cores: one thread by default


# ---------------------------------------------------------------- argument types (check's too)
def device_arg(text: str) -> torch.device:
    """A device torch knows and this process can use (a CUDA device must be visible)."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: {str(exc).splitlines()[0]}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} CUDA devices")
    return device


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text!r}")
    return value


def shape_arg(ranks: range):
    """The argument type of a shape: comma-separated sizes of at least 1, as many as `ranks` holds."""
    count = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}"

    def parse(text: str) -> tuple[int, ...]:
        parts = text.split(",")
        if len(parts) not in ranks or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated sizes of at least 1, got {text!r}")
        return tuple(int(p) for p in parts)
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="kasmina-bench", help="output folder (default: ./kasmina-bench)")
    p.add_argument("--quick", action="store_true",
                   help="Esper's calls at (128,16,16,16) float32; headline ops, float32, one "
                        "Esper shape + the small shape, short sweep; no training-step section")
    p.add_argument("--step", action="store_true",
                   help="only the training-step benchmark (bench/step.py: Esper-style CNN and "
                        "transformer hosts, drop-ins against eager blends, eager and "
                        "torch.compile); the full run (no --quick) includes it, --quick skips it")
    p.add_argument("--esper-only", action="store_true",
                   help="only the first section: Esper's calls (docs/semantics.md#espers-calls)")
    p.add_argument("--device", type=device_arg, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--ops", nargs="*", choices=ALL_OPS, help="default: every op (--quick: the headline ops)")
    p.add_argument("--backends", nargs="*", choices=BACKEND_NAMES,
                   help="kernel backends (default: every available one)")
    p.add_argument("--dtypes", nargs="*", choices=sorted(DTYPES) + [AUTOCAST],
                   help="default: float32 bfloat16, and bf16 autocast for Esper's calls on CUDA "
                        f"(--quick: float32); {AUTOCAST} applies to Esper's calls only")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    p.add_argument("--keep-residuals", action="store_true",
                   help="run under kk.keep_residuals(): native forwards keep what their backward "
                        "would recompute (MULTIPLY's tanh on CPU), one more saved tensor a call")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (torch.set_num_threads) before anything runs. "
                        "Default on CPU: 1 where the process may use at most 2 cores, else "
                        "torch's default capped at the usable cores (more threads than free "
                        "cores stall OpenMP barriers; bench/README.md); on CUDA, torch's default")
    p.add_argument("--time-limit", type=non_negative_float, default=None,
                   help="seconds; entries not started by then are skipped and listed in the report")


def default_threads(device_type: str, cores: int, torch_default: int) -> tuple[int, str]:
    """(threads, why) when --threads is not given: the rule its help states (a CPU thread beyond
    the free cores makes an OpenMP barrier wait a scheduler quantum for it)."""
    if device_type != "cpu":
        return torch_default, f"torch's default ({device_type} run)"
    if cores <= SMALL_MACHINE_CORES:
        return 1, (f"default on CPU: {cores} usable cores (at most {SMALL_MACHINE_CORES}: one "
                   "thread, so other load cannot stall an OpenMP barrier); --threads N to change")
    return max(1, min(torch_default, cores)), (f"default on CPU: torch's default {torch_default} "
                                               f"capped at the {cores} usable cores; --threads N to change")


def main(args: argparse.Namespace) -> int:
    with keep_residuals(args.keep_residuals):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    device = default_device(args.device)
    try:  # the CPUs this process may run on
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    threads, threads_why = ((args.threads, "--threads") if args.threads is not None else
                            default_threads(device.type, cores, torch.get_num_threads()))
    torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(device, quick=args.quick, ops=args.ops, dtypes=args.dtypes, esper_only=args.esper_only)
    if args.step:
        plan.entries, plan.notes = [], []
    elif args.quick:
        plan.notes.append("--quick leaves out the training-step section (minutes on CPU: it "
                          "compiles two models' training steps); `--step` runs it alone.")
    kernels, excluded = sweep.select_backends(device, args.backends)
    if args.backends and not kernels:
        print("bench: none of the requested backends can run here: "
              + "; ".join(f"{k}: {v}" for k, v in excluded.items()), file=sys.stderr)
        return 2
    for line in [f"{name} excluded on {device.type}: {why}" for name, why in excluded.items()] + plan.notes:
        print(f"bench: {line}", file=sys.stderr)

    meta = {**report.machine(device), "usable cores": cores,
            "threads": f"{torch.get_num_threads()} ({threads_why})",
            "residuals": "kept (--keep-residuals)" if args.keep_residuals else "not kept (inputs only)"}
    with contextlib.suppress(OSError):  # no load average on this platform
        loads = " / ".join(f"{v:.2f}" for v in os.getloadavg())
        meta["load average at start"] = f"{loads} (1, 5, 15 min)"
    meta["command"] = "kasmina-kernels " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(
        ("kasmina-kernels", "__main__.py")) else "kasmina-kernels bench"
    meta["rotation_bytes"] = sweep.rotate_bytes(device)
    if not args.no_compile and plan.entries:
        warm = sweep.warm_up_inductor(device)
        meta["inductor_warmup_s"] = "failed" if warm is None else round(warm, 2)
        print(f"bench: torch.compile start-up (first compile in this process, not counted in any "
              f"entry): {meta['inductor_warmup_s']} s", file=sys.stderr)
    json_path, step_result = out / "results.json", None

    def save(records, skipped=()):
        report.write_json(json_path, meta, records, list(skipped), excluded, plan.notes, step=step_result)

    t0 = time.perf_counter()
    records, skipped = sweep.run(plan, device, kernels, compile_peer=not args.no_compile,
                                 time_limit_s=args.time_limit, on_record=save)
    if args.step or not (args.quick or args.esper_only):
        t_step = time.perf_counter()
        step_result = step.run(device, kernels, excluded, compile_mode=not args.no_compile,
                               log=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))
        meta["step_wall_s"] = round(time.perf_counter() - t_step, 1)
    meta["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    meta["compile_total_s"] = round(sum(d.get("compile_s") or 0.0 for r in records
                                        for d in r["impls"].values()), 1)
    save(records, skipped)
    text = report.markdown(meta, records, skipped, excluded, plan.notes, step=step_result)
    (out / "report.md").write_text(text)
    print(text)
    title = f"{meta['device']} ({device.type}), torch {meta['torch']}, {meta['date']}"
    written = [json_path, out / "report.md"]
    for fn, name in ((plots.bandwidth_vs_size, "bandwidth.png"), (plots.speedup_bars, "speedup.png")):
        try:
            if fn(records, out / name, title):
                written.append(out / name)
        except ImportError as exc:
            print(f"bench: {name} not drawn: matplotlib is missing ({exc})", file=sys.stderr)
    failures = [f for r in records for f in r["failures"]]
    failures += step.failures(step_result) if step_result is not None else []
    print(f"\nbench: {len(records)} entries in {meta['bench_wall_s']} s "
          f"(torch.compile compile time {meta['compile_total_s']} s of it); wrote "
          + ", ".join(str(p) for p in written), file=sys.stderr)
    if failures:
        print(f"bench: FAILED: {len(failures)} mismatches or errors:\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    return 0
