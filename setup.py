"""Build kasmina_kernels._C: C++ CPU kernels always, CUDA kernels when available.

Build after torch is installed, against that torch (docs/building.md):

    pip install --no-build-isolation -e .     # first install (tools/setup_env.sh does this)
    python setup.py build_ext --inplace       # rebuild in place: only what changed

Environment:
  KASMINA_KERNELS_CUDA       "1" forces the CUDA kernels, "0" skips them; unset builds them
                             when a CUDA toolkit and a CUDA torch are both present.
  KASMINA_KERNELS_CUDA_ARCH  CUDA architectures, default "80;90".
  KASMINA_KERNELS_CPU_CAPABILITIES
                             e.g. "avx2": the CPU capabilities compiled beside DEFAULT;
                             unset: all of them on x86-64.
  KASMINA_KERNELS_SANITIZE   e.g. "address,undefined": -fsanitize= builds (-O1 -g), for
                             tools/check_sanitizers.sh.
"""

import concurrent.futures
import glob
import os
import platform
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


# The CPU capabilities (ATen's names) and GCC's -m<flag> for each (the AVX-512 set is ATen's
# own); BuildExt adds ATen's CPU_CAPABILITY macros, from which Vectorized<T> picks its width.
# csrc/ops/registration.cpp checks the same CPU flags at run time.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}
CPU_SOURCES = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))


def _cpu_capabilities() -> list[str]:
    """The CPU capabilities to compile the kernels for, narrowest first."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    env = os.environ.get("KASMINA_KERNELS_CPU_CAPABILITIES", "").strip()
    if not env:
        return list(CPU_CAPABILITY_FLAGS) if x86 else ["DEFAULT"]
    wanted = {c.strip().upper() for c in env.split(",") if c.strip()} | {"DEFAULT"}
    unknown = wanted - set(CPU_CAPABILITY_FLAGS)
    if unknown or (wanted != {"DEFAULT"} and not x86):
        sys.exit(f"KASMINA_KERNELS_CPU_CAPABILITIES takes {', '.join(CPU_CAPABILITY_FLAGS).lower()}"
                 f" (the last two on x86-64 only), got {env!r}")
    return [c for c in CPU_CAPABILITY_FLAGS if c in wanted]


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
    # not CPU_SOURCES: BuildExt compiles those once per capability
    sources = sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    # -fopenmp: ATen's at::parallel_for is header code that parallelises through OpenMP
    # pragmas; the libgomp it links is the one torch already loaded (same soname).
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-fopenmp"]
    link = ["-fopenmp"]
    san_cxx, san_link = _sanitize_flags()
    cxx += san_cxx  # after -O3, so its -O1 wins
    link += san_link
    define_macros = [(f"KK_CPU_{c}", "1") for c in _cpu_capabilities() if c != "DEFAULT"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    compile_args = {"cxx": cxx}
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
        compile_args["nvcc"] = nvcc
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return make(
        "kasmina_kernels._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=compile_args,
        extra_link_args=link,
    )


def _build_temp_name() -> str:
    """The persistent object folder of this build's configuration (Python, CUDA, sanitizers),
    under build/, so switching configurations keeps each one's objects."""
    parts = [sys.implementation.cache_tag]
    if _want_cuda():
        parts.append("cuda")
    checks = os.environ.get("KASMINA_KERNELS_SANITIZE", "").strip()
    if checks:
        parts.append("sanitize-" + checks.replace(",", "-"))
    return "temp-" + "-".join(parts)


def _pin_ninja() -> None:
    """Put the `ninja` package's binary first on PATH, so every build uses the same ninja
    (versions disagree on the build log's format, and a foreign log rebuilds everything)."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and os.path.isdir(bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja) with its objects in build/temp-<configuration> however
    the build starts (pip would otherwise compile everything into a fresh folder each time),
    so only what changed recompiles; an explicit --build-temp is kept.

    The CPU kernels (CPU_SOURCES) are compiled once per capability into
    <build-temp>/<capability> and linked in as extra objects, DEFAULT's first: where the
    copies share a header's inline symbol, the linker keeps the first, which every CPU runs."""

    def finalize_options(self) -> None:
        if self.build_temp is None:
            self.build_temp = os.path.join(ROOT, "build", _build_temp_name())
        super().finalize_options()
        # setuptools skips the link when no file in ext.sources is newer than the extension;
        # the CPU objects and every header are not among those, so always link
        self.force = True

    def build_extension(self, ext) -> None:
        cxx = ext.extra_compile_args["cxx"]  # with the flags BuildExtension has added by now
        caps = _cpu_capabilities()

        def compile_capability(cap: str) -> list[str]:
            macros = [*ext.define_macros, ("CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{cap}", None)]
            return self.compiler.compile(
                CPU_SOURCES,
                output_dir=os.path.join(self.build_temp, cap.lower()),
                macros=macros,
                include_dirs=ext.include_dirs,
                extra_postargs=cxx + CPU_CAPABILITY_FLAGS[cap],
            )

        # One ninja per capability, all at once, sharing MAX_JOBS (default: the CPU count)
        # between them: one large translation unit (blend_cpu.cpp) dominates each capability,
        # so one at a time would leave the other cores idle.
        jobs = os.environ.get("MAX_JOBS", "")
        total = int(jobs) if jobs.isdigit() else (os.cpu_count() or 1)
        os.environ["MAX_JOBS"] = str(max(1, total // len(caps)))
        try:
            with concurrent.futures.ThreadPoolExecutor(len(caps)) as pool:
                objects = list(pool.map(compile_capability, caps))
        finally:
            if jobs:
                os.environ["MAX_JOBS"] = jobs
            else:
                del os.environ["MAX_JOBS"]
        ext.extra_objects = [o for cap_objects in objects for o in cap_objects]
        super().build_extension(ext)


_pin_ninja()  # before BuildExtension checks that ninja runs
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
