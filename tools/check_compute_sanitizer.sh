#!/usr/bin/env bash
# compute-sanitizer over the CUDA and Triton kernels (needs a GPU; not part of CPU CI).
#
#   bash tools/check_compute_sanitizer.sh                 # memcheck, then racecheck
#   bash tools/check_compute_sanitizer.sh memcheck initcheck synccheck racecheck
#
# Each tool runs tools/cuda_sanitizer_driver.py, with the caching allocator off so that an
# out-of-bounds access lands outside its allocation. A sanitizer error or a driver mismatch
# fails the run. Environment: PYTHON, COMPUTE_SANITIZER (default: on PATH, then
# $CUDA_HOME/bin, then /usr/local/cuda/bin), KASMINA_SANITIZER_BACKENDS (default
# native,triton), KASMINA_SANITIZER_OPS (default: every op; comma-separated).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
find_python
cs="${COMPUTE_SANITIZER:-$(cuda_tool compute-sanitizer)}"
[[ -n "$cs" ]] || fail "compute-sanitizer not found (install the CUDA toolkit or set COMPUTE_SANITIZER)"
tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=(memcheck racecheck)
backends="${KASMINA_SANITIZER_BACKENDS:-native,triton}"

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
# PyTorch's own kernels (namespace at::native, mangled "2at6native"), which build the inputs
# and run the reference, run uninstrumented, so that a run over every op stays short.
filter=()
cs_help=$("$cs" --help 2>/dev/null || true)  # captured first: grep -q in a pipe would SIGPIPE it under pipefail
if grep -q -- "--kernel-name-exclude" <<<"$cs_help"; then
  filter=(--kernel-name-exclude kns=2at6native)
else
  echo "$me: this compute-sanitizer has no --kernel-name-exclude; every kernel is instrumented (slow)"
fi
if [[ " ${tools[*]} " == *" memcheck "* ]]; then
  # the check must be able to fail: a planted out-of-bounds store has to be reported
  rc=0
  canary_log=$("$cs" --tool memcheck --error-exitcode 99 "${filter[@]}" \
    "$py" -u tools/cuda_sanitizer_driver.py --canary 2>&1) || rc=$?
  if ((rc != 99)); then
    echo "$canary_log" | tail -n 20
    fail "memcheck did not report the planted out-of-bounds store (exit $rc)"
  fi
  echo "$me: memcheck reports a planted out-of-bounds store: $(echo "$canary_log" | grep -m1 -E "Invalid|out of bounds" || true)"
fi
status=0
for tool in "${tools[@]}"; do
  extra=()
  repeat=2
  case "$tool" in
    memcheck) extra=(--leak-check no) ;;  # the torch runtime keeps allocations until exit
    racecheck) extra=(--racecheck-report analysis); repeat=1 ;;  # slow: one pass per case
    initcheck) extra=(--track-unused-memory no); repeat=1 ;;
    synccheck) repeat=1 ;;
    *) echo "$me: unknown tool $tool" >&2; exit 1 ;;
  esac
  start=$SECONDS
  echo "$me: $tool over $backends"
  rc=0
  "$cs" --tool "$tool" --error-exitcode 99 --target-processes all "${filter[@]}" "${extra[@]}" \
    "$py" -u tools/cuda_sanitizer_driver.py --backends "$backends" --repeat "$repeat" \
    ${KASMINA_SANITIZER_OPS:+--ops "$KASMINA_SANITIZER_OPS"} || rc=$?
  took="$((SECONDS - start))s"
  case $rc in
    0) echo "$me: $tool OK ($took)" ;;
    99) echo "$me: $tool FAILED: the sanitizer reported errors ($took)" >&2; status=1 ;;
    # the driver's own check (a result off the reference) or a crash; the other tools still run
    *) echo "$me: $tool: no sanitizer error, but the driver exited $rc (MISMATCH lines above) ($took)" >&2
       status=1 ;;
  esac
done
exit $status
