#!/usr/bin/env bash
# The GPU benchmark in one call, from the repository root of a CUDA machine whose python3 has
# torch (CUDA build), triton, ninja, matplotlib and tqdm; no network needed:
#
#   OUT=/some/dir bash bench/gpu_run.sh
#
# Builds kasmina_kernels._C in place (tools/gpu_check.sh's build step), then runs the full
# `kasmina-kernels bench --device cuda` with a --time-limit that ends the script within
# KK_GPU_BUDGET_S seconds (default 420; at most ~570 under a 10-minute limit); entries run in
# priority order and those not started in time are listed in the report. Writes report.md,
# results.json, bandwidth.png, speedup.png, build.log and bench.log to $OUT (default
# ./bench-gpu-out). Exit status: the bench's (1 on a mismatch), or the build's.
set -euo pipefail
start=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OUT="${OUT:-$ROOT/bench-gpu-out}"
PY="${PYTHON:-python3}"
budget="${KK_GPU_BUDGET_S:-420}"

GPU_CHECK_STEPS=build PYTHON="$PY" bash tools/gpu_check.sh
build_s=$((SECONDS - start))

# stop starting new entries early enough for the entry in flight, the report and the plots
limit=$((budget - build_s - 45))
if ((limit < 60)); then limit=60; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m kasmina_kernels info >>"$OUT/build.log" 2>&1
set +e
"$PY" -m kasmina_kernels bench --device cuda --out "$OUT" --time-limit "$limit" 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
set -e
echo "gpu_run: bench exit status $status, total ${SECONDS}s (build ${build_s}s, bench limit ${limit}s); files in $OUT:"
ls -la "$OUT"
exit $status
