#!/usr/bin/env bash
# The test command: install from scratch into .venv, compile-check the CUDA kernels, their
# torch glue and the Triton kernels for a GPU (each skipped, with the reason, where its tools
# are absent), run the native CPU kernels' tests under ASan + UBSan and under each other CPU
# capability this machine runs, then the whole suite (Triton on CPU under TRITON_INTERPRET=1,
# in a reduced matrix; extra arguments go to pytest), then `kasmina-kernels bench --quick`,
# which fails if any backend's output or gradient does not match the reference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup_env.sh
bash tools/check_cuda_compile.sh                  # nvcc, sm_80 + sm_90, warnings are errors
PYTHON=.venv/bin/python bash tools/check_cuda_glue.sh   # the torch glue against torch's headers
.venv/bin/python tools/check_triton_compile.py           # the Triton kernels, compiled for sm_90
PYTHON=.venv/bin/python bash tools/check_sanitizers.sh  # native CPU kernels under ASan + UBSan
PYTHON=.venv/bin/python bash tools/check_isas.sh        # the other CPU capabilities this CPU runs
# KASMINA_TEST_LARGE=1: the >2**31-element native tests (tests/test_large.py, ~13 GiB, ~1 min)
TRITON_INTERPRET=1 KASMINA_TEST_LARGE=1 .venv/bin/python -m pytest tests -q -rs "$@"
bench_out="$(mktemp -d)"
trap 'rm -rf "$bench_out"' EXIT
bench_start=$SECONDS
.venv/bin/kasmina-kernels bench --quick --out "$bench_out"
echo "kasmina-kernels bench --quick: OK ($((SECONDS - bench_start))s)"
