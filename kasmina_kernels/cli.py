"""Command line: `kasmina-kernels check | info | bench` (also `python -m kasmina_kernels ...`).

check  which backends this machine has, and each op's max error per backend and dtype against
       the eager reference and the float64 oracle (docs/semantics.md#equivalence); exit 1 on a failure.
info   how the package was built: torch, CUDA, compiler, which backends were built.
bench  every op and backend timed against eager and torch.compile (kasmina_kernels/bench/).
"""

from __future__ import annotations

import argparse
import zlib
import sys

import torch

from . import backends, opcases, optable
from .bench import plan
from .bench.command import device_arg, shape_arg
from .bench.report import markdown_table

DTYPES = {**plan.DTYPES, "float64": torch.float64}


def _backend_table() -> list[str]:
    device_types = backends.device_types()
    rows = [[name] + ["available" if why is None else f"no: {why}"
                      for why in (backends.backend_status(name, dt) for dt in device_types)]
            for name in backends.BACKENDS]
    return markdown_table(["backend", *device_types], 1 + len(device_types), rows)


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def cmd_check(args) -> int:
    device = args.device
    print("## Backends on this machine\n")
    print("\n".join(_backend_table()))
    print(f"\n`auto` on {device.type} resolves to: "
          f"{backends.resolve_backend(torch.empty(0, device=device), 'auto')}\n")
    names = args.backends or [b for b in backends.available_backends(device) if b != "reference"]
    for name in names:
        why = backends.backend_status(name, device.type)
        if why is not None:
            print(f"backend {name!r} unavailable on {device.type}: {why}", file=sys.stderr)
            return 2
    shape = args.shape
    pool_shape = shape if len(shape) in (3, 4) else (shape[0], shape[-1], 4, 4)
    print(f"## Max error per op (shape {shape}, device {device.type})\n")
    print("err vs ref: max |kernel - eager reference in the same dtype|; kernel / eager vs fp64: "
          "max error against the reference run in float64; bound: 2 x eager + 1 ulp (a reduction "
          "may also use its sqrt(n) slack, docs/semantics.md#equivalence).\n")
    print("| op | output | backend | dtype | err vs ref | kernel vs fp64 | eager vs fp64 | bound | ok |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    failures = 0
    for op in optable.OPS:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            gen = torch.Generator().manual_seed(zlib.crc32(f"{op.name}:{dtype_name}".encode()))
            case_shape = pool_shape if op.name in ("gated_pool", "gate_network") else shape
            check = opcases.Check.of(op, *opcases.make(op, case_shape, dtype, device, gen))
            for name in names:
                for v in check(lambda *a, **k: op.public(*a, backend=name, **k)):
                    failures += not v.ok
                    print(f"| {op.name} | {v.name} | {name} | {dtype_name} | "
                          f"{_fmt(v.error_vs_reference)} | {_fmt(v.kernel_error)} | "
                          f"{_fmt(v.eager_error)} | {_fmt(v.bound)} | "
                          f"{'yes' if v.ok else 'NO: ' + v.message} |")
    print(f"\n{'all outputs within bounds' if not failures else f'{failures} outputs out of bounds'}")
    return 1 if failures else 0


def cmd_info(args) -> int:
    for key, value in backends.build_summary().items():
        print(f"{key:28s} {value}")
    print("\n" + "\n".join(_backend_table()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kasmina-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="backends and per-op max error against the references")
    check.add_argument("--device", type=device_arg, default=torch.device("cpu"))
    check.add_argument("--backends", nargs="*", choices=backends.BACKEND_NAMES,
                       help="default: every available non-reference backend")
    check.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16", "float16"],
                       choices=sorted(DTYPES))
    check.add_argument("--shape", type=shape_arg(range(1, 6)), default=(4, 16, 8, 8),
                       help="feature shape, comma separated (default: 4,16,8,8)")
    check.set_defaults(func=cmd_check)
    info = sub.add_parser("info", help="how the package was built")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="time every op and backend against eager and torch.compile")
    from .bench import command as bench_command  # imports nothing heavy until run

    bench_command.add_arguments(bench)
    bench.set_defaults(func=bench_command.main)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
