#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything this project needs: torch first (so
# nothing pulls a second one), the build tools, then the package, built against that torch
# with --no-build-isolation. Idempotent; build/setup_env.log has the build's output.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${KASMINA_TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY="$ROOT/.venv/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# setuptools 77 reads pyproject.toml's license string; resolved with torch, which may cap it
"$PY" -m pip install --quiet "$TORCH_SPEC" "setuptools>=77"
"$PY" -m pip install --quiet wheel ninja pytest hypothesis numpy triton
# the benchmarks: pytest-benchmark (bench/), plots and the progress bar of `kasmina-kernels bench`
"$PY" -m pip install --quiet pytest-benchmark matplotlib tqdm
# builds kasmina_kernels._C against the torch above; never pulls another torch. Only what
# changed recompiles (setup.py keeps the objects). Once the package is installed editable from
# this tree (and pyproject.toml and setup.py are not newer than that install), pip is skipped
# and the extension is rebuilt in place.
installed_here() {
  local finder
  finder=$(ls .venv/lib/python*/site-packages/__editable___kasmina_kernels_*_finder.py 2>/dev/null | head -n1)
  [ -x .venv/bin/kasmina-kernels ] && [ -n "$finder" ] && grep -qF "'$ROOT/kasmina_kernels'" "$finder" &&
    [ ! pyproject.toml -nt "$finder" ] && [ ! setup.py -nt "$finder" ]
}
mkdir -p build
build_start=$SECONDS
if installed_here; then
  how="setup.py build_ext --inplace (installed editable from this tree)"
  build=("$PY" setup.py build_ext --inplace)
else
  how="pip install --no-build-isolation -e ."
  build=("$PY" -m pip install -v --no-build-isolation -e .)
fi
"${build[@]}" >build/setup_env.log 2>&1 || {
  tail -n 60 build/setup_env.log >&2
  fail "$how (log: build/setup_env.log)"
}
compiled=$(grep -cE '^ *\[[0-9]+/[0-9]+\] ' build/setup_env.log || true)
echo "setup_env: kasmina_kernels._C by $how: $compiled sources recompiled (the rest up to date), $((SECONDS - build_start))s (log: build/setup_env.log)"
"$PY" -c "import torch, kasmina_kernels; print('torch', torch.__version__, '| kasmina_kernels', kasmina_kernels.__version__, '| backends:', kasmina_kernels.available_backends())"
