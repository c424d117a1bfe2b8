// ATen's half-precision tanh as tables: MULTIPLY's and the valve's bfloat16/float16 kernels
// take tanh from here: a lookup costs less than evaluating a float32 tanh, and gives ATen's
// own bits (bench/results/cpu-amd-epyc-2026-12-03/tanh-table-ab-threads-1.md measures it).
#pragma once

#include <cstdint>

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

// tanh of every bfloat16 (float16) value, as ATen's half-precision tanh computes it before
// rounding: Vectorized<float>::tanh (Sleef) of the value widened to float. Indexed by the
// 16-bit pattern; 65536 floats, built once on first use.
const float* tanh_table_bf16();
const float* tanh_table_f16();

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
