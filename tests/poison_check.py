"""Run by test_poisoned.py in a subprocess under glibc's MALLOC_PERTURB_ (not collected by
pytest): every equivalence case's kernel outputs and gradients are scanned for the poison
bytes a fresh allocation is filled with. An element that still holds them was never written.

Prints one "UNWRITTEN <backend> <case> <output> <count>/<numel>" line per finding and
"CHECKED <n>" at the end; exits 1 on any finding, 2 when poisoning is not in effect.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import backends_under_test, case_check, cases_for, kernel_fn  # noqa: E402

POISON_BYTE = 0x7F
_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
        torch.float16: torch.int16}


def poison_pattern(dtype):
    n = torch.empty((), dtype=dtype).element_size()
    return torch.tensor([POISON_BYTE] * n, dtype=torch.uint8).view(_INT[dtype])[0]


def poisoning_active() -> bool:
    """Fresh allocations hold the poison, and the scan finds a half-written buffer."""
    for dtype in _INT:
        for n in (6, 100_000, 3_000_000):
            t = torch.empty(n, dtype=dtype)
            frac = float((t.view(torch.uint8) == POISON_BYTE).double().mean())
            if frac != 1.0:
                print(f"fresh torch.empty({n}, dtype={dtype}) holds the poison in {frac:.3f} of its bytes")
                return False
            t[: n // 2] = 1
            if unwritten(t, torch.ones(n, dtype=dtype)) != n - n // 2:
                print(f"the scan missed unwritten elements ({dtype}, {n})")
                return False
    return True


def unwritten(k: torch.Tensor, r: torch.Tensor) -> int:
    if k.numel() == 0 or k.dtype not in _INT or k.shape != r.shape:
        return 0
    bits = k.detach().contiguous().view(_INT[k.dtype])
    hit = bits == poison_pattern(k.dtype)
    if r.dtype in _INT:
        hit &= r.detach().contiguous().view(_INT[r.dtype]) != poison_pattern(r.dtype)
    return int(hit.sum())


def main() -> int:
    if not poisoning_active():
        print("NOT POISONED")
        return 2
    findings = checked = 0
    for backend, why in backends_under_test():
        if why is not None:
            continue
        for case in cases_for(backend):
            check = case_check(case)
            kern, ref = check.run(kernel_fn(case.op, backend)), check.expected[0]
            for name, k in kern.items():
                n = unwritten(k, ref.get(name, k))
                if n:
                    findings += 1
                    print(f"UNWRITTEN {backend} {case.id} {name} {n}/{k.numel()}")
            checked += 1
    print(f"CHECKED {checked}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
