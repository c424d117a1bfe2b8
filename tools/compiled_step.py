"""A compiled training step of an Esper-style CNN host with ADD, MULTIPLY and GATE seed slots:
the drop-ins (kasmina_kernels.blend_ops / nn.GatedBlend) against the eager blends
(kasmina_kernels.reference / nn.EagerGatedBlend), both under torch.compile (inductor).

Host features channels_last; each slot's seed runs on r = h.contiguous().detach() (NCHW) and
its output is blended into h; alpha is a 0-dim float32 tensor without grad; GATE's gate is
GatedBlend(r). Step = compiled forward + loss, backward, SGD step. "compiled drop-ins" is the
default backend (auto: the reference math under compile, see backends.COMPILE_AUTO);
"compiled drop-ins native" names the native backend, which keeps the opaque torch.ops.kasmina
ops in the compiled graph.

    PYTHONPATH=. python tools/compiled_step.py [--batch 64] [--steps 30] [--rounds 5] [--eager]

Prints the median ms per step of each variant (rounds interleaved) and the largest difference
of the loss and the parameters after the same steps.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from kasmina_kernels import blend_ops, reference, use_backend
from kasmina_kernels.nn import EagerGatedBlend, GatedBlend

CL = torch.channels_last


class Net(nn.Module):
    def __init__(self, fused: bool, c: int = 16, classes: int = 10, backend: str | None = None):
        super().__init__()
        self.fused = fused
        self.backend = backend
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(2))
        self.seeds = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(3))
        self.gate = (GatedBlend if fused else EagerGatedBlend)(c)
        self.head = nn.Linear(c, classes)
        self.register_buffer("alpha", torch.tensor(0.7))
        self.ops = blend_ops if fused else reference

    def forward(self, x, target):
        if self.backend is None:
            return self._forward(x, target)
        with use_backend(self.backend):  # a named backend: its op stays opaque under compile
            return self._forward(x, target)

    def _forward(self, x, target):
        ops, a = self.ops, self.alpha
        h = torch.relu(self.stem(x))
        r = h.contiguous().detach()
        h = ops.blend_add(h, self.seeds[0](r), a)
        h = torch.relu(self.body[0](h))
        r = h.contiguous().detach()
        h = ops.blend_multiply(h, self.seeds[1](r), a, seed_input=r)
        h = torch.relu(self.body[1](h))
        r = h.contiguous().detach()
        h = ops.blend_gate(h, self.seeds[2](r), a, self.gate(r))
        logits = self.head(h.mean(dim=(2, 3)))
        return nn.functional.cross_entropy(logits, target)


def make(fused, template=None, backend=None):
    net = Net(fused, backend=backend).to(memory_format=CL)
    if template is not None:
        net.load_state_dict(template.state_dict())
    return net


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--eager", action="store_true", help="also time the uncompiled steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (args.batch,))
    base = make(True)
    variants = {}
    for name, fused, compiled, backend in (
        ("compiled drop-ins", True, True, None),
        ("compiled eager blends", False, True, None),
        ("compiled drop-ins native", True, True, "native"),
        ("eager drop-ins", True, False, None),
        ("eager eager blends", False, False, None),
    ):
        if not compiled and not args.eager:
            continue
        net = make(fused, base, backend)
        fwd = torch.compile(net) if compiled else net
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        variants[name] = (net, fwd, opt)

    def step(v):
        net, fwd, opt = v
        opt.zero_grad(set_to_none=True)
        loss = fwd(x, y)
        loss.backward()
        opt.step()
        return loss.detach()

    losses = {}
    for name, v in variants.items():  # compile, and the same first steps for every variant
        t0 = time.perf_counter()
        losses[name] = [step(v) for _ in range(3)]
        print(f"{name}: first 3 steps {time.perf_counter() - t0:.1f} s")
    ref = next(iter(variants))
    for name in variants:
        dl = max((a - b).abs().item() for a, b in zip(losses[name], losses[ref]))
        dp = max((p - q).abs().max().item() for p, q in zip(variants[name][0].parameters(),
                                                             variants[ref][0].parameters()))
        print(f"{name}: max |loss - {ref}| {dl:.2e}, max |param diff| {dp:.2e}")
    times = {n: [] for n in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(v)
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    print(f"batch {args.batch}, 16 ch, 32x32, channels_last, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps")
    for name, ts in times.items():
        print(f"{name:24s} median {statistics.median(ts):7.2f} ms/step  (min {min(ts):.2f})")


if __name__ == "__main__":
    main()
