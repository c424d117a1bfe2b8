"""What the end-to-end examples share: the training loop, the per-backend runs, the kernel
count and the command line. Every run starts from the eager model's initial weights and sees
the same batches: first the model as written (``eager``), then per backend the model rebuilt
with the drop-ins swapped into `seed_slots` inside ``kk.use_backend(backend)``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kasmina_kernels as kk
import seed_slots
from kasmina_kernels.bench.esper_models import advance_slots
from kasmina_kernels.bench.step import NO_KERNEL_OPS, max_rel_diff  # views: by their schema

EAGER = "eager"


class _KernelCounter(TorchDispatchMode):
    """Counts the operator calls that reach a kernel: what runs below autograd after
    composite operators have been decomposed, views and allocations excluded."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith(("aten::", "kasmina::")) and not func.is_view and name not in NO_KERNEL_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_kernels(fn, device: torch.device) -> Counter:
    """Kernels one call of `fn` runs, by name. On CUDA: the device kernels torch.profiler
    records. On CPU: the operator calls that reach a kernel (`_KernelCounter`); a fused op is
    one ``kasmina::`` call forward and one backward."""
    if device.type != "cuda":
        with _KernelCounter() as counter:
            fn()
        return counter.counts
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def training_step(model, optimizer, x, y, step, *, autocast_dtype) -> torch.Tensor:
    """One step: advance the slots' alpha, forward (under autocast if asked), cross-entropy,
    backward, SGD update. Returns the (detached) loss."""
    advance_slots(getattr(model, "module", model), step)
    with torch.autocast(x.device.type, autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


@dataclass
class RunResult:
    backend: str
    losses: list[float]
    parameters: dict[str, torch.Tensor]
    seconds_per_step: float  # median after the first step
    kernels_per_step: Counter | None = None


def run(backend: str, build_model, batches, initial_state, *, autocast_dtype, count=True) -> RunResult:
    """Train a fresh model on `backend` (``EAGER``: the model as written, nothing swapped). The
    kernels of one training step are counted on a second fresh model after one warm-up step,
    so the count leaves the trained model untouched."""
    swap = contextlib.nullcontext() if backend == EAGER else kk.swap_in(seed_slots)
    scope = contextlib.nullcontext() if backend == EAGER else kk.use_backend(backend)
    def fresh():
        model = build_model()
        model.load_state_dict(initial_state, strict=True)
        return model.to(batches[0][0].device)

    with swap, scope:
        model, kernels = fresh(), None
        if count:
            probe = fresh()
            probe_sgd, (x, y) = sgd(probe), batches[0]
            training_step(probe, probe_sgd, x, y, 0, autocast_dtype=autocast_dtype)
            kernels = count_kernels(lambda: training_step(probe, probe_sgd, x, y, 1,
                                                          autocast_dtype=autocast_dtype), x.device)
        optimizer, losses, times = sgd(model), [], []
        for step, (x, y) in enumerate(batches):
            start = time.perf_counter()
            losses.append(training_step(model, optimizer, x, y, step, autocast_dtype=autocast_dtype).item())
            times.append(time.perf_counter() - start)  # .item() synchronizes: the time covers the step
        parameters = {k: v.detach().clone() for k, v in model.named_parameters()}
    return RunResult(backend, losses, parameters, statistics.median(times[1:] or times), kernels)


def compare_backends(build_model, batches, backends, *, autocast_dtype, count=True) -> list[RunResult]:
    """The eager run, then one run per backend, all from the eager model's initial weights."""
    initial_state = {k: v.clone() for k, v in build_model().state_dict().items()}
    return [run(backend, build_model, batches, initial_state, autocast_dtype=autocast_dtype, count=count)
            for backend in [EAGER, *backends]]


def print_table(results: list[RunResult]) -> None:
    base = results[0]
    print(f"{'backend':10s} {'final loss':>12s} {'max rel loss diff':>18s} {'max param diff':>15s} "
          f"{'ms/step':>9s} {'kernels/step':>13s}")
    for r in results:
        param_diff = max((r.parameters[k].float() - v.float()).abs().max().item() for k, v in base.parameters.items())
        kernels = "-" if r.kernels_per_step is None else str(r.kernels_per_step.total())
        print(f"{r.backend:10s} {r.losses[-1]:12.6f} {max_rel_diff(r.losses, base.losses):18.3e} "
              f"{param_diff:15.3e} {r.seconds_per_step * 1e3:9.2f} {kernels:>13s}")


def main(description: str, build_model, make_batches, *, default_steps: int) -> list[RunResult]:
    """Parse the command line, run every backend, print the table."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=default_steps, help="training steps per run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends to compare with the eager run (default: every backend "
                        "available on the device; on CPU triton needs TRITON_INTERPRET=1)")
    parser.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto",
                        help="auto: bf16 autocast on CUDA, none on CPU")
    parser.add_argument("--no-count", action="store_true", help="skip the profiler kernel count")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    available = kk.available_backends(device)
    backends = available if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in available:
            parser.error(f"--backends: {b!r} is not available on {device.type} (available: {available})")
    bf16 = args.autocast == "bf16" or (args.autocast == "auto" and device.type == "cuda")
    print(f"device {device}, {'bf16 autocast' if bf16 else 'float32'}, {args.steps} steps, "
          f"backends: {EAGER} + {', '.join(backends)}")
    results = compare_backends(build_model, make_batches(args.steps, device=device), backends,
                               autocast_dtype=torch.bfloat16 if bf16 else None, count=not args.no_count)
    print_table(results)
    return results
