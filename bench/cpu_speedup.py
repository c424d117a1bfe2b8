"""Forward+backward speed of the native CPU backend against the eager reference, measured
side by side in one run (medians of repeated timings after warm-up, on preallocated random
inputs). Usage: python bench/cpu_speedup.py [--repeats N] [--shapes 512,8,32,32 32,256,384]"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kasmina_kernels as kk


def make_inputs(op, shape, dtype, gen):
    h = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_()
    s = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_()
    per_sample = (shape[0],) + (1,) * (len(shape) - 1)
    alpha = torch.rand(per_sample, generator=gen).requires_grad_()
    grad = torch.randn(shape, dtype=dtype, generator=gen)
    if op == "blend_gate":
        gate = torch.rand(per_sample, generator=gen).requires_grad_()
        return (h, s, alpha, gate), grad
    return (h, s, alpha), grad


def time_fwd_bwd_interleaved(fns, args, grad, repeats, warmup=3):
    """Median seconds per forward+backward of each fn, timed alternately (one run of each
    per round) so that both see the same machine conditions."""

    def step(fn):
        y = fn(*args)
        torch.autograd.backward(y, grad)
        for a in args:
            a.grad = None

    for _ in range(warmup):
        for fn in fns:
            step(fn)
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            step(fn)
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(x) for x in samples]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", nargs="*", default=["512,8,32,32", "32,256,384"])
    parser.add_argument("--ops", nargs="*", default=["blend_add", "blend_multiply", "blend_gate"])
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| op | shape | dtype | reference ms | native ms | speedup |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for shape_text in args.shapes:
        shape = tuple(int(v) for v in shape_text.split(","))
        for dtype in (torch.float32, torch.bfloat16):
            for op in args.ops:
                inputs, grad = make_inputs(op, shape, dtype, gen)
                ref = getattr(kk.reference, op)
                nat = getattr(kk, op)
                t_ref, t_nat = time_fwd_bwd_interleaved(
                    [ref, lambda *a: nat(*a, backend="native")], inputs, grad, args.repeats)
                print(f"| {op} | {shape} | {str(dtype).replace('torch.', '')} | "
                      f"{t_ref * 1e3:.2f} | {t_nat * 1e3:.2f} | {t_ref / t_nat:.2f}x |")


if __name__ == "__main__":
    main()
