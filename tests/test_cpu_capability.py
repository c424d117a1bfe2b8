"""The CPU capability dispatch: the extension holds a copy of the CPU kernels for each
capability setup.py compiled (DEFAULT, and AVX2 and AVX512 on x86-64), and registers the one
ATen runs (ATEN_CPU_CAPABILITY overrides it), or the widest compiled one below it, never one
this CPU lacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_C = pytest.importorskip("kasmina_kernels._C", reason="the native extension is not built")

ORDER = ("DEFAULT", "AVX2", "AVX512")


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _cpu_runs(cap: str) -> bool:
    """Whether this CPU has the flags setup.py compiles `cap` with."""
    needs = {"DEFAULT": set(), "AVX2": {"avx2", "fma", "f16c"}}
    needs["AVX512"] = needs["AVX2"] | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("/proc/cpuinfo is not readable here: the CPU flags cannot be listed")
    return needs[cap] <= flags


def _expected(aten: str, compiled: list[str]) -> str:
    """The widest compiled capability no wider than ATen's and than this CPU's."""
    rank = ORDER.index(aten) if aten in ORDER else 0
    return [c for c in compiled if ORDER.index(c) <= rank and _cpu_runs(c)][-1]


def _run(code: str, capability: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)


def test_build_info_reports_the_capabilities():
    info = _C.build_info()
    compiled = list(info["cpu_capabilities"])
    assert compiled[0] == "DEFAULT"
    assert compiled == [c for c in ORDER if c in compiled]  # narrowest first
    if "AVX512" in compiled:
        assert "AVX2" in compiled  # setup.py compiles AVX2 wherever it compiles AVX512
    assert info["cpu_capability"] == _expected(torch.backends.cpu.get_cpu_capability(), compiled)


def test_info_prints_the_capability_in_use():
    from kasmina_kernels import backends

    line = backends.build_summary()["native CPU capability"]
    assert line.split()[0] == _C.build_info()["cpu_capability"]


def test_default_capability_matches_the_references():
    """Under ATEN_CPU_CAPABILITY=default the DEFAULT kernels run (ATen's too), and
    `kasmina-kernels check` finds every op's outputs and gradients within the equivalence
    bounds (tools/check_isas.sh runs the whole native matrix so)."""
    code = ("import kasmina_kernels._C as c; print(c.build_info()['cpu_capability'])\n"
            "from kasmina_kernels import cli\n"
            "raise SystemExit(cli.main(['check', '--backends', 'native']))")
    proc = _run(code, "default")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.splitlines()[0] == "DEFAULT"
    assert "all outputs within bounds" in proc.stdout


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_aten_cpu_capability_picks_the_copy(capability):
    """ATEN_CPU_CAPABILITY=<cap> selects that copy where the CPU runs it; naming a capability
    this CPU lacks (ATen trusts the variable) falls back to the widest the CPU runs. Only
    build_info runs in the child: ATen's own kernels would die there of SIGILL."""
    compiled = list(_C.build_info()["cpu_capabilities"])
    if capability not in compiled:
        pytest.skip(f"{capability} is not compiled into this build")
    proc = _run("import kasmina_kernels._C as c; print(c.build_info()['cpu_capability'])",
                capability.lower())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == _expected(capability, compiled)
