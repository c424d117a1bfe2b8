#!/usr/bin/env bash
# CI compile check of the CUDA kernels, without torch and without a GPU.
#
#  1. Every torch-free CUDA source (csrc/cuda/*.cu; the torch glue csrc/cuda/glue.cpp is not
#     one) must not include torch headers, and must compile with nvcc for sm_80 and sm_90
#     (-std=c++20, torch's extension flags, -Xcompiler -Wall, -Werror all-warnings).
#  2. The kernels' index arithmetic (csrc/cuda/kk_cuda.h, csrc/cuda/plan.h) is checked on the
#     host by tools/cuda_index_test.cpp.
#
# Exits non-zero on any error or warning; exits 0 with a printed reason when nvcc is absent.
# Objects go to a temporary directory. Environment:
#   NVCC                         the nvcc to use (default: nvcc on PATH, then
#                                $CUDA_HOME/bin/nvcc, then /usr/local/cuda/bin/nvcc)
#   KASMINA_KERNELS_CHECK_ARCHS  architectures, default "80 90"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_DIR="$ROOT/csrc/cuda"

nvcc_bin="${NVCC:-}"
if [[ -z "$nvcc_bin" ]]; then
  for c in "$(command -v nvcc || true)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [[ -n "$c" && -x "$c" ]]; then nvcc_bin="$c"; break; fi
  done
fi
if [[ -n "${NVCC:-}" && ! -x "$nvcc_bin" ]]; then
  echo "check_cuda_compile: FAILED: NVCC=$NVCC is not an executable" >&2
  exit 1
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "check_cuda_compile: SKIPPED: nvcc not found (not on PATH, not in \$CUDA_HOME/bin or" \
    "/usr/local/cuda/bin); install the CUDA toolkit or set NVCC to compile-check csrc/cuda"
  exit 0
fi

read -r -a archs <<<"${KASMINA_KERNELS_CHECK_ARCHS:-80 90}"
gencode=()
arch_names=()
for a in "${archs[@]}"; do
  gencode+=("-gencode=arch=compute_${a},code=sm_${a}")
  arch_names+=("sm_${a}")
done

shopt -s nullglob
sources=("$CUDA_DIR"/*.cu)
headers=("$CUDA_DIR"/*.cuh "$CUDA_DIR"/*.h "$ROOT/csrc/kernels/blend_math.h")
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda_compile: FAILED: no CUDA sources under csrc/cuda" >&2
  exit 1
fi

# 1a. torch-free: the kernels and launchers see CUDA headers and blend_math.h only.
status=0
for f in "${sources[@]}" "${headers[@]}"; do
  if grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10|caffe2|pybind11)/' "$f"; then
    echo "check_cuda_compile: FAILED: ${f#"$ROOT"/} includes torch headers (only the glue may)" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] || exit 1

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "check_cuda_compile: $("$nvcc_bin" --version | tail -n 1)"
echo "check_cuda_compile: archs ${arch_names[*]}"

# The flags torch's CUDAExtension adds (no implicit half conversions), the build's own
# (setup.py: -O3 -std=c++20 --expt-relaxed-constexpr), warnings as errors.
flags=(
  -std=c++20 -O3 --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Xcompiler -Wall -Werror all-warnings
  -I"$ROOT/csrc"
)

# 1b. compile, one source at a time (both archs per nvcc call).
for src in "${sources[@]}"; do
  rel="${src#"$ROOT"/}"
  obj="$tmp/$(basename "$src" .cu).o"
  start=$SECONDS
  if ! "$nvcc_bin" "${flags[@]}" "${gencode[@]}" -c "$src" -o "$obj"; then
    echo "check_cuda_compile: FAILED: $rel" >&2
    exit 1
  fi
  echo "check_cuda_compile: compiled $rel for ${arch_names[*]} ($((SECONDS - start))s)"
done

# 2. host test of the index arithmetic (host code only; nvcc drives the host compiler).
start=$SECONDS
if ! "$nvcc_bin" -std=c++20 -O1 -Xcompiler -Wall -Werror all-warnings -I"$ROOT/csrc" \
  "$ROOT/tools/cuda_index_test.cpp" -o "$tmp/cuda_index_test"; then
  echo "check_cuda_compile: FAILED: building tools/cuda_index_test.cpp" >&2
  exit 1
fi
if ! "$tmp/cuda_index_test"; then
  echo "check_cuda_compile: FAILED: tools/cuda_index_test" >&2
  exit 1
fi
echo "check_cuda_compile: ran tools/cuda_index_test ($((SECONDS - start))s)"
echo "check_cuda_compile: OK (${#sources[@]} CUDA sources, ${arch_names[*]})"
