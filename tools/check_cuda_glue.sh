#!/usr/bin/env bash
# Type-checks the CUDA torch glue (csrc/cuda/glue.cpp) against the installed torch's headers
# with g++ -fsyntax-only -Werror; a CPU build of torch lacks the generated
# c10/cuda/impl/cuda_cmake_macros.h, which is stubbed. Exits 0 with a printed reason when torch,
# the CUDA headers or a C++ compiler are missing. Environment: PYTHON, CXX, CUDA_HOME.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
cxx="${CXX:-g++}"

if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "check_cuda_glue: SKIPPED: no C++ compiler ($cxx)"
  exit 0
fi
if ! torch_inc="$("$py" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))' 2>/dev/null)"; then
  echo "check_cuda_glue: SKIPPED: torch is not importable with $py"
  exit 0
fi

cuda_inc=""
for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")" /usr/local/cuda; do
  if [[ -n "$d" && -f "$d/include/cuda_runtime_api.h" ]]; then
    cuda_inc="$d/include"
    break
  fi
done
if [[ -z "$cuda_inc" ]]; then
  # nvcc may be a wrapper script: ask it where its headers are.
  if command -v nvcc >/dev/null 2>&1; then
    d="$(nvcc -v -E -x c++ /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
    [[ -n "$d" && -f "$d/cuda_runtime_api.h" ]] && cuda_inc="$d"
  fi
fi
if [[ -z "$cuda_inc" ]]; then
  echo "check_cuda_glue: SKIPPED: CUDA headers (cuda_runtime_api.h) not found; set CUDA_HOME"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
includes=(-I"$ROOT/csrc")
first_inc=""
while IFS= read -r d; do
  [[ -n "$d" ]] || continue
  [[ -n "$first_inc" ]] || first_inc="$d"
  includes+=(-isystem "$d")
done <<<"$torch_inc"
includes+=(-isystem "$cuda_inc")
if [[ ! -f "$first_inc/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$tmp/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/c10/cuda/impl/cuda_cmake_macros.h"
  includes+=(-isystem "$tmp")
  echo "check_cuda_glue: stubbed c10/cuda/impl/cuda_cmake_macros.h (CPU build of torch)"
fi

start=$SECONDS
"$cxx" -fsyntax-only -std=c++20 -Wall -Wextra -Werror -DKK_WITH_CUDA "${includes[@]}" \
  "$ROOT/csrc/cuda/glue.cpp"
echo "check_cuda_glue: OK: csrc/cuda/glue.cpp type-checks against $(dirname "$first_inc") ($((SECONDS - start))s)"
