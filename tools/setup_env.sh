#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything this project needs, from scratch:
# torch first (so nothing pulls a second one), the build tools, then the package itself,
# built against that torch with --no-build-isolation. Source it or run it; idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${KASMINA_TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY="$ROOT/.venv/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$TORCH_SPEC"
"$PY" -m pip install --quiet setuptools wheel ninja pytest hypothesis numpy triton
# the benchmarks: pytest-benchmark (bench/), plots and the progress bar of `kasmina-kernels bench`
"$PY" -m pip install --quiet pytest-benchmark matplotlib tqdm
# builds kasmina_kernels._C against the torch above; never pulls another torch
"$PY" -m pip install --quiet --no-build-isolation -e .
"$PY" -c "import torch, kasmina_kernels; print('torch', torch.__version__, '| kasmina_kernels', kasmina_kernels.__version__, '| backends:', kasmina_kernels.available_backends())"
