// TensorIterator loop bodies of the blend family (lerp for ADD/GATE, MULTIPLY, STE and the
// valve multiplier), forward and backward, templated on the feature dtype T and the seed's
// dtype S (T itself, or float beside a bfloat16/float16 host). Math comes from
// kernels/blend_math.h; these files only move data and round once.
#pragma once

#include "cpu/aten_tanh.h"
#include "cpu/loops.h"
#include "cpu/vec_io.h"

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

constexpr int64_t kGrain = 32768;

template <typename T>
struct Tag {
  using type = T;
};

// tanh in double of double lanes, to 1e-12 relative: the alpha-gradient terms of float32
// MULTIPLY and the valve use it. Those terms must not inherit the float tanh's rounding: its
// errors (up to half a float ulp per element, all with the same weight g*h) add up, and the
// oracle of docs/semantics.md#equivalence forms tanh in double. 1e-12 is far below a float ulp, and cheaper
// than a full double tanh.
//
// tanh|x| = E / (E + 2) with E = exp(2|x|) - 1. Write 2|x| = m ln2 + 2h (m whole, |h| <= ln2/4)
// and H = expm1(2h) / 2; then E = 2^m (2H + 1) - 1, and dividing both by 2^(m+1),
//   tanh|x| = (H + (1 - 2^-m) / 2) / (H + (1 + 2^-m) / 2).
// For m = 0 the numerator is H itself, so small |x| keep their relative accuracy without a
// branch; for m > 0 both terms exceed 0.29, and the rounding of ln2 in h (below 1e-15) does not
// show. H = h + h^2 Q(h), Q the rest of the Taylor series of expm1(2h) / 2 to h^10 (truncation
// below 7e-13 relative for |h| <= ln2/4). |x| is clamped to 20 (tanh(20) is 1 in double); NaN
// propagates.
// The loops that use it are bound by its ~30 vector operations and their dependency chain: Q is
// evaluated by Estrin's scheme (4 FMAs deep, not 8), numerator and denominator are formed side
// by side, and the quotient takes Ops::divide (on AVX-512 a reciprocal estimate and one fused
// correction).
constexpr double half_expm1_coefficient(int k) {  // 2^(k-1) / k!: H = sum over k >= 1 of c_k h^k
  double c = 0.5;
  for (int i = 1; i <= k; ++i) c *= 2.0 / i;
  return c;
}

template <typename V, typename Ops>
inline V tanh_pd_impl(V x) {
  constexpr auto c = half_expm1_coefficient;
  const V ac = Ops::abs_clamp(x, 20.0);  // min(|x|, 20), NaN kept
  // -m = round(-2|x| / ln2): adding 1.5 * 2^52 in the FMA rounds the exact product to a whole
  // number (two plain operations; a round instruction costs as much and takes one port)
  constexpr double kRound = 6755399441055744.0;
  const V n = Ops::sub(Ops::fma(ac, Ops::set(-2.0 * 1.4426950408889634), Ops::set(kRound)), Ops::set(kRound));
  const V h = Ops::fma(n, Ops::set(0.5 * 0.6931471805599453), ac);  // |x| - m ln2 / 2
  const V h2 = Ops::mul(h, h);
  const V h4 = Ops::mul(h2, h2);
  const V h8 = Ops::mul(h4, h4);
  const auto pair = [&](int k) { return Ops::fma(Ops::set(c(k + 1)), h, Ops::set(c(k))); };
  const V s0 = Ops::fma(pair(4), h2, pair(2));
  const V s1 = Ops::fma(pair(8), h2, pair(6));
  const V q = Ops::fma(Ops::set(c(10)), h8, Ops::fma(s1, h4, s0));
  const V big_h = Ops::fma(h2, q, h);
  const V half_scale = Ops::scale2(Ops::set(0.5), n);  // 2^-m / 2
  const V num = Ops::add(big_h, Ops::sub(Ops::set(0.5), half_scale));
  const V den = Ops::add(big_h, Ops::add(Ops::set(0.5), half_scale));
  return Ops::copysign(Ops::divide(num, den), x);
}

#if defined(KK_AVX512)
struct Pd512 {
  using V = __m512d;
  static constexpr int kLanes = 8;
  // the lower and upper halves of a float vector, widened
  static V low(const FVec& v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
  static V high(const FVec& v) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V set(double v) { return _mm512_set1_pd(v); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  // min(|x|, bound), NaN kept: min() returns its second operand when either is NaN (vrangepd's
  // min-abs would do it in one instruction, but returns the number beside a NaN)
  static V abs_clamp(V x, double bound) { return _mm512_min_pd(_mm512_set1_pd(bound), _mm512_abs_pd(x)); }
  static V scale2(V e, V n) { return _mm512_scalef_pd(e, n); }
  // e / d for d > 0: y0 = rcp14(d) = (1 - u) / d with |u| < 2^-14, and e y0 (1 + u)(1 + u^2)
  // = (e / d)(1 - u^4), u^4 below a double ulp; 3 FMAs deep after the estimate (vdivpd would
  // stall the loop: 16 cycles a vector)
  static V divide(V e, V d) {
    const V y0 = _mm512_rcp14_pd(d);
    const V u = _mm512_fnmadd_pd(d, y0, _mm512_set1_pd(1.0));
    const V q = _mm512_mul_pd(e, y0);
    const V q1 = _mm512_fmadd_pd(q, u, q);
    return _mm512_fmadd_pd(q1, _mm512_mul_pd(u, u), q1);
  }
  static V copysign(V t, V x) {
    const __m512i sign = _mm512_set1_epi64(static_cast<long long>(0x8000000000000000ull));
    return _mm512_castsi512_pd(_mm512_or_si512(
        _mm512_andnot_si512(sign, _mm512_castpd_si512(t)),
        _mm512_and_si512(sign, _mm512_castpd_si512(x))));
  }
};
using Pd = Pd512;
#elif defined(KK_AVX2)
struct Pd256 {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V low(const FVec& v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
  static V high(const FVec& v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V set(double v) { return _mm256_set1_pd(v); }
  static V abs(V x) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), x); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  // min(|x|, bound), NaN kept: min() returns its second operand when either is NaN
  static V abs_clamp(V x, double bound) { return _mm256_min_pd(_mm256_set1_pd(bound), abs(x)); }
  static V scale2(V e, V n) {
    // 2^n by exponent arithmetic: n is an integer in [-58, 0]
    const __m128i ni = _mm256_cvtpd_epi32(n);
    const __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(ni), _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(e, _mm256_castsi256_pd(bits));
  }
  static V divide(V e, V d) { return _mm256_div_pd(e, d); }
  static V copysign(V t, V x) {
    const V sign = _mm256_set1_pd(-0.0);
    return _mm256_or_pd(_mm256_andnot_pd(sign, t), _mm256_and_pd(sign, x));
  }
};
using Pd = Pd256;
#endif
#if defined(KK_AVX512) || defined(KK_AVX2)
inline Pd::V tanh_pd(Pd::V x) { return tanh_pd_impl<Pd::V, Pd>(x); }
#endif

// Per-lane double sums of float vectors: each float term enters a double exactly, and the
// float32 weight-gradient terms are formed in double (a * (b - c), a * b * c), so a float32
// blend's alpha gradient carries no float rounding of its terms; the lanes go into the
// block's Accumulator after.
struct DoubleLanes {
#if defined(KK_AVX512) || defined(KK_AVX2)
  using V = Pd::V;
  V lo = Pd::set(0.0);
  V hi = Pd::set(0.0);
  void add(const FVec& v) {
    lo = Pd::add(lo, Pd::low(v));
    hi = Pd::add(hi, Pd::high(v));
  }
  void add_product_of_difference(const FVec& a, const FVec& b, const FVec& c) {
    lo = Pd::fma(Pd::low(a), Pd::sub(Pd::low(b), Pd::low(c)), lo);
    hi = Pd::fma(Pd::high(a), Pd::sub(Pd::high(b), Pd::high(c)), hi);
  }
  void add_product3(const FVec& a, const FVec& b, const FVec& c) {
    lo = Pd::fma(Pd::mul(Pd::low(a), Pd::low(b)), Pd::low(c), lo);
    hi = Pd::fma(Pd::mul(Pd::high(a), Pd::high(b)), Pd::high(c), hi);
  }
  // a * b * tanh(s - r), s - r and tanh in double
  void add_product_tanh(const FVec& a, const FVec& b, const FVec& s, const FVec& r) {
    lo = Pd::fma(Pd::mul(Pd::low(a), Pd::low(b)), tanh_pd(Pd::sub(Pd::low(s), Pd::low(r))), lo);
    hi = Pd::fma(Pd::mul(Pd::high(a), Pd::high(b)), tanh_pd(Pd::sub(Pd::high(s), Pd::high(r))), hi);
  }
  void flush_into(Accumulator& acc) const {
    double tmp[2 * Pd::kLanes];
    Pd::store(tmp, lo);
    Pd::store(tmp + Pd::kLanes, hi);
    for (double v : tmp) acc.add(v);
  }
#else
  double lane[FVec::size()] = {};
  void add(const FVec& v) {
    float tmp[FVec::size()];
    v.store(tmp);
    for (int64_t k = 0; k < FVec::size(); ++k) lane[k] += static_cast<double>(tmp[k]);
  }
  void add_product_of_difference(const FVec& a, const FVec& b, const FVec& c) {
    float ta[FVec::size()], tb[FVec::size()], tc[FVec::size()];
    a.store(ta);
    b.store(tb);
    c.store(tc);
    for (int64_t k = 0; k < FVec::size(); ++k) {
      lane[k] += static_cast<double>(ta[k]) * (static_cast<double>(tb[k]) - static_cast<double>(tc[k]));
    }
  }
  void add_product3(const FVec& a, const FVec& b, const FVec& c) {
    float ta[FVec::size()], tb[FVec::size()], tc[FVec::size()];
    a.store(ta);
    b.store(tb);
    c.store(tc);
    for (int64_t k = 0; k < FVec::size(); ++k) {
      lane[k] += static_cast<double>(ta[k]) * static_cast<double>(tb[k]) * static_cast<double>(tc[k]);
    }
  }
  void add_product_tanh(const FVec& a, const FVec& b, const FVec& s, const FVec& r) {
    float ta[FVec::size()], tb[FVec::size()], ts[FVec::size()], tr[FVec::size()];
    a.store(ta);
    b.store(tb);
    s.store(ts);
    r.store(tr);
    for (int64_t k = 0; k < FVec::size(); ++k) {
      lane[k] += static_cast<double>(ta[k]) * static_cast<double>(tb[k]) *
                 std::tanh(static_cast<double>(ts[k]) - static_cast<double>(tr[k]));
    }
  }
  void flush_into(Accumulator& acc) const {
    for (int64_t k = 0; k < FVec::size(); ++k) acc.add(lane[k]);
  }
#endif
};

// For half-precision features: float terms summed in float for 64 vector steps at a time,
// then in double. Their rounding is far below the half-precision inputs' own.
struct FloatLanes {
  FVec sum = FVec(0.0f);
  int steps = 0;
  DoubleLanes total;
  void add(const FVec& v) {
    sum = sum + v;
    if (++steps == 64) {
      total.add(sum);
      sum = FVec(0.0f);
      steps = 0;
    }
  }
  void add_product_of_difference(const FVec& a, const FVec& b, const FVec& c) { add(a * (b - c)); }
  void add_product3(const FVec& a, const FVec& b, const FVec& c) { add(a * b * c); }
  void flush_into(Accumulator& acc) {
    total.add(sum);
    total.flush_into(acc);
  }
};

template <typename T>
inline constexpr bool kHalfPrecision = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// x as the host dtype T would hold it (identity for float and double).
template <typename T, typename V>
inline V as_host_value(V x) {
  if constexpr (kHalfPrecision<T>) {
    return static_cast<V>(static_cast<T>(x));
  } else {
    return x;
  }
}

// The tanh table of a half-precision dtype T (aten_tanh.h).
template <typename T>
inline const float* tanh_table() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return tanh_table_bf16();
  } else {
    return tanh_table_f16();
  }
}

// ATen's tanh of a half-precision value, before rounding to T (scalar tails).
template <typename T>
inline float half_tanh(T v) {
  return tanh_table<T>()[half_bits(v)];
}

template <typename W>
inline void load_weight2(const char* p, bool broadcast, FVec& a, FVec& b) {
  if (broadcast) {
    a = b = FVec(*reinterpret_cast<const W*>(p));
  } else {
    load2<W>(reinterpret_cast<const W*>(p), a, b);
  }
}

template <typename X>
inline auto val(const char* p, int64_t stride, int64_t i) {
  return *reinterpret_cast<const X*>(p + i * stride);
}

template <typename X, typename V>
inline void put(char* p, int64_t stride, int64_t i, V v) {
  *reinterpret_cast<X*>(p + i * stride) = static_cast<X>(v);
}

// ---------------------------------------------------------------- lerp (ADD, GATE)
// operands: out(T), h(T), s(S), w(op)
template <typename T, typename S>
auto lerp_forward_loop(bool stream) {
  using op_t = opmath_t<T>;
  constexpr int N = 4;
  return [stream](char** data, const int64_t* st, int64_t n0, int64_t n1) {
        run_rows<N, kVectorizable<T>>(
            data, st, n0, n1, {sizeof(T), sizeof(T), sizeof(S), sizeof(op_t)}, 3,
            [&](std::array<char*, N>& p, int64_t n) -> int64_t {
              if constexpr (kVectorizable<T>) {
                const bool wb = st[3] == 0;
                const bool nt = stream && stream_aligned(p[0]);
                int64_t i = 0;
                if (wb) {
                  // one weight for the row: lerp's branch chosen once, the same fused
                  // multiply-add on the same coefficient and base as lerp() per element
                  const float w = *reinterpret_cast<const float*>(p[3]);
                  const bool small = std::fabs(w) < 0.5f;
                  const FVec coef(small ? w : w - 1.0f);
                  auto row = [&](auto small_tag) {
                    for (; i + kStep <= n; i += kStep) {
                      FVec h0, h1, s0, s1;
                      load2<T>(reinterpret_cast<const T*>(p[1]) + i, h0, h1);
                      load2_as<T, S>(reinterpret_cast<const S*>(p[2]) + i, s0, s1);
                      const FVec y0 = at::vec::fmadd(coef, s0 - h0, decltype(small_tag)::value ? h0 : s0);
                      const FVec y1 = at::vec::fmadd(coef, s1 - h1, decltype(small_tag)::value ? h1 : s1);
                      store2<T>(reinterpret_cast<T*>(p[0]) + i, y0, y1, nt);
                    }
                  };
                  if (small) {
                    row(std::true_type{});
                  } else {
                    row(std::false_type{});
                  }
                  return i;
                }
                for (; i + kStep <= n; i += kStep) {
                  FVec h0, h1, s0, s1, w0, w1;
                  load2<T>(reinterpret_cast<const T*>(p[1]) + i, h0, h1);
                  load2_as<T, S>(reinterpret_cast<const S*>(p[2]) + i, s0, s1);
                  load_weight2<float>(p[3] + (wb ? 0 : i * sizeof(float)), wb, w0, w1);
                  store2<T>(reinterpret_cast<T*>(p[0]) + i, lerp(h0, s0, w0), lerp(h1, s1, w1), nt);
                }
                return i;
              }
              return 0;
            },
            [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
              const op_t h = static_cast<op_t>(val<T>(p[1], s[1], i));
              const op_t sv = as_op<T>(val<S>(p[2], s[2], i));
              const op_t w = val<op_t>(p[3], s[3], i);
              put<T>(p[0], s[0], i, lerp(h, sv, w));
            });
      };
}

// operands: dh(T), ds(S), [dw(op) when kElement], g(T), h(T), s(S), w(op).
// Returns the loop for one block; `acc` collects sum(g * (s - h)) unless kElement.
template <typename T, typename S, bool kElement>
auto lerp_backward_loop(Accumulator& acc, bool stream) {
  using op_t = opmath_t<T>;
  constexpr int E = kElement ? 1 : 0;
  constexpr int N = 6 + E;
  constexpr int G = 2 + E;  // index of g
  return [&acc, stream](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizeof(T);
    sizes[1] = sizeof(S);
    if constexpr (kElement) sizes[2] = -1;  // double terms, scalar loop (the general-weight path)
    sizes[G] = sizeof(T);
    sizes[G + 1] = sizeof(T);
    sizes[G + 2] = sizeof(S);
    sizes[G + 3] = sizeof(op_t);
    run_rows<N, kVectorizable<T>>(
        data, st, n0, n1, sizes, G + 3,
        [&](std::array<char*, N>& p, int64_t n) -> int64_t {
          if constexpr (kVectorizable<T>) {
            const bool wb = st[G + 3] == 0;
            const bool nt = stream && stream_aligned(p[0]) && stream_aligned(p[1]);
            int64_t i = 0;
            std::conditional_t<kHalfPrecision<T>, FloatLanes, DoubleLanes> lanes;
            {
              for (; i + kStep <= n; i += kStep) {
                FVec g0, g1, h0, h1, s0, s1, w0, w1, dh0, dh1, ds0, ds1, dw0, dw1;
                load2<T>(reinterpret_cast<const T*>(p[G]) + i, g0, g1);
                load2<T>(reinterpret_cast<const T*>(p[G + 1]) + i, h0, h1);
                load2_as<T, S>(reinterpret_cast<const S*>(p[G + 2]) + i, s0, s1);
                load_weight2<float>(p[G + 3] + (wb ? 0 : i * sizeof(float)), wb, w0, w1);
                lerp_backward(g0, h0, s0, w0, dh0, ds0, dw0);
                lerp_backward(g1, h1, s1, w1, dh1, ds1, dw1);
                store2<T>(reinterpret_cast<T*>(p[0]) + i, dh0, dh1, nt);
                // the gradient of s.to(T) is rounded to T first (store2<T> rounds anyway)
                if constexpr (!std::is_same_v<S, T>) round_through<T>(ds0, ds1);
                store2<S>(reinterpret_cast<S*>(p[1]) + i, ds0, ds1, nt);
                lanes.add_product_of_difference(g0, s0, h0);
                lanes.add_product_of_difference(g1, s1, h1);
              }
              lanes.flush_into(acc);
            }
            return i;
          }
          return 0;
        },
        [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
          const op_t g = static_cast<op_t>(val<T>(p[G], s[G], i));
          const op_t h = static_cast<op_t>(val<T>(p[G + 1], s[G + 1], i));
          const op_t sv = as_op<T>(val<S>(p[G + 2], s[G + 2], i));
          const op_t w = val<op_t>(p[G + 3], s[G + 3], i);
          op_t dh, ds, dw;
          lerp_backward(g, h, sv, w, dh, ds, dw);
          put<T>(p[0], s[0], i, dh);
          put<S>(p[1], s[1], i, static_cast<T>(ds));
          using ld = long double;
          const ld term = static_cast<ld>(g) * (static_cast<ld>(sv) - static_cast<ld>(h));
          if constexpr (kElement) {
            put<double>(p[2], s[2], i, static_cast<double>(term));
          } else {
            acc.add(term);
          }
        });
  };
}

// The feature gradients alone, when no weight needs its gradient: dh = g*(1-w), ds = g*w
// read only g (3 passes over memory instead of 5).
// operands: dh(T), ds(S), g(T), w(op)
template <typename T, typename S>
auto lerp_feature_grads_loop() {
  using op_t = opmath_t<T>;
  constexpr int N = 4;
  return [](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    run_rows<N, kVectorizable<T>>(
        data, st, n0, n1, {sizeof(T), sizeof(S), sizeof(T), sizeof(op_t)}, 3,
        [&](std::array<char*, N>& p, int64_t n) -> int64_t {
          if constexpr (kVectorizable<T>) {
            const bool wb = st[3] == 0;
            int64_t i = 0;
            for (; i + kStep <= n; i += kStep) {
              FVec g0, g1, w0, w1, dh0, dh1, ds0, ds1, unused0, unused1;
              load2<T>(reinterpret_cast<const T*>(p[2]) + i, g0, g1);
              load_weight2<float>(p[3] + (wb ? 0 : i * sizeof(float)), wb, w0, w1);
              lerp_backward(g0, g0, g0, w0, dh0, ds0, unused0);
              lerp_backward(g1, g1, g1, w1, dh1, ds1, unused1);
              store2<T>(reinterpret_cast<T*>(p[0]) + i, dh0, dh1, false);
              if constexpr (!std::is_same_v<S, T>) round_through<T>(ds0, ds1);
              store2<S>(reinterpret_cast<S*>(p[1]) + i, ds0, ds1, false);
            }
            return i;
          }
          return 0;
        },
        [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
          const op_t g = static_cast<op_t>(val<T>(p[2], s[2], i));
          const op_t w = val<op_t>(p[3], s[3], i);
          op_t dh, ds, unused;
          lerp_backward(g, g, g, w, dh, ds, unused);
          put<T>(p[0], s[0], i, dh);
          put<S>(p[1], s[1], i, static_cast<T>(ds));
        });
  };
}

// ---------------------------------------------------------------- MULTIPLY
// operands: out(T), h(T), s(S), [r(S) unless kRIsH], c(op)
// Half-precision hosts round where the reference's T arithmetic rounds (s - r, tanh, c * t,
// 1 + c * t, the product) and take tanh from ATen's table: the reference's own bits.
template <typename T, typename S, bool kRIsH>
auto multiply_forward_loop(bool stream) {
  using op_t = opmath_t<T>;
  constexpr int N = kRIsH ? 4 : 5;
  constexpr int C = N - 1;
  return [stream](char** data, const int64_t* st, int64_t n0, int64_t n1) {
        std::array<int64_t, N> sizes;
        sizes[0] = sizeof(T);
        sizes[1] = sizeof(T);
        sizes[2] = sizeof(S);
        if constexpr (!kRIsH) sizes[3] = sizeof(S);
        sizes[C] = sizeof(op_t);
        run_rows<N, kVectorizable<T>>(
            data, st, n0, n1, sizes, C,
            [&](std::array<char*, N>& p, int64_t n) -> int64_t {
              if constexpr (kVectorizable<T>) {
                const bool cb = st[C] == 0;
                const bool nt = stream && stream_aligned(p[0]);
                const float* table = nullptr;
                if constexpr (kHalfPrecision<T>) table = tanh_table<T>();
                int64_t i = 0;
                for (; i + kStep <= n; i += kStep) {
                  FVec h0, h1, s0, s1, r0, r1, c0, c1;
                  load2<T>(reinterpret_cast<const T*>(p[1]) + i, h0, h1);
                  load2_as<T, S>(reinterpret_cast<const S*>(p[2]) + i, s0, s1);
                  if constexpr (kRIsH) {
                    r0 = h0;
                    r1 = h1;
                  } else {
                    load2_as<T, S>(reinterpret_cast<const S*>(p[3]) + i, r0, r1);
                  }
                  load_weight2<float>(p[C] + (cb ? 0 : i * sizeof(float)), cb, c0, c1);
                  if constexpr (kHalfPrecision<T>) {
                    FVec d0 = s0 - r0, d1 = s1 - r1;
                    round_through<T>(d0, d1);
                    FVec t0, t1;
                    lookup2<T>(table, d0, d1, t0, t1);
                    round_through<T>(t0, t1);
                    FVec v0 = c0 * t0, v1 = c1 * t1;
                    round_through<T>(v0, v1);
                    v0 = FVec(1.0f) + v0;
                    v1 = FVec(1.0f) + v1;
                    round_through<T>(v0, v1);
                    store2<T>(reinterpret_cast<T*>(p[0]) + i, h0 * v0, h1 * v1, nt);
                  } else {
                    store2<T>(reinterpret_cast<T*>(p[0]) + i, multiply(h0, s0, r0, c0),
                              multiply(h1, s1, r1, c1), nt);
                  }
                }
                return i;
              }
              return 0;
            },
            [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
              const op_t h = static_cast<op_t>(val<T>(p[1], s[1], i));
              const op_t sv = as_op<T>(val<S>(p[2], s[2], i));
              op_t r = h;
              if constexpr (!kRIsH) r = as_op<T>(val<S>(p[3], s[3], i));
              const op_t c = val<op_t>(p[C], s[C], i);
              if constexpr (kHalfPrecision<T>) {
                const op_t t = as_host_value<T>(half_tanh<T>(static_cast<T>(sv - r)));
                const op_t v = as_host_value<T>(op_t(1) + as_host_value<T>(c * t));
                put<T>(p[0], s[0], i, h * v);
              } else if constexpr (std::is_same_v<T, float>) {
                // the scalar tail (a 0-dim call is all tail) in double, rounded once: a lone
                // element is judged against eager's single rounding error, and 1 + c*t can
                // cancel
                put<T>(p[0], s[0], i,
                       multiply<double>(h, sv, r, static_cast<double>(c)));
              } else {
                put<T>(p[0], s[0], i, multiply(h, sv, r, c));
              }
            });
      };
}

// operands: dh(T), ds(S), [dr(S) when kDr], [dc(op) when kElement], g(T), h(T), s(S),
// [r(S) unless kRIsH], c(op). kDr: whether the seed input wants its gradient (dr = -ds).
// `sums`: whether alpha needs its gradient (its terms cost a double tanh per float32 element)
template <typename T, typename S, bool kRIsH, bool kElement, bool kDr = !kRIsH>
auto multiply_backward_loop(Accumulator& acc, bool stream, bool sums) {
  using op_t = opmath_t<T>;
  static_assert(!(kRIsH && kDr), "r is h: its gradient is part of dh");
  constexpr int R = kDr ? 1 : 0;  // dr among the outputs
  constexpr int RI = kRIsH ? 0 : 1;  // r among the inputs
  constexpr int E = kElement ? 1 : 0;
  constexpr int NO = 2 + R + E;  // outputs
  constexpr int N = NO + 4 + RI;
  constexpr int G = NO;
  constexpr int C = N - 1;
  return [&acc, stream, sums](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizeof(T);
    sizes[1] = sizeof(S);
    if constexpr (kDr) sizes[2] = sizeof(S);
    if constexpr (kElement) sizes[2 + R] = -1;  // double terms, scalar loop
    sizes[G] = sizeof(T);
    sizes[G + 1] = sizeof(T);
    sizes[G + 2] = sizeof(S);
    if constexpr (!kRIsH) sizes[G + 3] = sizeof(S);
    sizes[C] = sizeof(op_t);
    run_rows<N, kVectorizable<T>>(
        data, st, n0, n1, sizes, C,
        [&](std::array<char*, N>& p, int64_t n) -> int64_t {
          if constexpr (kVectorizable<T>) {
            const bool cb = st[C] == 0;
            const bool nt = stream && stream_aligned(p[0]) && stream_aligned(p[1]) &&
                            (!kDr || stream_aligned(p[2]));
            int64_t i = 0;
            std::conditional_t<kHalfPrecision<T>, FloatLanes, DoubleLanes> lanes;
            const float* table = nullptr;
            if constexpr (kHalfPrecision<T>) table = tanh_table<T>();
            {
              for (; i + kStep <= n; i += kStep) {
                FVec g0, g1, h0, h1, s0, s1, r0, r1, c0, c1, dh0, dh1, ds0, ds1, dc0, dc1;
                load2<T>(reinterpret_cast<const T*>(p[G]) + i, g0, g1);
                load2<T>(reinterpret_cast<const T*>(p[G + 1]) + i, h0, h1);
                load2_as<T, S>(reinterpret_cast<const S*>(p[G + 2]) + i, s0, s1);
                if constexpr (kRIsH) {
                  r0 = h0;
                  r1 = h1;
                } else {
                  load2_as<T, S>(reinterpret_cast<const S*>(p[G + 3]) + i, r0, r1);
                }
                load_weight2<float>(p[C] + (cb ? 0 : i * sizeof(float)), cb, c0, c1);
                // s - r and its tanh as the reference's autograd sees them: d rounded to T,
                // tanh with ATen's bits where tanh nears saturation (1 - t^2 amplifies any
                // difference there), rounded to T. The alpha term gets tanh of the
                // unrounded d, from the first-order correction t + (1 - t^2) (d - d_T).
                const FVec dx0 = s0 - r0, dx1 = s1 - r1;
                FVec d0 = dx0, d1 = dx1;
                if constexpr (kHalfPrecision<T>) round_through<T>(d0, d1);
                FVec tr0, tr1, sech0, sech1;
                if constexpr (std::is_same_v<T, float>) {
                  // float32: tanh and 1 - tanh^2 from one exp, the latter accurate where tanh
                  // saturates
                  tanh_with_grad(d0, tr0, sech0);
                  tanh_with_grad(d1, tr1, sech1);
                } else {
                  // half precision: d holds a T value, so ATen's tanh of it is a table entry
                  lookup2<T>(table, d0, d1, tr0, tr1);
                }
                FVec t0 = tr0, t1 = tr1;
                if constexpr (kHalfPrecision<T>) {
                  // an infinite d rounds to itself: no correction (inf - inf would be NaN)
                  FVec e0 = dx0 - d0, e1 = dx1 - d1;
                  e0 = FVec::blendv(e0, FVec(0.0f), e0.isnan());
                  e1 = FVec::blendv(e1, FVec(0.0f), e1.isnan());
                  t0 = tr0 + (FVec(1.0f) - tr0 * tr0) * e0;
                  t1 = tr1 + (FVec(1.0f) - tr1 * tr1) * e1;
                }
                FVec tg0 = tr0, tg1 = tr1;
                if constexpr (kHalfPrecision<T>) round_through<T>(tg0, tg1);
                if constexpr (std::is_same_v<T, float>) {
                  multiply_backward_t<kRIsH>(g0, h0, tg0, t0, c0, dh0, ds0, dc0, RoundTo<T>{},
                                             KnownTanhGrad<FVec>{sech0});
                  multiply_backward_t<kRIsH>(g1, h1, tg1, t1, c1, dh1, ds1, dc1, RoundTo<T>{},
                                             KnownTanhGrad<FVec>{sech1});
                } else {
                  multiply_backward_t<kRIsH>(g0, h0, tg0, t0, c0, dh0, ds0, dc0, RoundTo<T>{});
                  multiply_backward_t<kRIsH>(g1, h1, tg1, t1, c1, dh1, ds1, dc1, RoundTo<T>{});
                }
                // ds is rounded to T already, and so is dh unless r is h (dh - ds)
                if constexpr (kRIsH) {
                  store2<T>(reinterpret_cast<T*>(p[0]) + i, dh0, dh1, nt);
                } else {
                  store2_exact<T>(reinterpret_cast<T*>(p[0]) + i, dh0, dh1, nt);
                }
                if constexpr (kDr && std::is_same_v<S, T> && kHalfPrecision<T>) {
                  // dr = -ds: ds's 16-bit patterns with the sign flipped (rounding -ds gives
                  // exactly that), not a second conversion
                  store2_negated<T>(reinterpret_cast<T*>(p[1]) + i, reinterpret_cast<T*>(p[2]) + i,
                                    ds0, ds1, nt);
                } else {
                  // ds holds a T value, exact in S (T itself, or float)
                  store2_exact<S>(reinterpret_cast<S*>(p[1]) + i, ds0, ds1, nt);
                  if constexpr (kDr) {
                    store2<S>(reinterpret_cast<S*>(p[2]) + i, ds0.neg(), ds1.neg(), nt);
                  }
                }
                if (sums) {
                  if constexpr (std::is_same_v<T, float>) {
                    lanes.add_product_tanh(g0, h0, s0, r0);
                    lanes.add_product_tanh(g1, h1, s1, r1);
                  } else {
                    lanes.add_product3(g0, h0, t0);
                    lanes.add_product3(g1, h1, t1);
                  }
                }
              }
              lanes.flush_into(acc);
            }
            return i;
          }
          return 0;
        },
        [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
          const op_t g = static_cast<op_t>(val<T>(p[G], s[G], i));
          const op_t h = static_cast<op_t>(val<T>(p[G + 1], s[G + 1], i));
          const op_t sv = as_op<T>(val<S>(p[G + 2], s[G + 2], i));
          op_t r = h;
          if constexpr (!kRIsH) r = as_op<T>(val<S>(p[G + 3], s[G + 3], i));
          const op_t c = val<op_t>(p[C], s[C], i);
          const op_t dx = sv - r;
          const op_t d = as_host_value<T>(dx);
          op_t tr, sech2 = 0;
          if constexpr (std::is_same_v<T, float>) {
            tanh_with_grad(d, tr, sech2);
          } else if constexpr (kHalfPrecision<T>) {
            tr = half_tanh<T>(static_cast<T>(d));
          } else {
            tr = std::tanh(d);
          }
          const op_t e = std::isnan(dx - d) ? op_t(0) : dx - d;
          const op_t t = kHalfPrecision<T> ? tr + (op_t(1) - tr * tr) * e : tr;
          op_t dh, ds, dc;
          if constexpr (std::is_same_v<T, float>) {
            multiply_backward_t<kRIsH>(g, h, tr, t, c, dh, ds, dc, RoundTo<T>{},
                                       KnownTanhGrad<float>{sech2});
          } else {
            multiply_backward_t<kRIsH>(g, h, as_host_value<T>(tr), t, c, dh, ds, dc, RoundTo<T>{});
          }
          put<T>(p[0], s[0], i, dh);
          put<S>(p[1], s[1], i, ds);  // ds holds a T value (multiply_backward_t rounded it)
          if constexpr (kDr) put<S>(p[2], s[2], i, -ds);
          if (!sums && !kElement) return;
          using ld = long double;
          // float32: s - r and tanh in double, as the vector path (tanh_pd)
          const ld t_term = std::is_same_v<T, float>
                                ? static_cast<ld>(std::tanh(static_cast<double>(sv) - static_cast<double>(r)))
                                : static_cast<ld>(t);
          const ld term = static_cast<ld>(g) * static_cast<ld>(h) * t_term;
          if constexpr (kElement) {
            put<double>(p[2 + R], s[2 + R], i, static_cast<double>(term));
          } else {
            acc.add(term);
          }
        });
  };
}

// ---------------------------------------------------------------- STE
// operands: out(T), h(T), s(S)
template <typename T, typename S>
auto ste_forward_loop() {
  using op_t = opmath_t<T>;
  constexpr int N = 3;
  return [](char** data, const int64_t* st, int64_t n0, int64_t n1) {
        run_rows<N, kVectorizable<T>>(
            data, st, n0, n1, {sizeof(T), sizeof(T), sizeof(S)}, -1,
            [&](std::array<char*, N>& p, int64_t n) -> int64_t {
              if constexpr (kVectorizable<T>) {
                int64_t i = 0;
                for (; i + kStep <= n; i += kStep) {
                  FVec h0, h1, s0, s1;
                  load2<T>(reinterpret_cast<const T*>(p[1]) + i, h0, h1);
                  load2_as<T, S>(reinterpret_cast<const S*>(p[2]) + i, s0, s1);
                  store2<T>(reinterpret_cast<T*>(p[0]) + i, ste(h0, s0), ste(h1, s1));
                }
                return i;
              }
              return 0;
            },
            [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
              const op_t h = static_cast<op_t>(val<T>(p[1], s[1], i));
              const op_t sv = as_op<T>(val<S>(p[2], s[2], i));
              put<T>(p[0], s[0], i, ste(h, sv));
            });
      };
}

// ---------------------------------------------------------------- valve multiplier
// tanh(m) as the reference computes it in m's dtype: the float32 kernels' one tanh
// (tanh_with_grad) for float32, ATen's own bits (tables) for the half types.
template <typename M, typename V>
inline V valve_tanh(V m) {
  if constexpr (std::is_same_v<M, float>) {
    return static_cast<V>(tanh_from_exp(static_cast<float>(m)));
  } else if constexpr (kHalfPrecision<M>) {
    return static_cast<V>(half_tanh<M>(static_cast<M>(m)));
  } else {
    return Prims<V>::tanh(m);
  }
}

// 1 + c * tanh(m): U is the result dtype, M the dtype of m (tanh is rounded to M, as the
// reference computes it in m's dtype before promoting; a half-precision U rounds c * t too).
// operands: out(U), m(M), c(op)
template <typename U, typename M>
auto valve_forward_loop(bool stream) {
  using op_t = opmath_t<U>;
  constexpr int N = 3;
  return [stream](char** data, const int64_t* st, int64_t n0, int64_t n1) {
        run_rows<N, kVectorizable<U>>(
            data, st, n0, n1, {sizeof(U), sizeof(M), sizeof(op_t)}, 2,
            [&](std::array<char*, N>& p, int64_t n) -> int64_t {
              if constexpr (kVectorizable<U>) {
                const bool cb = st[2] == 0;
                const bool nt = stream && stream_aligned(p[0]);
                const float* table = nullptr;
                if constexpr (kHalfPrecision<M>) table = tanh_table<M>();
                int64_t i = 0;
                for (; i + kStep <= n; i += kStep) {
                  FVec c0, c1;
                  load_weight2<float>(p[2] + (cb ? 0 : i * sizeof(float)), cb, c0, c1);
                  FVec t0, t1;
                  if constexpr (std::is_same_v<M, float>) {
                    const float* mp = reinterpret_cast<const float*>(p[1]) + i;
                    t0 = tanh_from_exp(FVec::loadu(mp));
                    t1 = tanh_from_exp(FVec::loadu(mp + FVec::size()));
                  } else {
                    // ATen's half-precision tanh (Sleef on the widened value), from the table
                    lookup2_mem<M>(table, reinterpret_cast<const M*>(p[1]) + i, t0, t1);
                  }
                  round_through<M>(t0, t1);
                  FVec v0 = c0 * t0, v1 = c1 * t1;
                  round_through<U>(v0, v1);
                  store2<U>(reinterpret_cast<U*>(p[0]) + i, FVec(1.0f) + v0, FVec(1.0f) + v1, nt);
                }
                return i;
              }
              return 0;
            },
            [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
              const auto m = static_cast<opmath_t<M>>(val<M>(p[1], s[1], i));
              const op_t t = static_cast<op_t>(static_cast<M>(valve_tanh<M>(m)));
              const op_t c = val<op_t>(p[2], s[2], i);
              put<U>(p[0], s[0], i, op_t(1) + as_host_value<U>(c * t));
            });
      };
}

// operands: dm(M), [dc(op) when kElement], g(U), m(M), c(op)
// `sums`: whether alpha needs its gradient (its terms cost a double tanh per float32 element)
template <typename U, typename M, bool kElement>
auto valve_backward_loop(Accumulator& acc, bool stream, bool sums) {
  using op_t = opmath_t<U>;
  constexpr int E = kElement ? 1 : 0;
  constexpr int N = 4 + E;
  constexpr int G = 1 + E;
  return [&acc, stream, sums](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizeof(M);
    if constexpr (kElement) sizes[1] = -1;  // double terms, scalar loop
    sizes[G] = sizeof(U);
    sizes[G + 1] = sizeof(M);
    sizes[G + 2] = sizeof(op_t);
    run_rows<N, kVectorizable<U> && kVectorizable<M>>(
        data, st, n0, n1, sizes, G + 2,
        [&](std::array<char*, N>& p, int64_t n) -> int64_t {
          if constexpr (kVectorizable<U> && kVectorizable<M>) {
            const bool cb = st[G + 2] == 0;
            const bool nt = stream && stream_aligned(p[0]);
            int64_t i = 0;
            std::conditional_t<kHalfPrecision<U>, FloatLanes, DoubleLanes> lanes;
            const float* table = nullptr;
            if constexpr (kHalfPrecision<M>) table = tanh_table<M>();
            {
              for (; i + kStep <= n; i += kStep) {
                FVec g0, g1, c0, c1, dm0, dm1, dc0, dc1;
                load2<U>(reinterpret_cast<const U*>(p[G]) + i, g0, g1);
                load_weight2<float>(p[G + 2] + (cb ? 0 : i * sizeof(float)), cb, c0, c1);
                FVec t0, t1;
                if constexpr (std::is_same_v<M, float>) {
                  // tanh and 1 - tanh^2 from one exp, the latter accurate where tanh saturates
                  const float* mp = reinterpret_cast<const float*>(p[G + 1]) + i;
                  FVec sech0, sech1;
                  tanh_with_grad(FVec::loadu(mp), t0, sech0);
                  tanh_with_grad(FVec::loadu(mp + FVec::size()), t1, sech1);
                  valve_backward(g0, c0, t0, t0, dm0, dc0, RoundTo<M>{}, KnownTanhGrad<FVec>{sech0});
                  valve_backward(g1, c1, t1, t1, dm1, dc1, RoundTo<M>{}, KnownTanhGrad<FVec>{sech1});
                } else {
                  lookup2_mem<M>(table, reinterpret_cast<const M*>(p[G + 1]) + i, t0, t1);
                  FVec tg0 = t0, tg1 = t1;
                  round_through<M>(tg0, tg1);
                  valve_backward(g0, c0, tg0, t0, dm0, dc0, RoundTo<M>{});
                  valve_backward(g1, c1, tg1, t1, dm1, dc1, RoundTo<M>{});
                }
                store2<M>(reinterpret_cast<M*>(p[0]) + i, dm0, dm1, nt);
                if (sums) {
                  if constexpr (std::is_same_v<M, float> && !kHalfPrecision<U>) {
                    const float* mp = reinterpret_cast<const float*>(p[G + 1]) + i;
                    lanes.add_product_tanh(g0, FVec(1.0f), FVec::loadu(mp), FVec(0.0f));
                    lanes.add_product_tanh(g1, FVec(1.0f), FVec::loadu(mp + FVec::size()), FVec(0.0f));
                  } else {
                    lanes.add_product3(g0, t0, FVec(1.0f));
                    lanes.add_product3(g1, t1, FVec(1.0f));
                  }
                }
              }
              lanes.flush_into(acc);
            }
            return i;
          }
          return 0;
        },
        [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
          const op_t g = static_cast<op_t>(val<U>(p[G], s[G], i));
          const auto m = static_cast<opmath_t<M>>(val<M>(p[G + 1], s[G + 1], i));
          const op_t c = val<op_t>(p[G + 2], s[G + 2], i);
          op_t dm, dc;
          auto t = valve_tanh<M>(m);
          if constexpr (std::is_same_v<M, float>) {
            float sech2;
            tanh_with_grad(static_cast<float>(m), t, sech2);
            valve_backward(g, c, t, t, dm, dc, RoundTo<M>{}, KnownTanhGrad<float>{sech2});
          } else {
            valve_backward(g, c, static_cast<op_t>(static_cast<M>(t)), static_cast<op_t>(t), dm,
                           dc, RoundTo<M>{});
          }
          put<M>(p[0], s[0], i, dm);
          if (!sums && !kElement) return;
          // float32 m: tanh in double, as the vector path (tanh_pd)
          const long double t_term = std::is_same_v<M, float> && !kHalfPrecision<U>
                                         ? static_cast<long double>(std::tanh(static_cast<double>(m)))
                                         : static_cast<long double>(t);
          const long double term = static_cast<long double>(g) * t_term;
          if constexpr (kElement) {
            put<double>(p[1], s[1], i, static_cast<double>(term));
          } else {
            acc.add(term);
          }
        });
  };
}

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
