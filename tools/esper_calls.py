"""Esper's calls beyond the benchmark's: the drop-ins (native by default) against the eager
reference, forward+backward wall time per call, alternating round by round on the same
preallocated random inputs (`bench.timing.wall_per_call`; medians over rounds).

    PYTHONPATH=. python tools/esper_calls.py host-cost [--calls 2000] [--rounds 40] [--ops blend_add,blend_gate]
    PYTHONPATH=. python tools/esper_calls.py layouts [--quick] [--out table.md]

host-cost: tiny tensors (default (2,4,3,3)), where what remains is Python, dispatch and
autograd (docs/semantics.md#performance-model, item 3), with a floor row (one builtin `h + s`)
and a builtin row (`torch.lerp`, ADD's math in one ATen op).
layouts: ADD, MULTIPLY, GATE and the STE at Esper's shapes in every layout combination of host
and seed, alpha with and without grad. Inputs: h and s require grad, the seed input r (h's
values in the seed's layout) does not, gate (B,1,...) does, alpha is 0-dim in the host's dtype;
the incoming gradient has the output's layout; (B,T,C) features are contiguous.
Every call starts with its leaves' .grad unset (`measure`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import torch

import kasmina_kernels as kk
from kasmina_kernels import nn as knn, reference, swap
from kasmina_kernels.bench.esper import OPS, SHAPES
from kasmina_kernels.bench.report import INCONCLUSIVE, markdown_row, markdown_table
from kasmina_kernels.bench.timing import Sample, compare, wall_per_call

# (host channels_last, seed channels_last) of 4-D features
LAYOUTS = {"all NCHW": (False, False), "all channels_last": (True, True),
           "CL host, NCHW seed": (True, False), "NCHW host, CL seed": (False, True)}
FLOOR = "floor: h + s"
LERP = "builtin: torch.lerp"
DROP_INS = SimpleNamespace(**swap.DROP_INS, gated_pool=kk.gated_pool)


def calls(shape, dtype=torch.float32, host_cl=True, seed_cl=False, alpha_grad=False) -> dict:
    """{name: fn(namespace) -> output} on one preallocated input set; namespace is `reference`
    (eager) or `DROP_INS`."""
    gen = torch.Generator().manual_seed(0)

    def rand(size, cl=False, uniform=False):
        t = (torch.rand if uniform else torch.randn)(size, generator=gen).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t

    h, s = rand(shape, host_cl).requires_grad_(), rand(shape, seed_cl).requires_grad_()
    r = h.detach().clone(memory_format=torch.channels_last if seed_cl and h.dim() == 4
                         else torch.contiguous_format)
    alpha = torch.tensor(0.6, dtype=dtype).requires_grad_(alpha_grad)
    gate = rand((shape[0],) + (1,) * (len(shape) - 1), uniform=True).requires_grad_()
    m = rand(shape).requires_grad_()
    fused_gb = knn.GatedBlend(shape[1]).to(dtype)
    eager_gb = knn.EagerGatedBlend(shape[1]).to(dtype)
    eager_gb.load_state_dict(fused_gb.state_dict())
    return {
        "blend_add": lambda ns: ns.blend_add(h, s, alpha),
        "blend_multiply": lambda ns: ns.blend_multiply(h, s, alpha, seed_input=r),
        "blend_gate": lambda ns: ns.blend_gate(h, s, alpha, gate),
        "ste_forward": lambda ns: ns.ste_forward(h, s),
        "blend_with_isolation": lambda ns: ns.blend_with_isolation(h, s, alpha),
        "multiply_valve_multiplier": lambda ns: ns.multiply_valve_multiplier(alpha, m),
        "gate_effective_alpha": lambda ns: ns.gate_effective_alpha(alpha, gate),
        "gated_pool": lambda ns: ns.gated_pool(h, "cnn"),
        "GatedBlend": lambda ns: (eager_gb if ns is reference else fused_gb)(r),
        # what any op pays through torch's autograd: one builtin op, the same backward call
        FLOOR: lambda ns: h + s,
        # ADD's math as one builtin op whose backward computes both gradients: what a fused
        # ADD would cost if a custom op cost no more than ATen's own
        LERP: lambda ns: torch.lerp(h, s, 0.6),
    }


def leaves_of(out: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors whose .grad a backward from `out` writes (its AccumulateGrad nodes)."""
    seen, todo, leaves = set(), [out.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def measure(fns: list, *, calls_per_round: int, rounds: int) -> list[Sample]:
    """Seconds per forward+backward call of each fn, against a preallocated gradient. Each
    call starts with its leaves' .grad unset: Esper's features are activations whose gradients
    flow on into layers, never summed into a .grad; a gradient in another layout than its leaf
    is still moved into the leaf's layout (AccumulateGrad's layout contract), as whatever
    consumes it would."""
    outs = [fn() for fn in fns]
    grads = [torch.randn_like(out.detach()) for out in outs]  # in the output's layout
    leaves = [leaves_of(out) for out in outs]

    def step(fn, grad, fn_leaves):
        for leaf in fn_leaves:
            leaf.grad = None
        fn().backward(grad)

    steps = [lambda i, args=args: step(*args) for args in zip(fns, grads, leaves)]
    return wall_per_call(steps, torch.device("cpu"), 1, calls=calls_per_round, rounds=rounds)


def host_cost(args) -> None:
    shape = tuple(int(v) for v in args.shape.split(","))
    table = calls(shape)
    names = [n for n in table if not args.ops or n in args.ops.split(",")]
    per = max(1, args.calls // args.rounds)
    times = [s.median for s in measure([lambda f=table[n], ns=ns: f(ns) for n in names
                                        for ns in (reference, DROP_INS)],
                                       calls_per_round=per, rounds=args.rounds)]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shape {shape}, "
          f"{per * args.rounds} calls each, median of {args.rounds} rounds, "
          f"backend auto={kk.resolve_backend(torch.zeros(1))}")
    print(f"{'op':28s} {'eager us':>9s} {'native us':>9s} {'ratio':>6s}")
    us = {n: (e * 1e6, d * 1e6) for n, e, d in zip(names, times[::2], times[1::2])}
    for name, (e, n) in us.items():
        print(f"{name:28s} {e:9.1f} {n:9.1f} {n / e:6.2f}")
    if FLOOR in us:
        note = f"; 2/3 of eager's blend_add is {2 / 3 * us['blend_add'][0]:.1f}" if "blend_add" in us else ""
        print(f"(the floor row times h + s, a builtin op, in both columns: {us[FLOOR][0]:.1f} us{note})")
    if LERP in us and "blend_add" in us:
        print(f"(the builtin row times torch.lerp in both columns: {us[LERP][0]:.1f} us, "
              f"{us[LERP][0] / us['blend_add'][0]:.2f}x of eager's blend_add)")


def layouts(args) -> None:
    shapes = SHAPES[:1] if args.quick else SHAPES
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    head = ["op", "shape", "dtype", "layout", "alpha grad", "eager ms", "native ms", "ratio"]
    lines = [f"Forward+backward, native vs eager reference (ratio = eager time / native time), "
             f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, medians of "
             f"{args.rounds} alternating rounds of {args.calls} calls. Host and seed require "
             "grad, seed input does not, gate (B,1,1,1) requires grad; alpha 0-dim in the host "
             "dtype, with or without grad; the incoming gradient in the output's layout; every "
             "call starts with its leaves' .grad unset. (B,T,C) shapes are contiguous in every "
             f"row. `{INCONCLUSIVE}`: inconclusive by the benchmark's rule "
             "(docs/benchmarks.md#reading-the-report), not counted.", "",
             *markdown_table(head, 5, [])]
    print("\n".join(lines), flush=True)
    cases = [(op, shape, dtype, layout, alpha_grad)
             for op in OPS for shape in shapes for dtype in dtypes
             for layout in (LAYOUTS if len(shape) == 4 else ["contiguous (B,T,C)"])
             for alpha_grad in ((False,) if op == "ste_forward" else (False, True))]
    verdicts = []  # (ratio, row) of the cells whose timings support their ratio
    for op, shape, dtype, layout, alpha_grad in cases:
        fn = calls(shape, dtype, *LAYOUTS.get(layout, (False, False)), alpha_grad)[op]
        eager, native = measure([lambda: fn(reference), lambda: fn(DROP_INS)],
                                calls_per_round=args.calls, rounds=args.rounds)
        verdict = compare(eager, native, peer_name="eager", candidate_name="native")
        mark = "" if verdict["conclusive"] else f" {INCONCLUSIVE}"
        row = markdown_row([op, str(shape), str(dtype)[6:], layout, "yes" if alpha_grad else "no",
                            f"{eager.median * 1e3:.3f}", f"{native.median * 1e3:.3f}",
                            f"{verdict['ratio']:.2f}x{mark}"])
        lines.append(row)
        print(row, flush=True)
        if verdict["conclusive"]:
            verdicts.append((verdict["ratio"], row))
    behind = [row for ratio, row in verdicts if ratio < 1.0]
    summary = len(lines) + 1
    lines += ["", f"{len(verdicts)} of {len(cases)} cells with a verdict ({len(cases) - len(verdicts)} "
              f"inconclusive); native behind eager in {len(behind)}" + (":" if behind else ".")]
    lines += behind
    if verdicts:
        lowest, row = min(verdicts, key=lambda ratio_row: ratio_row[0])
        lines.append(f"Lowest ratio with a verdict: {lowest:.2f}x ({row})")
    print("\n".join(lines[summary:]))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="command", required=True)
    hc = sub.add_parser("host-cost", help="tiny tensors: what a call costs besides its kernel")
    hc.add_argument("--calls", type=int, default=2000)
    hc.add_argument("--rounds", type=int, default=40)
    hc.add_argument("--ops", default="", help="comma-separated names (default: every row)")
    hc.add_argument("--shape", default="2,4,3,3")
    hc.set_defaults(func=host_cost)
    lay = sub.add_parser("layouts", help="Esper's shapes in every layout combination")
    lay.add_argument("--out", default=None, help="also write the table (markdown) here")
    lay.add_argument("--quick", action="store_true", help="one small shape, float32 only")
    lay.add_argument("--rounds", type=int, default=20)
    lay.add_argument("--calls", type=int, default=10)
    lay.set_defaults(func=layouts)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
