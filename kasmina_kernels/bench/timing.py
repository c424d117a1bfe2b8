"""Timing primitives: medians of repeated timings after warm-up, candidates timed in alternation
(round by round) so they share the machine's conditions. A `Step` is one timed unit:
`prepare(i)` runs untimed before each timing (e.g. the forward whose backward is timed), then
`run(i, state)` is timed, on input set `i` of the rotation; by a pair of `torch.cuda.Event`s on
CUDA, by `time.perf_counter()` on CPU (CPU ops are synchronous).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

# When a time ratio supports a verdict (`compare`; the report's legend states the same rule)
SPREAD_LIMIT = 0.5  # (p75 - p25) / median of a candidate's timings, above which it is too noisy
# rounds on one side happen by chance 2 / 2**n of the time where the two tie: 1 in 64 at 7
MIN_ROUNDS = 7


@dataclass
class Step:
    run: Callable[[int, Any], Any]
    prepare: Callable[[int], Any] | None = None

    def state(self, i: int) -> Any:
        return self.prepare(i) if self.prepare else None


@dataclass(frozen=True)
class Sample:
    """Per-call seconds of one step: median and inter-quartile spread of all timings, and the
    median of each round (rounds alternate the candidates, so round k of two candidates ran
    under the same machine conditions)."""

    median: float
    p25: float
    p75: float
    count: int
    rounds: tuple[float, ...] = ()

    @property
    def spread(self) -> float:
        return (self.p75 - self.p25) / self.median if self.median > 0 else 0.0

    @classmethod
    def of(cls, values: list[float], rounds: list[list[float]] = ()) -> "Sample":
        """`values`: every timing; `rounds`: the same timings grouped by round."""
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        return cls(statistics.median(values), q[0], q[2], len(values),
                   tuple(statistics.median(r) for r in rounds if r))


def compare(peer: Sample, candidate: Sample, *, peer_name: str = "peer",
            candidate_name: str = "candidate") -> dict:
    """The ratio peer median / candidate median (above 1: the candidate is faster) and whether
    the timings support it: neither one's timings spread more than SPREAD_LIMIT (a wide or
    two-humped distribution has no typical call), and every round's ratio lies on the same side
    of 1 as the overall ratio (a sign test; the candidates alternate round by round).
    Returns {"ratio", "conclusive", "why" (None when conclusive), "round_ratios"}."""
    ratio = peer.median / candidate.median if candidate.median > 0 else float("inf")
    rounds = [p / c for p, c in zip(peer.rounds, candidate.rounds) if c > 0]
    against = sum((r > 1.0) != (ratio > 1.0) or r == 1.0 for r in rounds)
    noisy = [(n, s) for n, s in ((peer_name, peer), (candidate_name, candidate)) if s.spread > SPREAD_LIMIT]
    why = None
    if noisy:
        name, s = noisy[0]
        why = f"{name} timings spread {s.spread:.0%} (IQR/median > {SPREAD_LIMIT:.0%})"
    elif len(rounds) < MIN_ROUNDS:
        why = f"{len(rounds)} paired rounds (a verdict needs {MIN_ROUNDS})"
    elif ratio == 1.0 or against:
        why = (f"{against} of {len(rounds)} rounds on the other side of 1.00x "
               f"(round ratios {min(rounds):.2f}x to {max(rounds):.2f}x)")
    return {"ratio": ratio, "conclusive": why is None, "why": why,
            "round_ratios": [round(r, 4) for r in rounds]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_iters(step: Step, rotor, iters: int, device: torch.device) -> list[float]:
    cuda, out = device.type == "cuda", []
    for _ in range(iters):
        i = next(rotor)
        state = step.state(i)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step.run(i, state)
            end.record()
            out.append((start, end))
        else:
            t0 = time.perf_counter()
            step.run(i, state)
            out.append(time.perf_counter() - t0)
    synchronize(device)
    return [s.elapsed_time(e) * 1e-3 for s, e in out] if cuda else out


def time_interleaved(steps: list[Step], device: torch.device, n_sets: int, *, rounds: int,
                     budget_s: float, warmup: int = 3, max_iters: int = 200) -> list[Sample]:
    """Times every step: `warmup` untimed runs each, then `rounds` rounds in which each step in
    turn runs a batch of iterations. The batch size is chosen per step from its warm-up time
    so that the step's timed runs take about `budget_s` in all (at least one per round)."""
    rotors = [itertools.cycle(range(n_sets)) for _ in steps]
    iters = []
    for step, rotor in zip(steps, rotors):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            i = next(rotor)
            step.run(i, step.state(i))
        synchronize(device)
        per = max((time.perf_counter() - t0) / max(warmup, 1), 1e-7)
        iters.append(max(1, min(max_iters, int(budget_s / (rounds * per)))))
    by_round: list[list[list[float]]] = [[] for _ in steps]
    for _ in range(rounds):
        for k, (step, rotor) in enumerate(zip(steps, rotors)):
            by_round[k].append(_time_iters(step, rotor, iters[k], device))
            # calls far slower than warm-up said (a busy machine): one call per round from here
            if sum(map(sum, by_round[k])) > 3 * budget_s:
                iters[k] = 1
    return [Sample.of([t for r in rs for t in r], rs) for rs in by_round]


def wall_per_call(fns: list[Callable[[int], Any]], device: torch.device, n_sets: int, *,
                  calls: int, rounds: int) -> list[Sample]:
    """Microseconds-regime cost per call, host overhead included: wall-clock time of a batch
    of `calls` back-to-back calls (synchronised once at the end), divided by `calls`; batches
    of the candidates alternate round by round, after `min(calls, 10)` warm-up calls each."""
    rotors = [itertools.cycle(range(n_sets)) for _ in fns]
    for fn, rotor in zip(fns, rotors):
        for _ in range(min(calls, 10)):
            fn(next(rotor))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for k, (fn, rotor) in enumerate(zip(fns, rotors)):
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(next(rotor))
            synchronize(device)
            samples[k].append((time.perf_counter() - t0) / calls)
    return [Sample.of(s, [[v] for v in s]) for s in samples]


def _busy_ns(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals (kernels on other streams may overlap)."""
    busy, reach = 0, float("-inf")
    for start, end in sorted(intervals):
        busy += max(0, end - max(start, reach))  # the part beyond what is counted already
        reach = max(reach, end)
    return busy


def kernel_time(steps: list[Step], device: torch.device, n_sets: int, *,
                iters: int) -> list[Sample] | None:
    """CUDA only: per call, the device-busy time of a step's own work (kernels, copies, memsets
    in the CUDA profiler), host gaps left out. Each run is bracketed by marker kernels
    (torch.cuda._sleep's `spin_kernel`) so `prepare`'s work is not counted. None when the trace
    cannot be split by its markers (e.g. a profiler that records no device activity)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for step in steps:
            for i in itertools.islice(itertools.cycle(range(n_sets)), iters):
                state = step.state(i)
                torch.cuda._sleep(1)
                step.run(i, state)
                torch.cuda._sleep(1)
        torch.cuda.synchronize(device)
    events = sorted((e.start_ns(), e.end_ns(), e.name())
                    for e in prof.profiler.kineto_results.events()
                    if e.device_type() == DeviceType.CUDA)
    runs, current = [], None
    for start, end, name in events:
        if "spin_kernel" in name:
            if current is not None:
                runs.append(current)
            current = [] if current is None else None
        elif current is not None:
            current.append((start, end))
    if len(runs) != len(steps) * iters:
        return None
    return [Sample.of([_busy_ns(r) * 1e-9 for r in runs[k * iters:(k + 1) * iters]])
            for k in range(len(steps))]
