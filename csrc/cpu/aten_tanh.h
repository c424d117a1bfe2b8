// torch's own float32 tanh, bit for bit: MKL VML's vmsTanh in high-accuracy mode when the
// running torch was built with MKL (what ATen's tanh kernel calls), else Sleef's vector tanh
// with std::tanh for the tail (ATen's path without MKL). MULTIPLY's and the valve's
// gradients use 1 - t^2 of the tanh the reference saved, which amplifies a one-ulp
// difference where tanh saturates, so they need exactly the reference's t.
#pragma once

#include <cstdint>
#include <string>

namespace kk::cpu {

// out[i] = tanh(in[i]) for i < n, exactly as torch.tanh computes float32 (in == out allowed).
void aten_tanh_f32(const float* in, float* out, int64_t n);

// Which float32 tanh MULTIPLY and the valve use (cpu/tanh_f32.h): kTorch is aten_tanh_f32 on
// every element; kMixed takes a rational where |x| < 1 and aten_tanh_f32 elsewhere. The
// default is kTorch where torch runs MKL on an Intel CPU (MKL's AVX-512 tanh beats the
// rational's bookkeeping there) and kMixed elsewhere (MKL on other vendors' CPUs takes a
// path about five times slower; without MKL, ATen's Sleef tanh is slower still).
// KASMINA_KERNELS_FLOAT_TANH=torch|mixed overrides the default; set_float_tanh switches it
// at run time (the tests run both).
enum class FloatTanh { kTorch, kMixed };
FloatTanh float_tanh();
void set_float_tanh(FloatTanh mode);
// "torch" / "mixed": the names the environment variable and the Python switch use.
const char* float_tanh_name(FloatTanh mode);
// The mode a name gives, false for any other name.
bool parse_float_tanh(const std::string& name, FloatTanh& mode);

// tanh of every bfloat16 (float16) value, as ATen's half-precision tanh computes it before
// rounding: Vectorized<float>::tanh (Sleef) of the value widened to float. Indexed by the
// 16-bit pattern; 65536 floats, built once on first use. A half-precision tanh then costs a
// table lookup instead of a Sleef evaluation, with the same bits.
const float* tanh_table_bf16();
const float* tanh_table_f16();

// A per-thread scratch row of at least n floats (reused across calls).
float* scratch_row(int64_t n);

}  // namespace kk::cpu
