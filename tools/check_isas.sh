#!/usr/bin/env bash
# The native CPU kernels of every other capability this CPU runs, under the tests.
#
# The extension holds the CPU kernels once per capability (DEFAULT, AVX2, AVX512 on x86-64) and
# runs the widest this CPU has, so the test suite alone never runs the narrower copies. For
# each compiled capability below the one in use, this sets ATEN_CPU_CAPABILITY=<capability>
# (ATen and the extension both obey it; no rebuild), checks that `kasmina-kernels info`
# reports it, and runs the native tests whose code differs by capability.
#
# Environment: PYTHON (default .venv/bin/python, else python3), KASMINA_ISA_TESTS (pytest
# arguments replacing the default selection).
# Exits 0 with a printed reason when no other capability runs on this CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
find_python

# the compiled capabilities below the one in use (a CPU that runs one runs every narrower one)
others="$("$py" -c 'from kasmina_kernels import native
info = native.build_info()
compiled = info["cpu_capabilities"]
print(" ".join(compiled[:compiled.index(info["cpu_capability"])]))')"
[[ -n "$others" ]] || skip "this CPU runs no compiled CPU capability other than the one in use"

if [[ -n "${KASMINA_ISA_TESTS:-}" ]]; then
  read -r -a tests <<<"$KASMINA_ISA_TESTS"
else
  tests=(tests/test_{float_tanh,equivalence,contracts,fuzz,streaming}.py
    tests/test_{autograd,determinism,threads}.py -k "native or tanh")
fi

mkdir -p build
for cap in $others; do
  export ATEN_CPU_CAPABILITY="${cap,,}"
  line="$("$py" -m kasmina_kernels info | grep '^native CPU capability')" || true
  [[ "$(awk '{print $4}' <<<"$line")" == "$cap" ]] ||
    fail "under ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY the extension reports '$line', not $cap"
  log="$ROOT/build/isa-$ATEN_CPU_CAPABILITY.pytest.log"
  start=$SECONDS
  status=0
  env -u TRITON_INTERPRET "$py" -m pytest -q -rfEs -p no:cacheprovider "${tests[@]}" >"$log" 2>&1 || status=$?
  tail -n 8 "$log"
  if [[ $status -ne 0 ]]; then
    grep -E "^(FAILED|ERROR)" "$log" | head -n 20 >&2 || true
    fail "the $cap kernels' tests (pytest exited $status; log: $log)"
  fi
  echo "$me: $cap: OK ($((SECONDS - start))s of tests)"
done
