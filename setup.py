"""Build kasmina_kernels._C: C++ CPU kernels always, CUDA kernels when available.

Build after torch is installed, against that torch:

    pip install --no-build-isolation -e .     # first install (tools/setup_env.sh does this)
    python setup.py build_ext --inplace       # rebuild in place: only what changed

Objects persist in build/temp-<configuration> (see BuildExt), so either command recompiles
only the sources that changed (ninja tracks headers through gcc depfiles) and relinks.

Environment:
  KASMINA_KERNELS_CUDA       "1" forces the CUDA kernels (fails without a toolkit and a CUDA
                             torch), "0" skips them; unset builds them when both are present.
  KASMINA_KERNELS_CUDA_ARCH  CUDA architectures, default "80;90" (sm_80 and sm_90).
  KASMINA_KERNELS_CPU_ISA    "avx512", "avx2" or "default": the vector width of the CPU
                             kernels. Unset picks what the build machine's torch reports
                             (AVX512 or AVX2, else default). The build is for that ISA: the
                             package refuses to load the extension on a CPU without it
                             (kasmina_kernels/_isa.py) and says to rebuild.
  KASMINA_KERNELS_SANITIZE   e.g. "address,undefined": build the C++ sources with those
                             -fsanitize= checks (-O1 -g, frame pointers kept). For
                             tools/check_sanitizers.sh, which builds into its own directory.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only on a broken install
    sys.exit(
        "kasmina-kernels builds against an installed torch: install torch first, then "
        "`pip install --no-build-isolation -e .` (build isolation would pull another torch)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("KASMINA_KERNELS_CUDA", "").strip()
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not have:
            sys.exit(
                "KASMINA_KERNELS_CUDA=1 but CUDA cannot be built here: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
            )
        return True
    return have


def _load_isa_module():
    """kasmina_kernels/_isa.py by path (importing the package would load the extension): its
    REQUIRED_FLAGS table is the one list of what each ISA build uses and needs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_kk_isa", os.path.join(ROOT, "kasmina_kernels", "_isa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REQUIRED_FLAGS = _load_isa_module().REQUIRED_FLAGS
CPU_ISAS = tuple(REQUIRED_FLAGS)


def _cpu_isa() -> str:
    isa = os.environ.get("KASMINA_KERNELS_CPU_ISA", "").strip().lower()
    if isa in CPU_ISAS:
        return isa
    if isa:
        sys.exit(f"KASMINA_KERNELS_CPU_ISA must be one of {', '.join(CPU_ISAS)}, got {isa!r}")
    cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "default")


def _isa_flags(isa: str) -> list[str]:
    """Compiler flags for `isa`: -m<flag> for each CPU flag the build needs (the names GCC and
    /proc/cpuinfo share), and ATen's CPU_CAPABILITY, from which Vectorized<T> picks its width
    (each width in its own inline namespace, so they do not clash with torch's copies). The
    AVX-512 set is the one ATen builds its own AVX512 kernels with."""
    capability = isa.upper()
    return [f"-m{flag}" for flag in REQUIRED_FLAGS[isa]] + [
        f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]


def _record_isa(isa: str) -> None:
    """Writes kasmina_kernels/_build_isa.py, which kasmina_kernels/_isa.py reads before the
    extension loads: code built for AVX-512 dies of SIGILL on a CPU without it, before any
    check inside the extension could run."""
    path = os.path.join(ROOT, "kasmina_kernels", "_build_isa.py")
    text = ('"""Written by setup.py: the CPU ISA kasmina_kernels._C was built for."""\n\n'
            f"CPU_ISA = {isa!r}\n")
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def _sanitize_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for KASMINA_KERNELS_SANITIZE, empty when it is unset."""
    checks = os.environ.get("KASMINA_KERNELS_SANITIZE", "").strip()
    if not checks:
        return [], []
    if not all(c in ("address", "undefined") for c in checks.split(",")):
        sys.exit(f"KASMINA_KERNELS_SANITIZE takes 'address' and/or 'undefined', got {checks!r}")
    flag = f"-fsanitize={checks}"
    return [flag, "-O1", "-g", "-fno-omit-frame-pointer"], [flag]


def _extension():
    with_cuda = _want_cuda()
    isa = _cpu_isa()
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    # -fopenmp: ATen's at::parallel_for is header code that parallelises through OpenMP
    # pragmas; without it every parallel_for here would run on one thread. The libgomp it
    # links is the one torch already loaded (same soname), so there is one OpenMP runtime.
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-fopenmp"]
    link = ["-fopenmp"]
    cxx += _isa_flags(isa)
    _record_isa(isa)
    san_cxx, san_link = _sanitize_flags()
    cxx += san_cxx  # after -O3, so its -O1 wins
    link += san_link
    define_macros = [("KK_CPU_ISA", f'"{isa}"')]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        archs = os.environ.get("KASMINA_KERNELS_CUDA_ARCH", "80;90")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        for arch in archs.replace(",", ";").split(";"):
            arch = arch.strip().replace(".", "")
            if arch:
                nvcc += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        define_macros.append(("KK_WITH_CUDA", "1"))
        return cpp_extension.CUDAExtension(
            "kasmina_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "kasmina_kernels._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


def _build_temp_name() -> str:
    """The persistent object folder of this build's configuration, under build/: one per
    Python, CPU ISA, CUDA on/off and sanitizer set, so switching between them does not throw
    away another configuration's objects."""
    parts = [sys.implementation.cache_tag, _cpu_isa()]
    if _want_cuda():
        parts.append("cuda")
    checks = os.environ.get("KASMINA_KERNELS_SANITIZE", "").strip()
    if checks:
        parts.append("sanitize-" + checks.replace(",", "-"))
    return "temp-" + "-".join(parts)


def _pin_ninja() -> None:
    """BuildExtension runs the `ninja` on PATH. When the `ninja` package is installed (as
    tools/setup_env.sh does), put its binary first, so the build uses the same ninja however it
    is started (venv activated or not, pip or setup.py): ninja versions disagree on the build
    log's format, and a log from another version is thrown away, which rebuilds everything."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and os.path.isdir(bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja), with its objects in a persistent folder,
    build/temp-<configuration>, whichever way the build starts: `setup.py build_ext
    --inplace` or `pip install --no-build-isolation -e .` (which would otherwise compile into
    a fresh temporary folder, i.e. everything, every time). ninja then recompiles only the
    sources whose text, included headers (gcc depfiles, torch's headers too) or compile
    command changed; BuildExtension always relinks (seconds). An explicit --build-temp (as
    tools/check_sanitizers.sh gives) is kept."""

    def finalize_options(self) -> None:
        if self.build_temp is None:
            self.build_temp = os.path.join(ROOT, "build", _build_temp_name())
        super().finalize_options()


_pin_ninja()  # before BuildExtension checks that ninja runs
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
