#!/usr/bin/env bash
# The native CPU kernels, built for every other vector ISA this CPU can run, under the tests.
#
# setup.py compiles the CPU kernels for one ISA (KASMINA_KERNELS_CPU_ISA; by default the widest
# this machine's torch reports), so the test suite exercises that one build. On an AVX-512
# machine the AVX2 and default builds, which every CPU without AVX-512 gets, would never run;
# an AVX2-only bug once went unseen that way (float32 MULTIPLY's backward under the mixed float
# tanh). For each ISA in kasmina_kernels/_isa.py, other than the normal build's, whose CPU flags
# this machine has, this script:
#  1. copies setup.py, pyproject.toml, csrc/ and the package's Python files into
#     build/isa-<name>/src and builds _C there, C++ only. setup.py records the ISA inside the
#     package it builds, so the copy keeps the normal build's files untouched;
#  2. runs the native tests whose code differs by ISA against that build: the float32 and
#     double tanh tests, the whole equivalence matrix, contracts,
#     fuzz, streaming stores, autograd, determinism and threads.
#
# Environment: PYTHON (default .venv/bin/python, else python3), KASMINA_ISA_TESTS (pytest
# arguments replacing the default selection), MAX_JOBS (build jobs, default 2).
# Exits 0 with a printed reason when no other ISA runs on this CPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/tools/python.sh"  # sets py, an absolute path

# the other ISAs this CPU runs, by _isa.py's table (loaded by path: importing the package
# would load the normal build's _C)
others="$("$py" - "$ROOT" <<'PY'
import importlib.util, os, sys
root = sys.argv[1]
def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "kasmina_kernels", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
isa = load("_isa")
try:
    built = load("_build_isa").CPU_ISA
except FileNotFoundError:
    built = None
flags = isa.cpu_flags()
if flags is None:
    sys.exit(0)  # not Linux: /proc/cpuinfo cannot say what runs here
print(" ".join(name for name in isa.REQUIRED_FLAGS if name != built and not isa.missing_flags(name, flags)))
PY
)"
if [[ -z "$others" ]]; then
  echo "check_isas: SKIPPED: this CPU runs no ISA build other than the normal one (or /proc/cpuinfo cannot tell)"
  exit 0
fi

if [[ -n "${KASMINA_ISA_TESTS:-}" ]]; then
  read -r -a tests <<<"$KASMINA_ISA_TESTS"
else
  tests=("$ROOT/tests/test_float_tanh.py" "$ROOT/tests/test_double_tanh.py"
    "$ROOT/tests/test_equivalence.py" "$ROOT/tests/test_contracts.py" "$ROOT/tests/test_fuzz.py"
    "$ROOT/tests/test_streaming.py" "$ROOT/tests/test_autograd.py"
    "$ROOT/tests/test_determinism.py" "$ROOT/tests/test_threads.py" -k "native or tanh")
fi

for isa in $others; do
  out="$ROOT/build/isa-$isa"
  src="$out/src"
  rm -rf "$src"
  mkdir -p "$src/kasmina_kernels"
  cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/csrc" "$src/"
  cp -r "$ROOT"/kasmina_kernels/*.py "$ROOT/kasmina_kernels/bench" "$ROOT/kasmina_kernels/triton" \
    "$src/kasmina_kernels/"
  rm -f "$src/kasmina_kernels/_build_isa.py"  # setup.py writes this build's
  start=$SECONDS
  (cd "$src" && KASMINA_KERNELS_CUDA=0 KASMINA_KERNELS_CPU_ISA="$isa" MAX_JOBS="${MAX_JOBS:-2}" \
    "$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1) || {
    tail -n 60 "$out/build.log" >&2
    echo "check_isas: FAILED: $isa build" >&2
    exit 1
  }
  echo "check_isas: $isa: built in $((SECONDS - start))s"

  # run from the build directory, with the copy first on the path: from the repository root,
  # the working directory would put the normal build's package first
  start=$SECONDS
  status=0
  (cd "$out" && PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" "$py" - "$src" "$isa" <<'PY'
import sys
import kasmina_kernels._C as c
from kasmina_kernels import _isa
src, isa = sys.argv[1], sys.argv[2]
if not c.__file__.startswith(src + "/") or _isa.built_isa() != isa:
    sys.exit(f"check_isas: FAILED: imported {c.__file__} built for {_isa.built_isa()}, not the {isa} build under {src}")
PY
  ) || exit 1
  (cd "$out" && unset TRITON_INTERPRET && PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" \
    "$py" -m pytest -q -rs -p no:cacheprovider --rootdir "$ROOT" "${tests[@]}" >"$out/pytest.log" 2>&1) || status=$?
  tail -n 8 "$out/pytest.log"
  if [[ $status -ne 0 ]]; then
    grep -E "^(FAILED|ERROR)" "$out/pytest.log" | head -n 20 >&2 || true
    echo "check_isas: FAILED: the $isa build's tests (pytest exited $status; log: $out/pytest.log)" >&2
    exit 1
  fi
  echo "check_isas: $isa: OK ($((SECONDS - start))s of tests)"
done
