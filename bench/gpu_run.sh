#!/usr/bin/env bash
# The GPU benchmark in one call, from the repository root of a CUDA machine whose python3 has
# torch (CUDA build), triton, ninja, matplotlib and tqdm; no network needed:
#
#   OUT=/some/dir bash bench/gpu_run.sh
#
#  1. builds kasmina_kernels._C in place with the CUDA kernels for sm_90 (H100)
#     (KASMINA_KERNELS_CUDA_ARCH overrides; the log goes to $OUT/build.log);
#  2. runs the full `kasmina-kernels bench --device cuda` (every op, every backend: native CUDA
#     and Triton, against eager and torch.compile; float32 and bfloat16; Esper's shapes, the
#     small shape and the size sweep) with a time limit so that the whole script ends within
#     KK_GPU_BUDGET_S seconds (default 420, i.e. 7 minutes; at most ~570 under a 10-minute
#     limit): entries not started by then are listed in the report. Entries run in priority
#     order: ADD, MULTIPLY, GATE and pooling at the named shapes, then the size sweep, then
#     the other ops.
#
# Writes to $OUT (default ./bench-gpu-out): report.md, results.json, bandwidth.png,
# speedup.png, build.log, bench.log. Does not run the tests. Exit status: the bench's (1 when a
# backend does not match the reference), or the build's.
set -euo pipefail
start=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/bench-gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
budget="${KK_GPU_BUDGET_S:-420}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} >"$OUT/build.log" 2>&1

PYTHON="$PY" bash tools/build_cuda_inplace.sh "$OUT/build.log" || {
  echo "gpu_run: FAILED: building the extension (log: $OUT/build.log)" >&2
  exit 1
}
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
