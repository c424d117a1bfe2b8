"""Runs every op of every fused CUDA backend (native, triton), forward and backward, a few
times over awkward inputs, for compute-sanitizer to watch (tools/check_compute_sanitizer.sh).

Inputs: float32, bfloat16 and float16; contiguous, channels_last and sliced hosts; per-sample
and 0-dim CPU alpha; an fp32 seed beside a half host; a zero-size batch; shapes that are not
multiples of any block size. Each result is also checked against the reference with the
package's equivalence rule (`kasmina_kernels.opcases.Check`, as `kasmina-kernels check`), so a kernel that reads the
wrong memory without faulting still fails. Exits 1 on any mismatch; prints what ran.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kasmina_kernels.backends import backend_status
from kasmina_kernels.opcases import Check, make
from kasmina_kernels.optable import OPS

SHAPES = ((3, 5, 7, 11), (0, 4, 3, 3), (33, 17, 9, 5))
POOL_SHAPES = {"cnn": ((3, 5, 7, 11), (0, 4, 3, 3), (2, 40, 9, 9)),
               "transformer": ((3, 13, 36), (0, 3, 5), (4, 129, 70))}


def _variants(case, dtype, device):
    """(label, args, kwargs) on `device` for one op."""
    gen = torch.Generator().manual_seed(0)
    if case.name in ("gated_pool", "gate_network"):
        for topology, shapes in POOL_SHAPES.items():
            for shape in shapes:
                args, kwargs = make(case, shape, dtype, device, gen)
                yield f"{topology}{shape}", args, kwargs
                if len(shape) == 4:
                    x = args[0].contiguous(memory_format=torch.channels_last)
                    yield f"{topology}{shape}/channels_last", [x] + args[1:], kwargs
        return
    shapes = ((8, 1, 1, 1), (0, 1, 1, 1), (5, 1, 1)) if case.name == "gate_effective_alpha" else SHAPES
    for shape in shapes:
        args, kwargs = make(case, shape, dtype, device, gen)
        yield f"{shape}", args, kwargs
        if case.name.startswith("blend_") or case.name == "multiply_valve_multiplier":
            pos = 0 if case.name == "multiply_valve_multiplier" else 2
            yield f"{shape}/cpu_alpha", args[:pos] + [torch.tensor(0.7)] + args[pos + 1:], kwargs
        if case.name.startswith("blend_") or case.name == "ste_forward":
            if len(shape) == 4 and shape[0]:
                cl = [args[0].contiguous(memory_format=torch.channels_last)] + args[1:]
                yield f"{shape}/channels_last_host", cl, kwargs
                wide = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen).to(device, dtype)
                yield f"{shape}/sliced_host", [wide[..., ::2]] + args[1:], kwargs
            if dtype != torch.float32:
                yield f"{shape}/fp32_seed", [args[0], args[1].float()] + args[2:], kwargs


def _canary() -> int:
    """A planted out-of-bounds store from a Triton kernel that is not this library's and not
    PyTorch's: memcheck run with the script's kernel filter must report it, which shows the
    filter leaves non-PyTorch kernels instrumented."""
    import triton
    import triton.language as tl

    @triton.jit
    def kk_sanitizer_canary(ptr, OFFSET: tl.constexpr):
        tl.store(ptr + OFFSET, 1.0)

    x = torch.zeros(1, device="cuda")
    kk_sanitizer_canary[(1,)](x, OFFSET=4096)  # 16 KiB past a 4-byte tensor
    torch.cuda.synchronize()
    print("cuda_sanitizer_driver: canary kernel ran (a store memcheck must report)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="native,triton")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this driver itself")
    parser.add_argument("--ops", default=",".join(c.name for c in OPS), help="comma-separated op names")
    parser.add_argument("--canary", action="store_true", help="run only the planted out-of-bounds store")
    opts = parser.parse_args()
    if opts.canary:
        return _canary()
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("cuda_sanitizer_driver: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    failures = ran = 0
    for backend in opts.backends.split(","):
        why = backend_status(backend, opts.device)
        if why is not None:
            print(f"cuda_sanitizer_driver: backend {backend!r} unavailable on {opts.device}: {why}", file=sys.stderr)
            return 2
        for case in (c for c in OPS if c.name in opts.ops.split(",")):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                t0, ran_before = time.perf_counter(), ran
                for label, args, kwargs in _variants(case, dtype, opts.device):
                    check = Check.of(case, args, kwargs)
                    for _ in range(opts.repeat):
                        verdicts = check(lambda *a, **k: case.public(*a, **k, backend=backend))
                    if opts.device == "cuda":
                        torch.cuda.synchronize()
                    ran += 1
                    for v in (v for v in verdicts if not v.ok):
                        failures += 1
                        print(f"MISMATCH {backend} {case.name} {dtype} {label}: {v.message}")
                print(f"  {backend} {case.name} {dtype}: {ran - ran_before} inputs, "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
    print(f"cuda_sanitizer_driver: ran {ran} op/input combinations fwd+bwd; {failures} outputs "
          "off the reference by the equivalence rule (MISMATCH lines)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
