"""The CPU instruction set the extension was built for, checked before it loads.

setup.py compiles the C++ kernels for one vector ISA (KASMINA_KERNELS_CPU_ISA, by default what
the build machine's torch reports) and records it in `_build_isa.py`. Code built for AVX-512
dies of SIGILL on a CPU without it, before anything inside the extension could check, so the
check runs here, in Python, first."""

from __future__ import annotations

# The CPU flags each build needs, by their /proc/cpuinfo names; setup.py compiles with
# -m<flag> for each (GCC spells them the same), so this table is the one list of both.
REQUIRED_FLAGS = {
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx2": ("avx2", "fma", "f16c"),
    "default": (),
}


def built_isa() -> str | None:
    """The ISA kasmina_kernels._C was built for, or None for a build that did not record it."""
    try:
        from ._build_isa import CPU_ISA
    except ImportError:
        return None
    return CPU_ISA


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """This CPU's feature flags, or None where /proc/cpuinfo cannot tell (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing_flags(isa: str, flags: set[str]) -> list[str]:
    return [f for f in REQUIRED_FLAGS.get(isa, ()) if f not in flags]


def check_cpu(isa: str | None = None, flags: set[str] | None = None) -> None:
    """Raises ImportError, saying how to rebuild, when this CPU lacks the built ISA."""
    isa = built_isa() if isa is None else isa
    flags = cpu_flags() if flags is None else flags
    if isa is None or flags is None:
        return
    missing = missing_flags(isa, flags)
    if missing:
        raise ImportError(
            f"kasmina_kernels._C was built for {isa} CPUs, and this CPU lacks "
            f"{', '.join(missing)}; rebuild it here: KASMINA_KERNELS_CPU_ISA=avx2 (or default) "
            "pip install --no-build-isolation -e .")
