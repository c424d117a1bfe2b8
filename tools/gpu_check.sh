#!/usr/bin/env bash
# On a CUDA machine whose python3 has a CUDA torch, triton, ninja and pytest (no network
# needed): build the extension with its CUDA kernels in place, run `kasmina-kernels check` on
# CUDA, then the test files that take KASMINA_TEST_DEVICE=cuda and the CUDA-only tests. Logs go
# to $OUT (the device tool's folder) or out/gpu. Extra arguments go to every pytest run.
#
#   bash tools/gpu_check.sh                 # everything
#   GPU_CHECK_STEPS="build check" bash tools/gpu_check.sh
#
# PYTHON (default python3), KASMINA_KERNELS_CUDA_ARCH (default 90: H100/H200) and MAX_JOBS
# (default: every core) pass through to the build.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG_DIR="${OUT:-$ROOT/out/gpu}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
STEPS="${GPU_CHECK_STEPS:-build check native triton cuda}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
status=0

step() { [[ " $STEPS " == *" $1 "* ]]; }

if step build; then
  log="$LOG_DIR/build.log"
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  } 2>&1 | tee "$log"
  arch="${KASMINA_KERNELS_CUDA_ARCH:-90}"
  start=$SECONDS
  if ! KASMINA_KERNELS_CUDA=1 KASMINA_KERNELS_CUDA_ARCH="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" setup.py build_ext --inplace >>"$log" 2>&1; then
    tail -n 60 "$log"
    echo "gpu_check: BUILD FAILED (log: $log)" >&2
    exit 1
  fi
  echo "gpu_check: built kasmina_kernels._C with CUDA (sm_$arch) in $((SECONDS - start)) s"
fi

if step check; then
  "$PY" -m kasmina_kernels info || status=1
  "$PY" -m kasmina_kernels check --device cuda >"$LOG_DIR/check.md" 2>&1 || status=1
  grep -E "FAIL|unavailable|Error" "$LOG_DIR/check.md" | head -n 20
fi

run_pytest() {  # name, then pytest arguments
  local name=$1; shift
  local start=$(date +%s)
  KASMINA_TEST_DEVICE=cuda "$PY" -m pytest -q -rs -p no:cacheprovider "$@" >"$LOG_DIR/$name.log" 2>&1 || status=1
  echo "== $name ($(( $(date +%s) - start )) s)"
  grep -E "^(FAILED|ERROR)" "$LOG_DIR/$name.log" | head -n 25
  tail -n 6 "$LOG_DIR/$name.log"
}

DEVICE_TESTS=(tests/test_equivalence.py tests/test_autograd.py tests/test_compile.py)
step native && run_pytest native "${DEVICE_TESTS[@]}" -k "not triton" "$@"
step triton && run_pytest triton "${DEVICE_TESTS[@]}" -k "triton" "$@"
if step cuda; then
  mapfile -t CUDA_ONLY < <(ls tests/test_cuda*.py 2>/dev/null)
  if ((${#CUDA_ONLY[@]})); then run_pytest cuda_only "${CUDA_ONLY[@]}" "$@"; fi
fi
echo "gpu_check: exit $status"
exit $status
