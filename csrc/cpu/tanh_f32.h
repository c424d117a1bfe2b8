// float32 tanh of a row, for MULTIPLY and the valve: torch's own bits where they matter, a
// fast rational elsewhere (in the kMixed mode of aten_tanh.h; kTorch takes torch's bits
// everywhere).
//
// The gradients use 1 - t^2 and the forward 1 + c*t; both amplify a one-ulp difference in t
// as |t| nears 1, so there t must be exactly the reference's float tanh (aten_tanh_f32: MKL's
// vmsTanh in torch's x86 builds). Below kTanhRationalBound the amplification is small: there
// the [7/6] Pade approximant of tanh (the continued fraction x/(1+x^2/(3+x^2/(5+...))) cut
// after 11; truncation below 5e-9 relative on the interval) evaluated in float32 is within
// one ulp of torch's tanh for every float in the interval, and equal to it for 99.85% of them
// (every float checked: tools/check_tanh_f32.py). The largest change that ulp makes to
// 1 - t^2 or to 1 + t is 2.5e-7 relative, a fifth of float32's default rtol (1.3e-6).
// Anything at or past the bound (NaN and infinities included) takes torch's bits.
//
// Why not torch's everywhere: where MKL does not take its AVX-512 path (AMD EPYC CPUs),
// vmsTanh costs about 2.7 ns an element, and the valve needs tanh in both directions. With
// randn-like inputs about a third of the elements reach the bound.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/aten_tanh.h"
#include "cpu/vec_io.h"

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

inline constexpr float kTanhRationalBound = 1.0f;

#if defined(KK_AVX2) || defined(KK_AVX512)
// tanh(x) for |x| < kTanhRationalBound from the approximant x P(z) / Q(z), z = x^2,
// P = 1 + 4/33 z + 1/495 z^2, Q = 1 + 5/11 z + 2/99 z^2 + 1/10395 z^3, written as
// x - x z R(z) / Q(z) with R = (Q - P) / z = 1/3 + z/55 + z^2/10395: the rounding errors then
// fall on the correction, at most about a third of the result, so small x come out nearly
// correctly rounded. Exact at 0 and odd.
inline FVec tanh_rational(const FVec& x) {
  const FVec z = x * x;
  FVec r = at::vec::fmadd(z, FVec(1.0f / 10395.0f), FVec(1.0f / 55.0f));
  r = at::vec::fmadd(r, z, FVec(1.0f / 3.0f));
  FVec q = at::vec::fmadd(z, FVec(1.0f / 10395.0f), FVec(2.0f / 99.0f));
  q = at::vec::fmadd(q, z, FVec(5.0f / 11.0f));
  q = at::vec::fmadd(q, z, FVec(1.0f));
  // 1 / q by the hardware estimate and one Newton step (about 2^-23 relative after it with
  // AVX2's 12-bit estimate, 2^-28 with AVX-512's 14-bit one): a division costs more than the
  // rest together, and the quotient only scales the correction
#if defined(KK_AVX512)
  FVec inv = _mm512_rcp14_ps(q);
#else
  FVec inv = _mm256_rcp_ps(q);
#endif
  inv = inv * at::vec::fnmadd(q, inv, FVec(2.0f));
  const FVec t = at::vec::fnmadd(x * z, r * inv, x);
  return t | (x & FVec(-0.0f));  // x - 0 is +0 for x = -0: put x's sign back
}

// t[i] = tanh(x[i]) for i < n (x == t allowed): torch's bits where |x| >= the bound or x is
// NaN, the rational elsewhere. Block by block, the lanes at or past the bound are gathered
// into a stack buffer and handed to aten_tanh_f32 in one call.
inline void tanh_row_f32(const float* x, float* t, int64_t n) {
  if (float_tanh() == FloatTanh::kTorch) return aten_tanh_f32(x, t, n);
  constexpr int64_t kBlock = 2048;
  // on the stack (16 KiB): a thread_local in a shared library costs a __tls_get_addr call per
  // access. + one vector: the compressing stores below write whole vectors.
  alignas(64) float far_x[kBlock + FVec::size()];
  alignas(64) int32_t far_at[kBlock + FVec::size()];
  const FVec bound(kTanhRationalBound);
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const float* xb = x + begin;
    float* tb = t + begin;
    const int64_t len = std::min(kBlock, n - begin);
    int64_t far = 0;
    int64_t i = 0;
    for (; i + FVec::size() <= len; i += FVec::size()) {
      const FVec v = FVec::loadu(xb + i);
      const FVec near = v.abs() < bound;  // false for NaN
#if defined(KK_AVX512)
      const auto far_mask =
          static_cast<__mmask16>(~_mm512_movepi32_mask(_mm512_castps_si512(near)));
      if (far_mask != 0) {
        const __m512i at = _mm512_add_epi32(
            _mm512_set1_epi32(static_cast<int32_t>(i)),
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        // compress in registers, then a whole-vector store: compress-store to memory is
        // microcoded (slow) on AMD Zen 4
        _mm512_storeu_ps(far_x + far, _mm512_maskz_compress_ps(far_mask, v));
        _mm512_storeu_si512(far_at + far, _mm512_maskz_compress_epi32(far_mask, at));
        far += __builtin_popcount(far_mask);
      }
#else
      unsigned far_mask = ~static_cast<unsigned>(_mm256_movemask_ps(near)) & 0xFFu;
      while (far_mask != 0) {
        const int lane = __builtin_ctz(far_mask);
        far_mask &= far_mask - 1;
        far_x[far] = xb[i + lane];
        far_at[far++] = static_cast<int32_t>(i + lane);
      }
#endif
      // only now: t may be x (MULTIPLY's backward works in place), and the AVX2 branch above
      // gathers its far lanes from memory
      tanh_rational(v).store(tb + i);
    }
    for (; i < len; ++i) {
      if (std::abs(xb[i]) < kTanhRationalBound) {
        float lanes[FVec::size()] = {xb[i]};
        tanh_rational(FVec::loadu(lanes)).store(lanes);
        tb[i] = lanes[0];
      } else {
        far_x[far] = xb[i];
        far_at[far++] = static_cast<int32_t>(i);
      }
    }
    if (far == 0) continue;
    aten_tanh_f32(far_x, far_x, far);
    for (int64_t k = 0; k < far; ++k) tb[far_at[k]] = far_x[k];
  }
}
#else
inline void tanh_row_f32(const float* x, float* t, int64_t n) { aten_tanh_f32(x, t, n); }
#endif

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
