"""The CPU ISA guard: an extension built for an ISA this CPU lacks must not load (it would die of
SIGILL), and the error must say how to rebuild."""

import pytest

from kasmina_kernels import _isa


def test_missing_avx512_flags_refuse_with_rebuild_hint():
    avx2_only = {"sse4_2", "avx", "avx2", "fma", "f16c"}
    with pytest.raises(ImportError, match=r"built for avx512.*lacks avx512f, avx512bw.*KASMINA_KERNELS_CPU_ISA=avx2"):
        _isa.check_cpu("avx512", avx2_only)


def test_supported_builds_load():
    flags = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    for isa in ("avx512", "avx2", "default"):
        _isa.check_cpu(isa, flags)  # no error
    _isa.check_cpu("default", set())


def test_cpuinfo_flags_are_parsed(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma f16c\nbugs\t\t: x\n")
    assert _isa.cpu_flags(str(info)) == {"fpu", "avx2", "fma", "f16c"}
    assert _isa.cpu_flags(str(tmp_path / "missing")) is None


def test_this_build_runs_here():
    """The build recorded its ISA, and this machine has every flag it needs (the build picks
    what the build machine's torch reports, so a fresh build here always qualifies)."""
    isa = _isa.built_isa()
    if isa is None:
        pytest.skip("kasmina_kernels/_build_isa.py is missing: the extension was not built by this setup.py")
    flags = _isa.cpu_flags()
    if flags is None:
        pytest.skip("/proc/cpuinfo is not readable here: the CPU flags cannot be listed")
    assert _isa.missing_flags(isa, flags) == []
    import kasmina_kernels.native as native

    assert native.build_info()["cpu_isa"] == isa
