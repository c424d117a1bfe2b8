#!/usr/bin/env bash
# CI compile check of the CUDA kernels, without torch and without a GPU: every csrc/cuda/*.cu
# (and the headers they use) includes no torch header and compiles with nvcc for sm_80 and
# sm_90 with torch's extension flags, warnings as errors; then tests/cuda_index_test.cpp
# checks the index arithmetic of kk_cuda.h on the host. Exits 0 with a printed
# reason when nvcc is absent. Environment: NVCC (default: nvcc on PATH, then
# $CUDA_HOME/bin, then /usr/local/cuda/bin), KASMINA_KERNELS_CHECK_ARCHS (default "80 90").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ -z "${NVCC:-}" || -x "$NVCC" ]] || fail "NVCC=$NVCC is not an executable"
nvcc_bin="${NVCC:-$(cuda_tool nvcc)}"
[[ -n "$nvcc_bin" ]] || skip "nvcc not found (not on PATH, not in \$CUDA_HOME/bin or" \
  "/usr/local/cuda/bin); install the CUDA toolkit or set NVCC to compile-check csrc/cuda"

read -r -a archs <<<"${KASMINA_KERNELS_CHECK_ARCHS:-80 90}"
gencode=()
for a in "${archs[@]}"; do gencode+=("-gencode=arch=compute_${a},code=sm_${a}"); done
arch_names="${archs[*]/#/sm_}"

shopt -s nullglob
sources=(csrc/cuda/*.cu)
[[ ${#sources[@]} -gt 0 ]] || fail "no CUDA sources under csrc/cuda"
if grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10|caffe2|pybind11)/' \
  "${sources[@]}" csrc/cuda/*.cuh csrc/cuda/*.h csrc/kernels/blend_math.h; then
  fail "the files above include torch headers (only the glue may)"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "$me: $("$nvcc_bin" --version | tail -n 1)"
echo "$me: archs $arch_names"

# torch's CUDAExtension flags (no implicit half conversions), setup.py's own, warnings as errors
flags=(
  -std=c++20 -O3 --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Xcompiler -Wall -Werror all-warnings
  -Icsrc
)
for src in "${sources[@]}"; do
  start=$SECONDS
  "$nvcc_bin" "${flags[@]}" "${gencode[@]}" -c "$src" -o "$tmp/$(basename "$src" .cu).o" || fail "$src"
  echo "$me: compiled $src for $arch_names ($((SECONDS - start))s)"
done

start=$SECONDS
"$nvcc_bin" -std=c++20 -O1 -Xcompiler -Wall -Werror all-warnings -Icsrc tests/cuda_index_test.cpp \
  -o "$tmp/cuda_index_test" || fail "building tests/cuda_index_test.cpp"
"$tmp/cuda_index_test" || fail "tests/cuda_index_test"
echo "$me: ran tests/cuda_index_test ($((SECONDS - start))s)"
echo "$me: OK (${#sources[@]} CUDA sources, $arch_names)"
