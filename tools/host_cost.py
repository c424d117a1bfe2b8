"""Host cost per forward+backward call on tiny tensors (docs/semantics.md#performance-model, item 3).

Esper's calls: host h channels_last (2,4,3,3) float32 requiring grad, r = h.contiguous().detach(),
seed s NCHW requiring grad, alpha a 0-dim float32 tensor without grad, gate (B,1,1,1) requiring
grad; backward via y.backward(g). Eager = kasmina_kernels.reference / nn.EagerGatedBlend; native =
the public drop-ins (blend_ops, isolation, nn.GatedBlend, ops.gated_pool) on the default backend.

    PYTHONPATH=. python tools/host_cost.py [--calls 2000] [--rounds 40] [--ops add,gate]

Prints the median microseconds per call over rounds (`bench.timing.wall_per_call`: each round
runs calls/rounds calls of each variant back to back, the variants interleaved round by round).
"""

from __future__ import annotations

import argparse

import torch

import kasmina_kernels as kk
from kasmina_kernels import blend_ops, isolation, nn as knn, ops, reference
from kasmina_kernels.bench.timing import wall_per_call


FLOOR = "floor: h + s"


def cases(shape=(2, 4, 3, 3)):
    torch.manual_seed(0)
    B, C = shape[0], shape[1]
    h = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    r = h.contiguous().detach()
    s = torch.randn(shape, requires_grad=True)
    alpha = torch.tensor(0.6)
    gate = torch.rand(B, 1, 1, 1, requires_grad=True)
    m = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    gs = torch.randn(shape)
    gg = torch.rand(B, 1, 1, 1)
    gp = torch.randn(B, C)
    fused_gb = knn.GatedBlend(C)
    eager_gb = knn.EagerGatedBlend(C)
    eager_gb.load_state_dict(fused_gb.state_dict())
    return {
        "blend_add": (lambda: reference.blend_add(h, s, alpha), lambda: blend_ops.blend_add(h, s, alpha), g),
        "blend_multiply": (lambda: reference.blend_multiply(h, s, alpha, seed_input=r),
                           lambda: blend_ops.blend_multiply(h, s, alpha, seed_input=r), g),
        "blend_gate": (lambda: reference.blend_gate(h, s, alpha, gate),
                       lambda: blend_ops.blend_gate(h, s, alpha, gate), g),
        "ste_forward": (lambda: reference.ste_forward(h, s), lambda: isolation.ste_forward(h, s), g),
        "blend_with_isolation": (lambda: reference.blend_with_isolation(h, s, alpha),
                                 lambda: isolation.blend_with_isolation(h, s, alpha), g),
        "multiply_valve_multiplier": (lambda: reference.multiply_valve_multiplier(alpha, m),
                                      lambda: blend_ops.multiply_valve_multiplier(alpha, m), gs),
        "gate_effective_alpha": (lambda: reference.gate_effective_alpha(alpha, gate),
                                 lambda: blend_ops.gate_effective_alpha(alpha, gate), gg),
        "gated_pool": (lambda: reference.gated_pool(h, "cnn"), lambda: ops.gated_pool(h, "cnn"), gp),
        "GatedBlend": (lambda: eager_gb(r), lambda: fused_gb(r), gg),
        # the floor any op pays through torch's autograd: one builtin add of the same leaves,
        # its backward handing g to both, the same y.backward(g) call
        FLOOR: (lambda: h + s, lambda: h + s, g),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--ops", default="")
    ap.add_argument("--shape", default="2,4,3,3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(x) for x in args.shape.split(","))
    table = cases(shape)
    names = [n for n in table if not args.ops or n in args.ops.split(",")]
    per = max(1, args.calls // args.rounds)
    fns = [lambda i, f=f, g=table[n][2]: f().backward(g) for n in names for f in table[n][:2]]
    for fn in fns:  # warm up
        for _ in range(50):
            fn(0)
    timed = wall_per_call(fns, torch.device("cpu"), 1, calls=per, rounds=args.rounds)
    us = {n: (timed[2 * k].median * 1e6, timed[2 * k + 1].median * 1e6) for k, n in enumerate(names)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shape {shape}, "
          f"{per * args.rounds} calls each, median of {args.rounds} rounds, backend auto={kk.resolve_backend(torch.zeros(1))}")
    print(f"{'op':28s} {'eager us':>9s} {'native us':>9s} {'ratio':>6s}")
    for name, (e, n) in us.items():
        print(f"{name:28s} {e:9.1f} {n:9.1f} {n / e:6.2f}")
    if FLOOR in us:
        floor = us[FLOOR][0]
        note = ""
        if "blend_add" in us:
            note = f"; 2/3 of eager's blend_add is {2 / 3 * us['blend_add'][0]:.1f}"
        print(f"(the floor row times h + s, a builtin op, in both columns: {floor:.1f} us{note})")


if __name__ == "__main__":
    main()
