#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer over the native CPU kernels: builds
# kasmina_kernels._C (CPU kernels of the capability ATen runs here, and DEFAULT) with
# -fsanitize=address,undefined into build/sanitize/, beside the normal build, and runs the
# native backend's tests against it (the reduced equivalence matrix and the contract,
# property-based, autograd, error, determinism and thread tests) and the drop-ins' tests.
#
# Python is not instrumented, so the ASan runtime is preloaded to come first: every malloc,
# torch's CPU tensors included, gets redzones. libstdc++ is preloaded right after it: the
# runtime forwards a C++ throw to the __cxa_throw it finds when it starts, and Python does not
# link libstdc++, so without it every exception thrown in C++ (an op's error, autograd's)
# would end the run. Leak detection is off: CPython and torch keep interned objects, caches
# and registries alive until exit on purpose, which LeakSanitizer would report by the
# thousand. Any report fails the run (halt_on_error, and a log scan).
#
# Environment: PYTHON (default .venv/bin/python, else python3), CXX (default g++),
# KASMINA_SANITIZE_TESTS (pytest arguments replacing the default selection).
# Exits 0 with a printed reason when no C++ compiler, libasan or libstdc++ is found.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
find_python
cxx="${CXX:-g++}"
command -v "$cxx" >/dev/null 2>&1 || skip "no C++ compiler ($cxx)"
libasan="$("$cxx" -print-file-name=libasan.so)"
[[ -e "$libasan" ]] || skip "$cxx has no libasan.so (install the compiler's libasan)"
libstdcxx="$("$cxx" -print-file-name=libstdc++.so.6)"
[[ -e "$libstdcxx" ]] || skip "$cxx has no libstdc++.so.6"

out="$ROOT/build/sanitize"
lib="$out/lib"
mkdir -p "$out"  # a fresh clone has no build/ yet; the log goes beside it
# the CPU kernels of the capability the tests run only (and DEFAULT, always compiled)
cap="$("$py" -c 'import torch; c = torch.backends.cpu.get_cpu_capability()
print(c.lower() if c in ("AVX2", "AVX512") else "default")')"
start=$SECONDS
KASMINA_KERNELS_CUDA=0 KASMINA_KERNELS_SANITIZE=address,undefined KASMINA_KERNELS_CPU_CAPABILITIES="$cap" \
  MAX_JOBS="${MAX_JOBS:-2}" "$py" setup.py -q build_ext --build-lib "$lib" --build-temp "$out/tmp" >"$out.build.log" 2>&1 || {
  tail -n 60 "$out.build.log" >&2
  fail "sanitizer build"
}
echo "$me: built with -fsanitize=address,undefined in $((SECONDS - start))s"

# the package's Python side, linked beside the sanitized _C
for f in kasmina_kernels/*.py kasmina_kernels/triton; do
  ln -sfn "$ROOT/$f" "$lib/kasmina_kernels/$(basename "$f")"
done

export LD_PRELOAD="$libasan:$libstdcxx"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$lib${PYTHONPATH:+:$PYTHONPATH}"
export KASMINA_TEST_REDUCED=1
unset TRITON_INTERPRET  # the Triton interpreter is plain Python: nothing for ASan to see

# run from the build directory: `python -m`/`-c` put the working directory first on sys.path,
# and from the repository root that would import the normal build in ./kasmina_kernels
cd "$out"
so="$("$py" -c 'import kasmina_kernels._C as c; print(c.__file__)')"
[[ "$so" == "$lib"/* ]] || fail "imported $so, not the sanitized build under $lib"
grep -q __asan_ <<<"$(nm -D "$so")" || fail "$so has no ASan instrumentation"

# Self-test: reading past the end of a torch CPU tensor's buffer must be reported, i.e. the
# preloaded runtime sees torch's allocations (a 4-float tensor, 64 bytes read from it).
selftest="$("$py" -c 'import ctypes, torch
t = torch.zeros(4)
dst = (ctypes.c_char * 64)()
ctypes.memmove(dst, t.data_ptr(), 64)
print("NOT REPORTED")' 2>&1 || true)"
if ! grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" <<<"$selftest"; then
  echo "$selftest" | tail -n 5 >&2
  fail "self-test: ASan did not report an overflow of a tensor buffer (above)"
fi
echo "$me: self-test OK: an overflow of a torch CPU tensor is reported"

if [[ -n "${KASMINA_SANITIZE_TESTS:-}" ]]; then
  read -r -a tests <<<"$KASMINA_SANITIZE_TESTS"
else
  tests=("$ROOT"/tests/test_{equivalence,contracts,fuzz,autograd}.py
    "$ROOT"/tests/test_{errors,determinism,threads,dropin}.py -k "native or test_dropin")
fi
log="$out/pytest.log"
start=$SECONDS
status=0
"$py" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" "${tests[@]}" >"$log" 2>&1 || status=$?
tail -n 15 "$log"
if grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$log"; then
  grep -m 5 -A 30 -E "ERROR: AddressSanitizer|runtime error:" "$log" >&2 || true
  fail "sanitizer report (full log: $log)"
fi
[[ $status -eq 0 ]] || fail "pytest exited $status under the sanitizers (log: $log)"
echo "$me: OK: no ASan/UBSan report ($((SECONDS - start))s of tests)"
