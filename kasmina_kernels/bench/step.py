"""A whole training step (docs/semantics.md#performance-model, item 2): `kasmina-kernels bench
--step`. The hosts of `esper_models`, every slot's alpha fixed at 0.5; from the same weights on
the same batches, the eager blends against each backend's drop-ins, each with the step (forward,
loss, backward, SGD) eager and in `torch.compile`. Measured: loss agreement, ms per step
(variants interleaved), kernels per step and the blends' share (torch.profiler).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import backends as kk_backends
from . import esper_models as M
from .sweep import first_line
from .timing import MIN_ROUNDS, Sample, Step, compare, synchronize, time_interleaved

AGREE_STEPS = 20
PROFILE_STEPS = 3
ALPHA = 0.5
LR = 0.05
EAGER = "eager blends"
MODES = ("eager", "compile")
STEP_RANGE = "kasmina.step"

# operators that run no kernel: allocations without a fill and no-op conversions
NO_KERNEL_OPS = frozenset((
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::lift_fresh",
    "aten::_local_scalar_dense", "aten::detach", "aten::detach_", "aten::as_strided_", "aten::set_"))
# leaf profiler events that run no kernel: those, views, and composites that may not copy
NO_KERNEL = NO_KERNEL_OPS | frozenset((
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::t", "aten::transpose",
    "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::_reshape_alias",
    "aten::alias", "aten::select", "aten::slice", "aten::split", "aten::unflatten",
    "aten::unbind", "aten::chunk", "aten::narrow", "aten::numpy_T", "aten::resolve_conj",
    "aten::resolve_neg", "aten::is_same_size", "aten::result_type", "aten::reshape",
    "aten::flatten", "aten::contiguous", "aten::to", "aten::_to_copy_noop", "aten::lift",
    "aten::zeros", "aten::ones", "aten::expand_as", "aten::view_as", "aten::item",
    "aten::is_nonzero", "aten::size", "aten::stride"))
OPS_PREFIX = ("aten::", "kasmina::")


@dataclass(frozen=True)
class Host:
    name: str
    build: Callable  # blends -> model
    batches: Callable  # (n, device) -> [(x, y)]
    description: str


def cnn_host(batch: int = 64, image: int = 32, width: int = 16) -> Host:
    return Host("cnn", lambda blends: M.CNNHost(width, blends=blends),
                lambda n, device: M.image_batches(n, batch, image_size=image, device=device),
                f"channels_last CNN, batch {batch}, 3x{image}x{image} images, {width} then "
                f"{2 * width} channels; slots ADD, MULTIPLY (seed_input r), GATE (GatedBlend over r), STE")


def transformer_host(batch: int = 32, tokens: int = 64, width: int = 128, layers: int = 2,
                     heads: int = 4, features: int = 16) -> Host:
    return Host("transformer",
                lambda blends: M.TransformerHost(features, width, heads, layers=layers, blends=blends),
                lambda n, device: M.token_batches(n, batch, tokens=tokens, features=features, device=device),
                f"(B,T,C) transformer, batch {batch}, {tokens} tokens, {width} channels, {layers} "
                "encoder layers; one GATE slot (GatedBlend topology 'transformer')")


class Runner:
    """One (host, variant, mode): a model, its SGD optimizer and its (compiled) step."""

    def __init__(self, host: Host, variant: str, mode: str, state: dict, device: torch.device,
                 autocast: bool = False):
        self.backend = None if variant == EAGER else variant
        self.autocast = autocast
        with self.scope():
            self.model = host.build(M.EAGER_BLENDS if variant == EAGER else M.DROP_INS).to(device)
        self.model.load_state_dict(state, strict=True)
        M.set_alphas(self.model, ALPHA)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.step_fn = torch.compile(self._step) if mode == "compile" else self._step

    def scope(self):
        return kk_backends.use_backend(self.backend) if self.backend else contextlib.nullcontext()

    def _step(self, x, y):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def step(self, batch) -> torch.Tensor:
        with self.scope(), torch.profiler.record_function(STEP_RANGE):
            return self.step_fn(*batch)


def _leaf_kernels(events, device: torch.device) -> int:
    """CUDA: device kernels. CPU: aten/kasmina operator events with no kernel-running operator
    below them (NO_KERNEL left out), plus inductor's C++ kernels."""
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)

    def runs_kernel(e):
        return e.name.startswith(OPS_PREFIX) and e.name not in NO_KERNEL
    return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and (
        runs_kernel(e) and not any(runs_kernel(c) for c in e.cpu_children)
        or e.name.startswith(("cpp_fused", "cpp_kernel", "kernel_cpp"))))


def _descendants(e):
    for c in e.cpu_children:
        yield c
        yield from _descendants(c)


def _kasmina_ops(events) -> list:
    """The kasmina:: operator events not called by another kasmina:: operator."""
    def parents(e):
        while (e := e.cpu_parent) is not None:
            yield e.name
    return [e for e in events if e.name.startswith("kasmina::")
            and not any(p.startswith("kasmina::") for p in parents(e))]


def _blend_share(events) -> tuple[float | None, str]:
    """(fraction of the step inside the blends, how it was measured): the `M.BLEND_RANGE` ranges
    plus the backward nodes they created (by autograd sequence number); under torch.compile the
    ranges do not survive, so the `kasmina::` operators' time instead."""
    total = sum(e.cpu_time_total for e in events if e.name == STEP_RANGE)
    if not total:
        return None, "no step range in the profile"
    ranges = [e for e in events if e.name == M.BLEND_RANGE]
    if ranges:
        seqs = {d.sequence_nr for r in ranges for d in _descendants(r) if d.sequence_nr >= 0}
        bwd = sum(e.cpu_time_total for e in events
                  if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in seqs)
        return (sum(r.cpu_time_total for r in ranges) + bwd) / total, "blend ranges + their backward nodes"
    ops = _kasmina_ops(events)
    if ops:
        return sum(e.cpu_time_total for e in ops) / total, "kasmina:: operators"
    return None, "blends fused into compiled kernels: not separable"


def profile_steps(runner: Runner, batches, device: torch.device) -> dict:
    """Kernels per step, their device time (CUDA; summed, overlaps counted twice) and the
    blends' share, from torch.profiler over PROFILE_STEPS steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(PROFILE_STEPS):
            runner.step(batches[i % len(batches)])
        synchronize(device)
    events = prof.events()
    share, how = _blend_share(events)
    kernel_us = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"kernels_per_step": _leaf_kernels(events, device) / PROFILE_STEPS,
            "kernel_ms_per_step": kernel_us / 1e3 / PROFILE_STEPS if device.type == "cuda" else None,
            "kasmina_ops_per_step": len(_kasmina_ops(events)) / PROFILE_STEPS,
            "blend_share": share, "blend_share_method": how}


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def run_host(host: Host, device: torch.device, variants: list[str], *, modes=MODES,
             autocast: bool = False, agree_steps: int = AGREE_STEPS, rounds: int = MIN_ROUNDS, budget_s: float = 3.0,
             n_batches: int = 4, log=print) -> dict:
    """Every (variant, mode) of `host`: losses, agreement, timing, kernels, blend share."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in host.build(M.EAGER_BLENDS).state_dict().items()}
    batches = host.batches(max(agree_steps, n_batches), device)
    rows, runners = {}, []
    try:  # inductor's C++ kernels as profiler events, so they can be counted
        import torch._inductor.config as inductor_config

        kernel_profile = inductor_config.patch({"cpp.enable_kernel_profile": True})
    except Exception:
        kernel_profile = contextlib.nullcontext()
    with kernel_profile:
        for mode in modes:
            for variant in variants:
                key = f"{variant} / {mode}"
                row = rows[key] = {"variant": variant, "mode": mode}
                t0 = time.perf_counter()
                try:
                    runner, losses = Runner(host, variant, mode, state, device, autocast), []
                    for i in range(agree_steps):
                        losses.append(runner.step(batches[i]).item())
                        row.setdefault("first_step_s", time.perf_counter() - t0)
                    row["losses"] = losses
                    runners.append((key, runner))
                except Exception as exc:  # e.g. torch.compile failing for one configuration
                    row.update(error=first_line(exc), traceback=traceback.format_exc()[-2000:])
                log(f"step {host.name}: {key}: {agree_steps} steps in {time.perf_counter() - t0:.1f} s"
                    + (f" FAILED {row['error']}" if "error" in row else ""))
        steps = [Step(lambda i, _, r=r: r.step(batches[i])) for _, r in runners]
        samples = time_interleaved(steps, device, n_batches, rounds=rounds, budget_s=budget_s,
                                   warmup=2, max_iters=20)
        for (key, runner), s in zip(runners, samples):
            rows[key].update(sample=asdict(s), ms_per_step=s.median * 1e3, ms_p25=s.p25 * 1e3,
                             ms_p75=s.p75 * 1e3, timed_steps=s.count)
            try:
                rows[key].update(profile_steps(runner, batches, device))
            except Exception as exc:
                rows[key]["profile_error"] = first_line(exc)
    eager_losses = rows.get(f"{EAGER} / eager", {}).get("losses")
    for row in rows.values():
        base = rows.get(f"{EAGER} / {row['mode']}", {})
        if "losses" in row and base.get("losses"):
            row["max_rel_loss_diff"] = max_rel_diff(row["losses"], base["losses"])
        if "losses" in row and eager_losses:
            row["max_rel_loss_diff_vs_eager_mode"] = max_rel_diff(row["losses"], eager_losses)
        if base.get("ms_per_step") and row.get("ms_per_step"):
            row["speedup_vs_eager_blends"] = base["ms_per_step"] / row["ms_per_step"]
            if row is not base:
                c = compare(Sample(**base["sample"]), Sample(**row["sample"]),
                            peer_name="eager blends", candidate_name=row["variant"])
                row["speedup_support"] = {k: c[k] for k in ("conclusive", "why", "round_ratios")}
    return {"host": host.name, "description": host.description, "rows": rows}


def run(device: torch.device, kernels: list[str], excluded: dict, *, compile_mode: bool = True,
        log=print) -> dict:
    """Both hosts, every variant (the eager blends and each kernel backend: sweep.select_backends'
    `kernels`, `excluded`), each mode; on CUDA under bf16 autocast, as Esper trains on GPUs."""
    variants, modes = [EAGER] + kernels, MODES if compile_mode else ("eager",)
    autocast = device.type == "cuda"
    return {"variants": variants, "excluded": excluded, "modes": list(modes), "agree_steps": AGREE_STEPS,
            "autocast": autocast,
            "hosts": [run_host(h, device, variants, modes=modes, autocast=autocast, log=log)
                      for h in (cnn_host(), transformer_host())]}


def failures(result: dict, tolerance: float = 1e-5) -> list[str]:
    """Drop-ins whose float32 losses differ from the eager blends' (same mode) by more than
    `tolerance` relative in some step. Under autocast the blends round to bfloat16 at different
    points (docs/rounding.md), so the differences are reported, not judged. A torch.compile
    failure is reported in the table, not here."""
    if result.get("autocast"):
        return []
    return [f"step {host['host']} {key}: max relative loss difference {d:.2e} > {tolerance:g}"
            for host in result["hosts"] for key, row in host["rows"].items()
            if (d := row.get("max_rel_loss_diff")) is not None and d > tolerance]
