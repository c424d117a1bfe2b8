#!/usr/bin/env bash
# The test command: install from scratch into .venv, compile-check the CUDA kernels with nvcc
# (skipped, with the reason, where nvcc is absent), then run the whole suite. The Triton
# backend runs on CPU under TRITON_INTERPRET=1 in a reduced matrix; native and reference run
# their full CPU matrix. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
if [ -f tools/check_cuda_compile.sh ]; then
  bash tools/check_cuda_compile.sh
fi
TRITON_INTERPRET=1 .venv/bin/python -m pytest tests -q -rs "$@"
