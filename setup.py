"""Build kasmina_kernels._C: C++ CPU kernels always, CUDA kernels when available.

Build after torch is installed, against that torch:

    pip install --no-build-isolation -e .     # first install (tools/setup_env.sh does this)
    python setup.py build_ext --inplace       # rebuild in place: only what changed

The environment variables read below (KASMINA_KERNELS_CUDA, KASMINA_KERNELS_CUDA_ARCH,
KASMINA_KERNELS_CPU_CAPABILITIES, KASMINA_KERNELS_SANITIZE, KASMINA_KERNELS_DEBUG_INFO) are
described in docs/building.md#build-switches.
"""

import concurrent.futures
import glob
import os
import platform
import sys
from unittest import mock

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
    if flag == "1" and not have:
        sys.exit(
            "KASMINA_KERNELS_CUDA=1 but CUDA cannot be built here: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return flag == "1" or (flag != "0" and have)


# The CPU capabilities (ATen's names) and GCC's -m<flag> for each (the AVX-512 set is ATen's
# own); BuildExt adds ATen's CPU_CAPABILITY macros, from which Vectorized<T> picks its width.
# csrc/ops/registration.cpp checks the same CPU flags at run time.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}
CPU_SOURCES = sorted(glob.glob("csrc/cpu/*.cpp"))


def _cpu_capabilities() -> list[str]:
    """The CPU capabilities to compile the kernels for, narrowest first."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    env = os.environ.get("KASMINA_KERNELS_CPU_CAPABILITIES", "").strip()
    if not env:
        return list(CPU_CAPABILITY_FLAGS) if x86 else ["DEFAULT"]
    wanted = {c.strip().upper() for c in env.split(",") if c.strip()} | {"DEFAULT"}
    if not wanted <= set(CPU_CAPABILITY_FLAGS) or (wanted != {"DEFAULT"} and not x86):
        sys.exit(f"KASMINA_KERNELS_CPU_CAPABILITIES takes {', '.join(CPU_CAPABILITY_FLAGS).lower()}"
                 f" (the last two on x86-64 only), got {env!r}")
    return [c for c in CPU_CAPABILITY_FLAGS if c in wanted]


WITH_CUDA = _want_cuda()
SANITIZE = os.environ.get("KASMINA_KERNELS_SANITIZE", "").strip()
if SANITIZE and not set(SANITIZE.split(",")) <= {"address", "undefined"}:
    sys.exit(f"KASMINA_KERNELS_SANITIZE takes 'address' and/or 'undefined', got {SANITIZE!r}")
CPU_CAPABILITIES = _cpu_capabilities()


def _extension():
    # not CPU_SOURCES: BuildExt compiles those once per capability
    sources = sorted(glob.glob("csrc/ops/*.cpp"))
    # -fopenmp: ATen's at::parallel_for is header code that parallelises through OpenMP
    # pragmas; the libgomp it links is the one torch already loaded (same soname).
    # -g0 after Python's own -g: full debug info of these template-heavy kernels takes a third
    # of the compile time and most of the extension's size
    debug = "-g" if os.environ.get("KASMINA_KERNELS_DEBUG_INFO") == "1" else "-g0"
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-fopenmp", debug]
    link = ["-fopenmp"]
    if SANITIZE:  # after -O3 and -g0, so -O1 and the line tables that reports cite (-g1) win
        cxx += [f"-fsanitize={SANITIZE}", "-O1", "-g1" if debug == "-g0" else debug,
                "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={SANITIZE}"]
    define_macros = [(f"KK_CPU_{c}", "1") for c in CPU_CAPABILITIES if c != "DEFAULT"]
    compile_args = {"cxx": cxx}
    if WITH_CUDA:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        archs = os.environ.get("KASMINA_KERNELS_CUDA_ARCH", "80;90").replace(",", ";").split(";")
        archs = [a.strip().replace(".", "") for a in archs]
        compile_args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        define_macros.append(("KK_WITH_CUDA", "1"))
    make = cpp_extension.CUDAExtension if WITH_CUDA else cpp_extension.CppExtension
    return make("kasmina_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=define_macros, extra_compile_args=compile_args, extra_link_args=link)


def _pin_ninja() -> None:
    """Put the `ninja` package's binary first on PATH, so every build uses the same ninja
    (versions disagree on the build log's format, and a foreign log rebuilds everything)."""
    try:
        import ninja
    except ImportError:
        return
    if os.path.isdir(getattr(ninja, "BIN_DIR", "")):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja) with its objects in build/temp-<configuration> however
    the build starts (pip would otherwise compile everything into a fresh folder each time),
    so only what changed recompiles; an explicit --build-temp is kept.

    The CPU kernels (CPU_SOURCES) are compiled once per capability into
    <build-temp>/<capability> and linked in as extra objects, DEFAULT's first: where the
    copies share a header's inline symbol, the linker keeps the first, which every CPU runs."""

    def finalize_options(self) -> None:
        if self.build_temp is None:
            # one folder per configuration (Python, CUDA, sanitizers): switching keeps each one's objects
            parts = [sys.implementation.cache_tag, "cuda" if WITH_CUDA else "",
                     SANITIZE and "sanitize-" + SANITIZE.replace(",", "-")]
            self.build_temp = os.path.join(ROOT, "build", "temp-" + "-".join(p for p in parts if p))
        super().finalize_options()
        # setuptools skips the link when no file in ext.sources is newer than the extension;
        # the CPU objects and every header are not among those, so always link
        self.force = True

    def build_extension(self, ext) -> None:
        cxx = ext.extra_compile_args["cxx"]  # with the flags BuildExtension has added by now

        def compile_capability(cap: str) -> list[str]:
            macros = [*ext.define_macros, ("CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{cap}", None)]
            return self.compiler.compile(CPU_SOURCES, output_dir=os.path.join(self.build_temp, cap.lower()),
                                         macros=macros, include_dirs=ext.include_dirs,
                                         extra_postargs=cxx + CPU_CAPABILITY_FLAGS[cap])

        # One ninja per capability, all at once, sharing MAX_JOBS (default: the CPU count)
        # between them: one large translation unit (blend_cpu.cpp) dominates each capability,
        # so one at a time would leave the other cores idle.
        jobs = os.environ.get("MAX_JOBS", "")
        total = int(jobs) if jobs.isdigit() else (os.cpu_count() or 1)
        caps = CPU_CAPABILITIES
        with (mock.patch.dict(os.environ, MAX_JOBS=str(max(1, total // len(caps)))),
              concurrent.futures.ThreadPoolExecutor(len(caps)) as pool):
            ext.extra_objects = [o for objects in pool.map(compile_capability, caps) for o in objects]
        super().build_extension(ext)


_pin_ninja()  # before BuildExtension checks that ninja runs
setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)})
