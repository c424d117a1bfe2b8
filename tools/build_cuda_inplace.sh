#!/usr/bin/env bash
# Builds kasmina_kernels._C in place with its CUDA kernels, on a CUDA machine whose python
# (PYTHON, default python3) has a CUDA build of torch and ninja. Shared by tools/gpu_check.sh
# and bench/gpu_run.sh.
#
#   bash tools/build_cuda_inplace.sh LOGFILE   # appends the build's output to LOGFILE
#
# KASMINA_KERNELS_CUDA_ARCH (default 90: the H100/H200) and MAX_JOBS (default: every core)
# pass through. On failure prints the log's last 60 lines and exits 1.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log="${1:?usage: build_cuda_inplace.sh LOGFILE}"
arch="${KASMINA_KERNELS_CUDA_ARCH:-90}"
start=$SECONDS
if ! KASMINA_KERNELS_CUDA=1 KASMINA_KERNELS_CUDA_ARCH="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PYTHON:-python3}" setup.py build_ext --inplace >>"$log" 2>&1; then
  tail -n 60 "$log"
  echo "build_cuda_inplace: FAILED (log: $log)" >&2
  exit 1
fi
echo "build_cuda_inplace: built kasmina_kernels._C with CUDA (sm_$arch) in $((SECONDS - start)) s"
