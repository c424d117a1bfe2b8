// CPU vector plumbing: kk::Prims for at::vec::Vectorized<float>, and loads/stores that turn
// float, bfloat16 and float16 memory into float vectors (and back, rounding once).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "kernels/blend_math.h"

// The CPU capability this file is compiled for (setup.py compiles each): KK_AVX512 (512-bit
// Vectorized<float>, 16 lanes), KK_AVX2 (256-bit, 8 lanes), or neither (ATen's generic
// Vectorized). One library holds every capability's copy, so everything below that depends
// on the width lives in an inline namespace named by CPU_CAPABILITY, as ATen's Vectorized
// does: two copies never share a symbol.
#if defined(CPU_CAPABILITY_AVX512)
#define KK_AVX512 1
#elif defined(CPU_CAPABILITY_AVX2)
#define KK_AVX2 1
#endif

namespace kk {

using FVec = at::vec::Vectorized<float>;

template <>
struct Prims<FVec> {
  static FVec abs(const FVec& x) { return x.abs(); }
  static FVec lt(const FVec& a, const FVec& b) { return a < b; }
  static FVec select(const FVec& mask, const FVec& a, const FVec& b) {
    return FVec::blendv(b, a, mask);
  }
  // Sleef's vector tanh costs about three exps; this one is one exp and a division.
  static FVec tanh(const FVec& x) { return tanh_from_exp(x); }
  // exp for the arguments tanh_from_exp passes (0 <= x <= 20): see exp_small below
  static FVec exp(const FVec& x);
  static FVec fnma(const FVec& a, const FVec& b, const FVec& c) { return at::vec::fnmadd(a, b, c); }
  static FVec fma(const FVec& a, const FVec& b, const FVec& c) { return at::vec::fmadd(a, b, c); }
};

#if defined(KK_AVX2) || defined(KK_AVX512)
// exp of float lanes for |x| <= 87 (tanh_from_exp clamps its argument to [0, 20]):
// Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2, the Taylor polynomial of degree 7
// (truncation < 1e-8 relative), and 2^n by exponent arithmetic; about twice as fast as
// Sleef's general expf, within about one ulp. NaN propagates.
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
inline FVec Prims<FVec>::exp(const FVec& x) { return exp_small(x); }
#else
inline FVec Prims<FVec>::exp(const FVec& x) { return x.exp(); }
#endif

namespace cpu {
inline namespace CPU_CAPABILITY {

// float for float / bfloat16 / float16, double for double.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One step of a vector loop covers two float vectors (16 lanes on AVX2, 32 on AVX-512), which
// is one full 16-bit vector: bfloat16 and float16 convert in whole registers.
constexpr int64_t kStep = 2 * FVec::size();

// A software prefetch of the lines kPrefetchBytes past p's `bytes`. The CPU loops do a few
// cycles of work per 64-byte line; on the 2-core VMs measured (Intel Xeon) the hardware
// prefetcher alone left streaming loops well below a plain sum()'s bandwidth, and a prefetch
// this far ahead closes most of the gap. A prefetch past the end of an allocation is harmless
// (it never faults).
constexpr int64_t kPrefetchBytes = 2048;
template <int64_t bytes = 64>
inline void prefetch_ahead(const void* p) {
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes + off);
  }
}

// Loads one step (2 float vectors) from T memory, widened to float, and prefetches the same
// span kPrefetchBytes ahead: every streaming loop reads its inputs through here.
template <typename T>
inline void load2(const T* p, FVec& a, FVec& b) {
  prefetch_ahead<2 * FVec::size() * sizeof(T)>(p);
  if constexpr (std::is_same_v<T, float>) {
    a = FVec::loadu(p);
    b = FVec::loadu(p + FVec::size());
  } else {
    at::vec::load_to_float<T>(p, a, b);
  }
}

template <typename T>
inline void store2(T* p, const FVec& a, const FVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + FVec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// Non-temporal (streaming) stores: for outputs too large to stay in cache, a plain store first
// reads the line it writes (read-for-ownership); a streaming store does not, which cuts the
// pass's memory traffic by the output's size. They need addresses aligned to the vector width
// (32 bytes on AVX2, 64 on AVX-512) and are weakly ordered: a pass that streams ends with
// stream_fence() on the thread that stored.
inline bool stream_aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(FVec)) == 0;
}

// a and b hold T values exactly (already rounded to T): T's bit patterns, packed. For
// bfloat16 they are the floats' upper halves, so no rounding work is repeated.
#if defined(KK_AVX512)
using HalfBits = __m512i;
#elif defined(KK_AVX2)
using HalfBits = __m256i;
#endif
#if defined(KK_AVX2) || defined(KK_AVX512)
template <typename T>
inline HalfBits pack_exact(const FVec& a, const FVec& b) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(KK_AVX512)
    const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(a), 16);
    const __m512i hi = _mm512_srli_epi32(_mm512_castps_si512(b), 16);
    // packus interleaves per 128-bit lane: put the 64-bit groups back in order
    return _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7),
                                    _mm512_packus_epi32(lo, hi));
#else
    const __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(a), 16);
    const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(b), 16);
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
#endif
  } else {
    return at::vec::convert_from_float<T>(a, b);  // float16: one exact conversion each
  }
}

inline void store_bits(void* p, const HalfBits& v, bool stream) {
#if defined(KK_AVX512)
  if (stream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  } else {
    _mm512_storeu_si512(p, v);
  }
#else
  if (stream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
#endif
}
#endif


template <typename T>
inline void store2_stream(T* p, const FVec& a, const FVec& b) {
#if defined(KK_AVX2) || defined(KK_AVX512)
  if constexpr (std::is_same_v<T, float>) {
#if defined(KK_AVX512)
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + FVec::size(), b);
#else
    _mm256_stream_ps(p, a);
    _mm256_stream_ps(p + FVec::size(), b);
#endif
    return;
  } else if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    store_bits(p, at::vec::convert_from_float<T>(a, b), true);
    return;
  }
#endif
  store2<T>(p, a, b);
}

// store2, streaming when `stream` (the caller checked the alignment)
template <typename T>
inline void store2(T* p, const FVec& a, const FVec& b, bool stream) {
  if (stream) {
    store2_stream<T>(p, a, b);
  } else {
    store2<T>(p, a, b);
  }
}

// Stores a and b, which hold T values exactly (already rounded to T).
template <typename T>
inline void store2_exact(T* p, const FVec& a, const FVec& b, bool stream) {
#if defined(KK_AVX2) || defined(KK_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    store_bits(p, pack_exact<T>(a, b), stream);
    return;
  }
#endif
  store2<T>(p, a, b, stream);
}

// A half-precision dtype T: stores a and b (which hold T values exactly) at p, and their
// negation at q: the same 16-bit patterns with the sign flipped.
template <typename T>
inline void store2_negated(T* p, T* q, const FVec& a, const FVec& b, bool stream) {
#if defined(KK_AVX2) || defined(KK_AVX512)
  const HalfBits v = pack_exact<T>(a, b);
#if defined(KK_AVX512)
  const HalfBits neg = _mm512_xor_si512(v, _mm512_set1_epi16(static_cast<short>(0x8000)));
#else
  const HalfBits neg = _mm256_xor_si256(v, _mm256_set1_epi16(static_cast<short>(0x8000)));
#endif
  store_bits(p, v, stream);
  store_bits(q, neg, stream);
#else
  store2<T>(p, a, b, stream);
  store2<T>(q, a.neg(), b.neg(), stream);
#endif
}

inline void stream_fence() {
#if defined(KK_AVX2) || defined(KK_AVX512)
  _mm_sfence();
#endif
}

#if defined(KK_AVX512)
// float lanes rounded to bfloat16 (round to nearest even, as c10::BFloat16) and back, in
// integer arithmetic: no packing to 16-bit lanes and back. NaN stays NaN; overflow gives inf.
inline FVec round_bf16(const FVec& x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __m512 rounded = _mm512_castsi512_ps(
      _mm512_and_si512(biased, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, x);
}

// float lanes rounded to float16 and back (round to nearest even).
inline FVec round_f16(const FVec& x) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(KK_AVX2)
// float lanes rounded to bfloat16 (round to nearest even, as c10::BFloat16) and back, in
// integer arithmetic: no packing to 16-bit lanes and back. NaN stays NaN; overflow gives inf.
inline FVec round_bf16(const FVec& x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i biased = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 rounded =
      _mm256_castsi256_ps(_mm256_and_si256(biased, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  return _mm256_blendv_ps(rounded, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// float lanes rounded to float16 and back with F16C (round to nearest even).
inline FVec round_f16(const FVec& x) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

// Round float lanes to T's precision and back (the "cast to the host dtype" of the contract).
template <typename T>
inline void round_through(FVec& a, FVec& b) {
  if constexpr (!std::is_same_v<T, float>) {
#if defined(KK_AVX2) || defined(KK_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      a = round_bf16(a);
      b = round_bf16(b);
      return;
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      a = round_f16(a);
      b = round_f16(b);
      return;
    }
#endif
    auto v = at::vec::convert_from_float<T>(a, b);
    auto [x, y] = at::vec::convert_to_float<T>(v);
    a = x;
    b = y;
  }
}

// Rounds to T's precision, one vector or one scalar at a time: the reference's rounding points.
template <typename T>
struct RoundTo {
  FVec operator()(FVec a) const {
#if defined(KK_AVX2) || defined(KK_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) return round_bf16(a);
    if constexpr (std::is_same_v<T, c10::Half>) return round_f16(a);
#endif
    FVec b = a;
    round_through<T>(a, b);
    return a;
  }
  float operator()(float x) const { return static_cast<float>(static_cast<T>(x)); }
  double operator()(double x) const { return x; }
};

// Load S memory as T values widened to float: s.to(T) then computed in float.
template <typename T, typename S>
inline void load2_as(const S* p, FVec& a, FVec& b) {
  load2<S>(p, a, b);
  if constexpr (!std::is_same_v<T, S>) {
    round_through<T>(a, b);
  }
}

// Scalar counterpart: S value cast to T, widened to T's opmath.
template <typename T, typename S>
inline opmath_t<T> as_op(S v) {
  return static_cast<opmath_t<T>>(static_cast<T>(v));
}

template <typename T>
inline constexpr bool kVectorizable = !std::is_same_v<T, double>;

// The 16-bit pattern of a bfloat16 or float16 value, as a table index.
template <typename T>
inline uint32_t half_bits(T v) {
  return v.x;
}

// Table lookups by 16-bit pattern. AVX2: scalar loads (on the AVX2 parts measured, AMD EPYC, a
// vgatherdps of 8 lanes costs about twice 8 scalar loads). AVX-512: one vgatherdps per vector.
#if defined(KK_AVX512)
// The T bit patterns of float lanes that hold T values exactly (loaded from T memory, or
// rounded to T), as 32-bit indices.
template <typename T>
inline __m512i half_indices(const FVec& a) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // the bfloat16 bits are the float's upper half (a NaN from arithmetic is quiet, so its
    // upper half is a bfloat16 NaN as well)
    return _mm512_srli_epi32(_mm512_castps_si512(a), 16);
  } else {
    return _mm512_cvtepu16_epi32(_mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <typename T>
inline void lookup2(const float* table, const FVec& a, const FVec& b, FVec& ra, FVec& rb) {
  ra = _mm512_i32gather_ps(half_indices<T>(a), table, 4);
  rb = _mm512_i32gather_ps(half_indices<T>(b), table, 4);
}
#else
inline FVec lookup_lanes(const float* table, const uint32_t* idx) {
  float r[FVec::size()];
  for (int64_t k = 0; k < FVec::size(); ++k) r[k] = table[idx[k]];
  return FVec::loadu(r);
}

// table[bits] for 2 vectors of a half-precision dtype T given as float lanes that already hold
// T values exactly (loaded from T memory, or rounded to T): each lane's T bit pattern indexes.
template <typename T>
inline void lookup2(const float* table, const FVec& a, const FVec& b, FVec& ra, FVec& rb) {
  uint32_t idx[2 * FVec::size()];
#if defined(KK_AVX2)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // a float holding a bfloat16 value exactly: the bfloat16 bits are its upper half (a NaN
    // from arithmetic is quiet, so its upper half is a bfloat16 NaN as well)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx),
                        _mm256_srli_epi32(_mm256_castps_si256(a), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + FVec::size()),
                        _mm256_srli_epi32(_mm256_castps_si256(b), 16));
  } else {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx),
                        _mm256_cvtepu16_epi32(_mm256_cvtps_ph(a, kRound)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + FVec::size()),
                        _mm256_cvtepu16_epi32(_mm256_cvtps_ph(b, kRound)));
  }
#else
  float ta[FVec::size()], tb[FVec::size()];
  a.store(ta);
  b.store(tb);
  for (int64_t k = 0; k < FVec::size(); ++k) {
    idx[k] = half_bits(static_cast<T>(ta[k]));
    idx[FVec::size() + k] = half_bits(static_cast<T>(tb[k]));
  }
#endif
  ra = lookup_lanes(table, idx);
  rb = lookup_lanes(table, idx + FVec::size());
}
#endif

// table[bits] for 2 vectors' worth of consecutive T values in memory.
template <typename T>
inline void lookup2_mem(const float* table, const T* p, FVec& ra, FVec& rb) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(p);
  float r[2 * FVec::size()];
  for (int64_t k = 0; k < 2 * FVec::size(); ++k) r[k] = table[bits[k]];
  ra = FVec::loadu(r);
  rb = FVec::loadu(r + FVec::size());
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kk
