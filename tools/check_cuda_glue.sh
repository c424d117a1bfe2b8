#!/usr/bin/env bash
# Type-checks the CUDA torch glue (csrc/cuda/glue.cpp) against the installed torch's headers
# with g++ -fsyntax-only -Werror; a CPU build of torch lacks the generated
# c10/cuda/impl/cuda_cmake_macros.h, which is stubbed. Exits 0 with a printed reason when torch,
# the CUDA headers or a C++ compiler are missing. Environment: PYTHON (default .venv/bin/python,
# else python3), CXX, CUDA_HOME.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
find_python
cxx="${CXX:-g++}"

command -v "$cxx" >/dev/null 2>&1 || skip "no C++ compiler ($cxx)"
torch_inc="$("$py" -c 'import torch.utils.cpp_extension as c; print(*c.include_paths(), sep="\n")' \
  2>/dev/null)" || skip "torch is not importable with $py"
mapfile -t torch_inc <<<"$torch_inc"

cuda_inc=""
nvcc="$(cuda_tool nvcc)"
for d in "${CUDA_HOME:-}" "${nvcc:+$(dirname "$(dirname "$nvcc")")}" /usr/local/cuda; do
  if [[ -n "$d" && -f "$d/include/cuda_runtime_api.h" ]]; then cuda_inc="$d/include"; break; fi
done
if [[ -z "$cuda_inc" && -n "$nvcc" ]]; then
  # nvcc may be a wrapper script: ask it where its headers are.
  d="$("$nvcc" -v -E -x c++ /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
  [[ -n "$d" && -f "$d/cuda_runtime_api.h" ]] && cuda_inc="$d"
fi
[[ -n "$cuda_inc" ]] || skip "CUDA headers (cuda_runtime_api.h) not found; set CUDA_HOME"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
includes=(-Icsrc)
for d in "${torch_inc[@]}" "$cuda_inc"; do includes+=(-isystem "$d"); done
if [[ ! -f "${torch_inc[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$tmp/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/c10/cuda/impl/cuda_cmake_macros.h"
  includes+=(-isystem "$tmp")
  echo "$me: stubbed c10/cuda/impl/cuda_cmake_macros.h (CPU build of torch)"
fi

start=$SECONDS
"$cxx" -fsyntax-only -std=c++20 -Wall -Wextra -Werror -DKK_WITH_CUDA "${includes[@]}" csrc/cuda/glue.cpp
echo "$me: OK: csrc/cuda/glue.cpp type-checks against $(dirname "${torch_inc[0]}") ($((SECONDS - start))s)"
