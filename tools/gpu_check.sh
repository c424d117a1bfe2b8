#!/usr/bin/env bash
# Everything that needs a GPU, in one call, on a CUDA machine whose python3 has a CUDA torch,
# triton, ninja and pytest (no network needed). Steps, in order:
#   build  the extension with its CUDA kernels, in place (CPU kernels for DEFAULT only unless
#          KASMINA_KERNELS_CPU_CAPABILITIES says otherwise: the CPU capabilities are tested on CPU)
#   check  `kasmina-kernels check --device cuda`
#   tests  the whole suite with KASMINA_TEST_DEVICE=cuda (equivalence files first; pytest-xdist
#          workers when installed); interrupted after GPU_CHECK_TEST_S seconds (default 300),
#          when pytest still prints what failed so far
#   bench  `kasmina-kernels bench --device cuda` (Esper's calls first, then the sweep, then the
#          training step) with GPU_CHECK_BENCH_ARGS (e.g. "--esper-only --time-limit 120")
# Logs and the bench's files go to $OUT (the device tool's folder) or out/gpu, at most eight
# files: build.log, tests.log, bench.log, bench/{report.md,results.json,*.png}.
#
#   bash tools/gpu_check.sh                                  # every step
#   GPU_CHECK_STEPS="build tests" bash tools/gpu_check.sh
#
# PYTHON (default python3), KASMINA_KERNELS_CUDA_ARCH (default 90: H100/H200) and MAX_JOBS
# (default: every core) pass through to the build; extra arguments go to pytest.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
LOG_DIR="${OUT:-$ROOT/out/gpu}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
STEPS="${GPU_CHECK_STEPS:-build check tests bench}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
status=0
begin=$SECONDS

step() { [[ " $STEPS " == *" $1 "* ]]; }
say() { echo "gpu_check [$((SECONDS - begin)) s]: $*"; }

if step build; then
  log="$LOG_DIR/build.log"
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
    nproc
  } 2>&1 | tee "$log"
  arch="${KASMINA_KERNELS_CUDA_ARCH:-90}"
  if ! KASMINA_KERNELS_CUDA=1 KASMINA_KERNELS_CUDA_ARCH="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      KASMINA_KERNELS_CPU_CAPABILITIES="${KASMINA_KERNELS_CPU_CAPABILITIES-DEFAULT}" \
      "$PY" setup.py build_ext --inplace >>"$log" 2>&1; then
    tail -n 60 "$log"
    say "BUILD FAILED (log: $log)" >&2
    exit 1
  fi
  say "built kasmina_kernels._C with CUDA (sm_$arch)"
fi

if step check; then
  { "$PY" -m kasmina_kernels info && "$PY" -m kasmina_kernels check --device cuda; } \
    >>"$LOG_DIR/build.log" 2>&1 || status=1
  grep -E "FAIL|unavailable|Error" "$LOG_DIR/build.log" | head -n 20
  say "check done (exit so far $status)"
fi

if step tests; then
  workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${GPU_CHECK_WORKERS:-12}")
  first=(tests/test_{equivalence,autograd,compile,cuda_graphs,autocast,determinism,triton,nn}.py)
  KASMINA_TEST_DEVICE=cuda timeout -s INT -k 30 "${GPU_CHECK_TEST_S:-300}" \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider "${workers[@]}" "${first[@]}" tests "$@" \
    >"$LOG_DIR/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$LOG_DIR/tests.log" | head -n 40
  tail -n 4 "$LOG_DIR/tests.log"
  say "tests done (exit so far $status)"
fi

if step bench; then
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a word list
  "$PY" -m kasmina_kernels bench --device cuda --out "$LOG_DIR/bench" ${GPU_CHECK_BENCH_ARGS:-} \
    >"$LOG_DIR/bench.log" 2>&1 || status=1
  grep -E "^bench: (FAILED|[0-9]+ entries)" -A 12 "$LOG_DIR/bench.log" | head -n 30
  say "bench done (exit so far $status)"
fi
say "exit $status"
exit $status
