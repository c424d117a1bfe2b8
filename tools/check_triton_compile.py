"""Compiles the Triton kernels for a CUDA GPU on a machine without one: every specialization
that the Triton equivalence cases (tests/cases.py: the reduced matrix, or --full) launch, with
the weights loaded from the device, passed by value, and with 64-bit offsets forced on, through
Triton's own compiler down to a cubin. A stand-in driver names the target and nothing is
launched, so no output is written and nothing is judged: a case passes when its forward and
backward compile. Triton's interpreter, where the Triton tests run without a GPU, runs code
the compiler rejects.

    python tools/check_triton_compile.py [--arch 90] [--full]

TRITON_INTERPRET must be unset. Exits 1 when any case fails to compile (0, saying so, without
Triton).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class CompileOnlyDriver:
    """Triton's active driver for this check: a CUDA target of the given architecture."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


def root_cause(exc: BaseException) -> str:
    """The innermost cause of a chain (a CompilationError wraps the one in the function it
    calls), as its type and message; a CompilationError's text ends in the source it points at."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {getattr(exc, 'error_message', None) or (lines[-1] if lines else '')}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--full", action="store_true", help="the full matrix (default: the reduced one)")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("check_triton_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    # Triton 3.10's default: a launch that leaves FMA contraction to the default compiles
    # without it here, and fails the check (every launch passes triton/_common.LAUNCH_OPTIONS)
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "0"

    import torch
    try:
        import triton
    except ImportError as exc:
        print(f"check_triton_compile: SKIPPED: Triton is not installed ({exc})")
        return 0
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(CompileOnlyDriver(args.arch))
    compiles: collections.Counter = collections.Counter()
    unfused: set[str] = set()
    run, do_compile = JITFunction.run, JITFunction._do_compile

    def compile_only(self, *a, grid, warmup, **kw):
        return run(self, *a, grid=grid, warmup=True, **kw)

    def counted_compile(self, key, signature, device, constexprs, options, *a, **kw):
        compiles[self.fn.__name__] += 1
        if not options.enable_fp_fusion:
            unfused.add(self.fn.__name__)
        return do_compile(self, key, signature, device, constexprs, options, *a, **kw)

    JITFunction.run, JITFunction._do_compile = compile_only, counted_compile

    from kasmina_kernels import backends, opcases
    from kasmina_kernels.optable import BY_NAME
    import kasmina_kernels.triton as triton_backend
    from kasmina_kernels.triton import _common, elementwise, gate
    # the triton backend on CPU tensors without the interpreter: kernels compile, none runs
    backends._modules["triton"] = triton_backend
    backends._status_cache[("triton", "cpu")] = None
    import cases as matrix

    chosen = matrix.full_cases() + matrix.big_cases() if args.full else matrix.reduced_cases()
    # (what the pass is, weights passed by value, the offset from which indices are 64-bit):
    # 64-bit index math, past 2^31 elements on a GPU, forced on the cases' small tensors
    passes = (("weights loaded", False, _common.I32_SAFE), ("weights by value", True, _common.I32_SAFE),
              ("64-bit offsets", False, 0))
    print(f"check_triton_compile: Triton {triton.__version__}, sm_{args.arch}, {len(chosen)} cases "
          f"({'full' if args.full else 'reduced'} matrix), each with " + ", ".join(p[0] for p in passes),
          flush=True)
    failures, start = [], time.perf_counter()
    for label, by_value, i32_safe in passes:
        _common.FORCE_VALUE_MODE, _common.I32_SAFE = by_value, i32_safe
        for cache in (_common._plan_cache, elementwise._launch_cache, gate._cache):
            cache.clear()  # launch plans made under the previous pass's settings
        for case in chosen:
            op, leaves = BY_NAME[case.op], matrix.inputs(case)
            fn = matrix.under_autocast(matrix.kernel_fn(case.op, "triton"), case.device, case.autocast)
            try:
                with torch.no_grad():
                    probe = op.call(fn, leaves)
                opcases.run_forward_backward(fn, leaves, op.call, matrix._requires(case, leaves),
                                             torch.ones_like(probe), inference=case.mode == "inference")
            except Exception as exc:  # a compile error, or anything else on the way to one
                if not failures:
                    print(f"check_triton_compile: the first failure, {case.id}:\n{exc}", file=sys.stderr)
                failures.append(f"{case.id} ({label}): {root_cause(exc)}"[:400])
        if i32_safe == 0:  # the pass reached what it forces (tests/test_triton.py asserts the same)
            plans = [c.kw for c in elementwise._launch_cache.values() if not c.fallback]
            plans += [c["kw"] for key, c in gate._cache.items() if key[0] == "gate"]
            if not all(kw["I64"] for kw in plans):
                failures.append("64-bit offsets: a launch plan kept 32-bit offsets (the pass missed them)")
    if unfused:
        failures.append("compiled without FMA contraction (not launched with LAUNCH_OPTIONS): "
                        + ", ".join(sorted(unfused)))
    print(f"check_triton_compile: {sum(compiles.values())} kernel specializations compiled (or found "
          f"in Triton's cache) in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{name} {n}" for name, n in sorted(compiles.items())))
    if failures:
        print(f"check_triton_compile: FAILED: {len(failures)} cases\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("check_triton_compile: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
