#!/usr/bin/env bash
# CI compile check of the CUDA kernels, without torch and without a GPU: every csrc/cuda/*.cu
# (and the headers they use) includes no torch header and compiles with nvcc for sm_80 and
# sm_90 with torch's extension flags, warnings as errors; then tests/cuda_index_test.cpp
# checks the index arithmetic of kk_cuda.h on the host. Exits 0 with a printed
# reason when nvcc is absent. Environment: NVCC (default: nvcc on PATH, then
# $CUDA_HOME/bin, then /usr/local/cuda/bin), KASMINA_KERNELS_CHECK_ARCHS (default "80 90").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_DIR="$ROOT/csrc/cuda"

nvcc_bin="${NVCC:-}"
if [[ -n "$nvcc_bin" && ! -x "$nvcc_bin" ]]; then
  echo "check_cuda_compile: FAILED: NVCC=$NVCC is not an executable" >&2
  exit 1
fi
for c in "$nvcc_bin" "$(command -v nvcc || true)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
  if [[ -n "$c" && -x "$c" ]]; then nvcc_bin="$c"; break; fi
done
if [[ -z "$nvcc_bin" ]]; then
  echo "check_cuda_compile: SKIPPED: nvcc not found (not on PATH, not in \$CUDA_HOME/bin or" \
    "/usr/local/cuda/bin); install the CUDA toolkit or set NVCC to compile-check csrc/cuda"
  exit 0
fi

read -r -a archs <<<"${KASMINA_KERNELS_CHECK_ARCHS:-80 90}"
gencode=()
for a in "${archs[@]}"; do gencode+=("-gencode=arch=compute_${a},code=sm_${a}"); done
arch_names="sm_${archs[*]}"
arch_names="${arch_names// / sm_}"

shopt -s nullglob
sources=("$CUDA_DIR"/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda_compile: FAILED: no CUDA sources under csrc/cuda" >&2
  exit 1
fi
status=0
for f in "${sources[@]}" "$CUDA_DIR"/*.cuh "$CUDA_DIR"/*.h "$ROOT/csrc/kernels/blend_math.h"; do
  if grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10|caffe2|pybind11)/' "$f"; then
    echo "check_cuda_compile: FAILED: ${f#"$ROOT"/} includes torch headers (only the glue may)" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] || exit 1

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "check_cuda_compile: $("$nvcc_bin" --version | tail -n 1)"
echo "check_cuda_compile: archs $arch_names"

# torch's CUDAExtension flags (no implicit half conversions), setup.py's own, warnings as errors
flags=(
  -std=c++20 -O3 --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Xcompiler -Wall -Werror all-warnings
  -I"$ROOT/csrc"
)
for src in "${sources[@]}"; do
  rel="${src#"$ROOT"/}"
  start=$SECONDS
  if ! "$nvcc_bin" "${flags[@]}" "${gencode[@]}" -c "$src" -o "$tmp/$(basename "$src" .cu).o"; then
    echo "check_cuda_compile: FAILED: $rel" >&2
    exit 1
  fi
  echo "check_cuda_compile: compiled $rel for $arch_names ($((SECONDS - start))s)"
done

start=$SECONDS
if ! "$nvcc_bin" -std=c++20 -O1 -Xcompiler -Wall -Werror all-warnings -I"$ROOT/csrc" \
  "$ROOT/tests/cuda_index_test.cpp" -o "$tmp/cuda_index_test"; then
  echo "check_cuda_compile: FAILED: building tests/cuda_index_test.cpp" >&2
  exit 1
fi
if ! "$tmp/cuda_index_test"; then
  echo "check_cuda_compile: FAILED: tests/cuda_index_test" >&2
  exit 1
fi
echo "check_cuda_compile: ran tests/cuda_index_test ($((SECONDS - start))s)"
echo "check_cuda_compile: OK (${#sources[@]} CUDA sources, $arch_names)"
