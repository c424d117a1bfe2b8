"""Per-call cost of eager calls at small shapes, host overhead included: microseconds per
forward call (and per forward+backward) of every blend op, each backend against the eager
reference, timed alternately in one run (medians of batches of calls after warm-up).

    python bench/overhead.py                       # (8,64,16,16) and a tiny (2,4,2,2)
    python bench/overhead.py --shapes 8,64,16,16 --backends native triton
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kasmina_kernels as kk
from kasmina_kernels import opcases


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_call_us(fns, device, calls=200, rounds=7, warmup=20):
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            samples[i].append((time.perf_counter() - t0) / calls * 1e6)
    return [statistics.median(s) for s in samples]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="*", default=["8,64,16,16", "2,4,2,2"])
    parser.add_argument("--backends", nargs="*", default=None)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = args.backends or [b for b in kk.available_backends(device) if b != "reference"]
    print(f"torch {torch.__version__}, device {device}, dtype {args.dtype}, {torch.get_num_threads()} threads")
    header = " | ".join(f"{b} us" for b in backends)
    print(f"| op | shape | mode | reference us | {header} |")
    print("| --- | --- | --- | ---: | " + " | ".join("---:" for _ in backends) + " |")
    gen = torch.Generator().manual_seed(0)
    for shape_text in args.shapes:
        shape = tuple(int(v) for v in shape_text.split(","))
        for case in opcases.CASES:
            cargs, ckw = case.make(shape, dtype, device, gen)
            ref = opcases.reference_op(case.name)
            pub = opcases.public_op(case.name)
            fwd = [lambda: ref(*cargs, **ckw)] + [
                (lambda b=b: pub(*cargs, backend=b, **ckw)) for b in backends
            ]
            with torch.no_grad():
                times = per_call_us(fwd, device)
            print(f"| {case.name} | {shape} | forward | " + " | ".join(f"{t:.1f}" for t in times) + " |")
            leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in cargs]
            out = ref(*leaves, **ckw)
            grad = torch.randn(out.shape, generator=gen).to(device, out.dtype)

            def fwd_bwd(fn):
                def run():
                    torch.autograd.backward(fn(*leaves, **ckw), grad)
                return run

            fb = [fwd_bwd(ref)] + [fwd_bwd(lambda *a, b=b, **k: pub(*a, backend=b, **k)) for b in backends]
            times = per_call_us(fb, device, calls=50)
            print(f"| {case.name} | {shape} | fwd+bwd | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
