// CPU vector plumbing: kk::Prims for at::vec::Vectorized<float>, and loads/stores that turn
// float, bfloat16 and float16 memory into float vectors (and back, rounding once).
//
// setup.py compiles this once per CPU capability (AVX512, AVX2, DEFAULT: ATen's generic
// Vectorized); everything here lives in the capability's inline namespace, as ATen's
// Vectorized does, so two copies never share a symbol.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "kernels/blend_math.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define KK_X86_VEC 1
#endif

namespace kk {

using FVec = at::vec::Vectorized<float>;
using DVec = at::vec::Vectorized<double>;

// exp of float lanes for |x| <= 87 (tanh_from_exp clamps its argument to [0, 20]):
// Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2, the Taylor polynomial of degree 7
// (truncation < 1e-8 relative), and 2^n by exponent arithmetic; cheaper than Sleef's general
// expf, within about one ulp. NaN propagates.
inline FVec exp_small(const FVec& x) {
  const FVec n = (x * FVec(1.44269504088896341f)).round();
  FVec r = at::vec::fnmadd(n, FVec(0.693359375f), x);
  r = at::vec::fnmadd(n, FVec(-2.12194440e-4f), r);
  FVec p(1.0f / 5040.0f);
  for (float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    p = at::vec::fmadd(p, r, FVec(c));
  }
  using IVec = at::vec::Vectorized<int32_t>;
  // n is integral: the truncating conversion is exact
  const IVec biased = at::vec::convert_to_int_of_same_size(n) + IVec(127);
  return p * at::vec::cast<float>(biased << IVec(23));
}

template <>
struct Prims<FVec> {
  static FVec abs(const FVec& x) { return x.abs(); }
  static FVec lt(const FVec& a, const FVec& b) { return a < b; }
  static FVec select(const FVec& mask, const FVec& a, const FVec& b) {
    return FVec::blendv(b, a, mask);
  }
  // mag's sign bit clear: x's sign bit set into it
  static FVec copysign(const FVec& mag, const FVec& x) { return mag | (x & FVec(-0.0f)); }
  // Sleef's vector tanh costs about three exps; this one is one exp and a division.
  static FVec tanh(const FVec& x) { return tanh_from_exp(x); }
  static FVec exp(const FVec& x) { return exp_small(x); }
  static FVec fnma(const FVec& a, const FVec& b, const FVec& c) { return at::vec::fnmadd(a, b, c); }
  static FVec fma(const FVec& a, const FVec& b, const FVec& c) { return at::vec::fmadd(a, b, c); }
};

namespace cpu {
inline namespace CPU_CAPABILITY {

// float for float / bfloat16 / float16, double for double.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline constexpr bool kVectorizable = !std::is_same_v<T, double>;

template <typename T>
inline constexpr bool kHalfPrecision = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// One step of a vector loop covers two float vectors, which is one full 16-bit vector:
// bfloat16 and float16 convert in whole registers.
constexpr int64_t kStep = 2 * FVec::size();
using F2 = FVec[2];

// A software prefetch of the lines kPrefetchBytes past p's `bytes`: the loops do a few cycles
// of work per 64-byte line, too little for the hardware prefetcher alone to keep up. A
// prefetch past the end of an allocation never faults.
constexpr int64_t kPrefetchBytes = 2048;
template <int64_t bytes = 64>
inline void prefetch_ahead(const void* p) {
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes + off);
  }
}

// Loads one step from T memory, widened to float, and prefetches ahead: every streaming loop
// reads its inputs through here.
template <typename T>
inline void load2(const T* p, F2& v) {
  prefetch_ahead<kStep * sizeof(T)>(p);
  if constexpr (std::is_same_v<T, float>) {
    v[0] = FVec::loadu(p);
    v[1] = FVec::loadu(p + FVec::size());
  } else {
    at::vec::load_to_float<T>(p, v[0], v[1]);
  }
}

// Non-temporal (streaming) stores, for outputs too large to stay in cache: a plain store first
// reads the line it writes, a streaming store does not. They need addresses aligned to the
// vector width and are weakly ordered: a pass that streams ends with stream_fence() on the
// thread that stored.
inline bool stream_aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(FVec)) == 0;
}

// The outputs of a loop that may be streamed, bit k for output k: a tile's transposed buffer
// is read back at once, so it is stored plainly beside streamed outputs.
using StreamMask = uint32_t;
inline constexpr StreamMask kStreamAll = ~StreamMask{0};

#if defined(CPU_CAPABILITY_AVX512)
inline void stream_store(void* p, __m512 v) { _mm512_stream_ps(static_cast<float*>(p), v); }
inline void stream_store(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream_store(void* p, __m256 v) { _mm256_stream_ps(static_cast<float*>(p), v); }
inline void stream_store(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
#endif

inline void stream_fence() {
#ifdef KK_X86_VEC
  _mm_sfence();
#endif
}

// Stores one step to T memory, rounding once; streaming when `stream` (the caller checked
// the alignment).
template <typename T>
inline void store2(T* p, const FVec& a, const FVec& b, bool stream = false) {
  if constexpr (std::is_same_v<T, float>) {
#ifdef KK_X86_VEC
    if (stream) {
      stream_store(p, a);
      stream_store(p + FVec::size(), b);
      return;
    }
#endif
    a.store(p);
    b.store(p + FVec::size());
  } else {
    const auto v = at::vec::convert_from_float<T>(a, b);
#ifdef KK_X86_VEC
    if (stream) return stream_store(p, v);
#endif
    v.store(p);
  }
}

template <typename T>
inline void store2(T* p, const F2& v, bool stream = false) {
  store2<T>(p, v[0], v[1], stream);
}

// Float lanes rounded to T's precision and back (the "cast to the host dtype" of the contract).
template <typename T>
inline FVec rounded(const FVec& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
#ifdef KK_X86_VEC
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // round to nearest even in integer arithmetic, as c10::BFloat16; NaN stays NaN
      using IVec = at::vec::Vectorized<int32_t>;
      const IVec bits = at::vec::cast<int32_t>(x);
      const IVec lsb = (bits >> IVec(16)) & IVec(1);
      const IVec r = (bits + lsb + IVec(0x7FFF)) & IVec(static_cast<int32_t>(0xFFFF0000u));
      return FVec::blendv(at::vec::cast<float>(r), x, x.isnan());
    } else {
      constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if defined(CPU_CAPABILITY_AVX512)
      return _mm512_cvtph_ps(_mm512_cvtps_ph(x, kNearest));
#else
      return _mm256_cvtph_ps(_mm256_cvtps_ph(x, kNearest));
#endif
    }
#else
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(x, x)));
#endif
  }
}

// Rounds to T's precision, one vector or one scalar at a time: the reference's rounding points.
template <typename T>
struct RoundTo {
  FVec operator()(const FVec& a) const { return rounded<T>(a); }
  float operator()(float x) const { return static_cast<float>(static_cast<T>(x)); }
  double operator()(double x) const { return x; }
};

// Load S memory as T values widened to float: s.to(T) then computed in float.
template <typename T, typename S>
inline void load2_as(const S* p, F2& v) {
  load2<S>(p, v);
  if constexpr (!std::is_same_v<T, S>) {
    v[0] = rounded<T>(v[0]);
    v[1] = rounded<T>(v[1]);
  }
}

// Scalar counterpart: S value cast to T, widened to T's opmath.
template <typename T, typename S>
inline opmath_t<T> as_op(S v) {
  return static_cast<opmath_t<T>>(static_cast<T>(v));
}

// The lower and upper halves of a float vector, widened to double.
inline void widen(const FVec& v, DVec& lo, DVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
#else
  float f[FVec::size()];
  double d[FVec::size()];
  v.store(f);
  for (int64_t k = 0; k < FVec::size(); ++k) d[k] = static_cast<double>(f[k]);
  lo = DVec::loadu(d);
  hi = DVec::loadu(d + DVec::size());
#endif
}

// FVec::size() double lanes fed one float vector at a time: each float enters exactly.
struct DLanes {
  DVec lo = DVec(0.0), hi = DVec(0.0);
  void add(const FVec& v) {
    DVec l, h;
    widen(v, l, h);
    lo = lo + l;
    hi = hi + h;
  }
  void add(const DLanes& o) {
    lo = lo + o.lo;
    hi = hi + o.hi;
  }
  // term(...) of the arguments' widened halves; `term` takes as many vectors
  template <typename Term, typename... V>
  static std::pair<DVec, DVec> terms(Term term, const V&... v) {
    std::array<DVec, sizeof...(V)> l, h;
    size_t k = 0;
    ((widen(v, l[k], h[k]), ++k), ...);
    return {std::apply(term, l), std::apply(term, h)};
  }
  template <typename Term, typename... V>
    requires(sizeof...(V) > 0)
  void add(Term term, const V&... v) {
    const auto [l, h] = terms(term, v...);
    lo = lo + l;
    hi = hi + h;
  }
  // p[0..FVec::size()) += the lanes
  void add_into(double* p) const {
    (DVec::loadu(p) + lo).store(p);
    (DVec::loadu(p + DVec::size()) + hi).store(p + DVec::size());
  }
  // the lanes' sum into `acc` (an Accumulator), summed in double first: a flush ends every row,
  // and lane by lane it would cost more than a short row; double is far finer than the float
  // terms' own rounding
  template <typename Acc>
  void flush_into(Acc& acc) const {
    double lanes[DVec::size()];
    (lo + hi).store(lanes);
    double sum = 0.0;
    for (double v : lanes) sum += v;
    acc.add(sum);
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kk
