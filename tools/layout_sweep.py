"""Forward+backward of the blend ops in every layout combination, native against the eager
reference, with alpha with and without grad: the "no cell under 1.0x" check of Esper's calls
beyond Esper's own layouts.

    .venv/bin/python tools/layout_sweep.py --threads 1 [--out table.md] [--quick]

Layouts of 4-D features: all NCHW, all channels_last, channels_last host beside NCHW seed and
seed input (Esper's call), NCHW host beside channels_last seed. The incoming gradient takes the
output's layout; the host and seed require grad, the seed input does not, gate (B,1,1,1)
requires grad. (B,T,C) features are contiguous. Times: median per call over rounds in which
eager and native alternate on the same preallocated inputs (random, never zero).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kasmina_kernels as kk
from kasmina_kernels import reference
from kasmina_kernels.bench.esper import OPS, SHAPES
LAYOUTS = {
    "all NCHW": ("nchw", "nchw"),
    "all channels_last": ("cl", "cl"),
    "CL host, NCHW seed": ("cl", "nchw"),
    "NCHW host, CL seed": ("nchw", "cl"),
}


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    if t.dim() == 4 and layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def make_inputs(op, shape, dtype, layout, alpha_grad, gen):
    host_layout, seed_layout = LAYOUTS[layout]
    h = _laid_out(torch.randn(shape, generator=gen).to(dtype), host_layout).requires_grad_()
    r = _laid_out(h.detach() + 0.25 * torch.randn(shape, generator=gen).to(dtype), seed_layout)
    s = _laid_out(torch.randn(shape, generator=gen).to(dtype), seed_layout).requires_grad_()
    alpha = torch.tensor(0.6, dtype=dtype).requires_grad_(alpha_grad)
    gate = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=gen).to(dtype).requires_grad_()
    g = _laid_out(torch.randn(shape, generator=gen).to(dtype), host_layout)
    return h, s, r, alpha, gate, g


def call(mod, op, h, s, r, alpha, gate):
    if op == "blend_add":
        return mod.blend_add(h, s, alpha)
    if op == "blend_multiply":
        return mod.blend_multiply(h, s, alpha, seed_input=r)
    if op == "blend_gate":
        return mod.blend_gate(h, s, alpha, gate)
    return mod.ste_forward(h, s)


def measure(op, shape, dtype, layout, alpha_grad, rounds, calls):
    gen = torch.Generator().manual_seed(0)
    h, s, r, alpha, gate, g = make_inputs(op, shape, dtype, layout, alpha_grad, gen)
    leaves = [t for t in (h, s, alpha, gate) if t.requires_grad]

    def step(mod):
        y = call(mod, op, h, s, r, alpha, gate)
        torch.autograd.grad(y, [t for t in leaves if op != "ste_forward" or t is h or t is s], g,
                            allow_unused=True)

    impls = {"eager": lambda: step(reference), "native": lambda: step(kk)}
    for fn in impls.values():
        fn()
        fn()
    times = {k: [] for k in impls}
    for rnd in range(rounds):
        order = list(impls) if rnd % 2 == 0 else list(reversed(impls))
        for name in order:
            for _ in range(calls):
                t0 = time.perf_counter()
                impls[name]()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument("--quick", action="store_true", help="one small shape, float32 only")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    lines = [
        f"Forward+backward, native vs eager reference (ratio = eager time / native time), "
        f"{args.threads} thread(s), torch {torch.__version__}. Host and seed require grad, seed "
        f"input does not, gate (B,1,1,1) requires grad; alpha 0-dim in the host dtype, with or "
        f"without grad; the incoming gradient in the output's layout. (B,T,C) shapes are "
        f"contiguous in every row.",
        "",
        "| op | shape | dtype | layout | alpha grad | eager ms | native ms | ratio |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    worst = None
    for op in OPS:
        for shape in shapes:
            layouts = list(LAYOUTS) if len(shape) == 4 else ["all NCHW"]
            for dtype in dtypes:
                for layout in layouts:
                    for alpha_grad in ((False,) if op == "ste_forward" else (False, True)):
                        t = measure(op, shape, dtype, layout, alpha_grad, args.rounds, args.calls)
                        ratio = t["eager"] / t["native"]
                        label = layout if len(shape) == 4 else "contiguous (B,T,C)"
                        row = (f"| {op} | {shape} | {str(dtype)[6:]} | {label} | "
                               f"{'yes' if alpha_grad else 'no'} | {t['eager'] * 1e3:.3f} | "
                               f"{t['native'] * 1e3:.3f} | {ratio:.2f}x |")
                        lines.append(row)
                        print(row, flush=True)
                        if worst is None or ratio < worst[0]:
                            worst = (ratio, row)
    lines += ["", f"Lowest ratio: {worst[0]:.2f}x ({worst[1]})"]
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
