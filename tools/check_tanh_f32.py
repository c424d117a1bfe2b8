"""Checks the "mixed" float32 tanh of the native CPU kernels (csrc/cpu/tanh_f32.h) against
torch.tanh over every float32 below the bound, both signs (about 2.1e9 values; a couple of
minutes on one core), and prints what tanh_f32.h states: the largest difference in ulps,
how many differ, and the largest relative change that difference makes to 1 - t^2 and 1 + t.

    .venv/bin/python tools/check_tanh_f32.py
"""

import time

import torch

from kasmina_kernels import _C

BOUND = 1.0


def main() -> None:
    _C.set_float_tanh("mixed")
    top = torch.tensor([BOUND]).view(torch.int32).item()
    sign = torch.tensor(-(2**31), dtype=torch.int32)
    worst_ulps, differ, total, effect = 0, 0, 0, 0.0
    start_time = time.time()
    for start in range(0, top, 1 << 24):
        bits = torch.arange(start, min(top, start + (1 << 24)), dtype=torch.int32)
        for negative in (False, True):
            x = (bits | sign if negative else bits).view(torch.float32)
            ours, torchs = _C.tanh_f32(x), torch.tanh(x)
            ulps = (ours.view(torch.int32).long() - torchs.view(torch.int32).long()).abs()
            worst_ulps = max(worst_ulps, ulps.max().item())
            differ += int((ulps != 0).sum())
            total += x.numel()
            d, t = (ours.double() - torchs.double()).abs(), torchs.double()
            effect = max(effect, (2 * t.abs() * d / (1 - t * t)).max().item(),
                         (d / (1 - t.abs())).max().item())
    print(f"every float32 with |x| < {BOUND}: {total} values, {differ} differ from torch.tanh "
          f"({100 * differ / total:.3f}%), by at most {worst_ulps} ulp; largest relative change to "
          f"1 - t^2 or 1 + t: {effect:.3g} ({time.time() - start_time:.0f} s)")


if __name__ == "__main__":
    main()
