// TensorIterator loop bodies of the blend family (lerp for ADD/GATE, MULTIPLY, STE and the
// valve multiplier), forward and backward, templated on the feature dtype T and the seed's
// dtype S (T itself, or float beside a bfloat16/float16 host). Math comes from
// kernels/blend_math.h; these files only move data and round once. A vector step handles two
// float vectors (F2), each formula once per vector.
#pragma once

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>

#include "cpu/loops.h"
#include "cpu/vec_io.h"

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

constexpr int64_t kGrain = 32768;

// Float32 blends sum their weight-gradient terms in DLanes (vec_io.h), formed in double: an
// alpha gradient carries no float rounding of its terms. Half-precision features use
// FloatLanes: float terms summed in float for 64 vector steps at a time, then in double; their
// rounding is far below the half-precision inputs' own. The lanes go into the block's
// Accumulator after.
struct FloatLanes {
  FVec sum = FVec(0.0f);
  int steps = 0;
  DLanes total;
  template <typename Term, typename... V>
  void add(Term term, const V&... v) {
    sum = sum + term(v...);
    if (++steps == 64) {
      total.add(sum);
      sum = FVec(0.0f);
      steps = 0;
    }
  }
  void flush_into(Accumulator& acc) {
    total.add(sum);
    total.flush_into(acc);
  }
};

template <typename T>
using Lanes = std::conditional_t<kHalfPrecision<T>, FloatLanes, DLanes>;

// Lanes that keep each term, formed as Lanes<T> forms it, instead of summing it: as double at
// `out`, which each add advances by one float vector. For a weight of any other shape than one
// value or one per sample (run_pass sums the terms to the weight's shape).
template <typename T>
struct ElementTerms {
  double* out = nullptr;
  template <typename Term, typename... V>
  void add(Term term, const V&... v) {
    DVec lo, hi;
    if constexpr (kHalfPrecision<T>) {
      widen(term(v...), lo, hi);
    } else {
      std::tie(lo, hi) = DLanes::terms(term, v...);
    }
    lo.store(out);
    hi.store(out + DVec::size());
    out += FVec::size();
  }
  void flush_into(Accumulator&) {}
};

// Lanes<T>, or ElementTerms<T> where the terms are kept (kElement)
template <typename T, bool kElement>
using TermLanes = std::conditional_t<kElement, ElementTerms<T>, Lanes<T>>;

// x as the host dtype T would hold it (identity for float and double).
template <typename T, typename V>
inline V as_host_value(V x) {
  if constexpr (kHalfPrecision<T>) {
    return static_cast<V>(static_cast<T>(x));
  } else {
    return x;
  }
}

// |d| above which the reference's tanh of d rounded to the half-precision T is +-1: the float
// below blend_math.h's threshold (a strict comparison keeps NaN out of the saturated lanes).
template <typename T>
inline constexpr float kTanhSaturatesAbove = std::bit_cast<float>(
    std::bit_cast<uint32_t>(std::is_same_v<T, c10::BFloat16> ? kBFloat16TanhSaturates
                                                              : kFloat16TanhSaturates) - 1);

// tanh of d = s - r in float for a half-precision host T, and 1 - t^2, with +-1 and exactly 0
// where the reference's tanh saturates: 1 + c*t and 1 - t^2 vanish where the reference's do,
// and an infinite factor beside them gives NaN as there. NaN stays NaN. Made for 16-bit
// outputs (half_precision_tanh is up to 8e-7 off): alpha's float32 gradient terms take
// tanh_with_grad's tanh instead. V: float or FVec.
template <typename T, typename V>
inline void half_precision_tanh_with_grad(const V& d, V& t, V& one_minus_t2) {
  using P = Prims<V>;
  const V near = half_precision_tanh(d);
  const auto saturated = P::lt(V(kTanhSaturatesAbove<T>), P::abs(d));
  t = P::select(saturated, P::select(P::lt(d, V(0.0f)), V(-1.0f), V(1.0f)), near);
  one_minus_t2 = P::select(saturated, V(0.0f), P::fnma(near, near, V(1.0f)));
}

// float64 tanh and 1 - tanh^2 from a long double tanh (a double library tanh can be more
// than an ulp off, and 1 - t^2 of a rounded t cancels): kept in long double, or each rounded
// to double once. ATen's CPU saturation: +-1 above kDoubleTanhBelowOne and at most 1 - 2^-53
// in magnitude below it as a double, so 1 - t^2 and 1 - |t| vanish where the reference's do.
constexpr double kDoubleTanhBelowOne = 19.06154746546846;  // ATen's tanh is 1 from the next double

// x may be wider than a double: MULTIPLY's s - r is exact in long double, where rounding it to
// double (as the reference does) costs up to about 2|t| ulp in 1 - t^2; the saturation is
// decided on that rounding, as the reference's.
inline void wide_tanh_with_grad(long double x, long double& t, long double& one_minus_t2) {
  if (std::fabs(static_cast<double>(x)) > kDoubleTanhBelowOne) {
    t = std::copysign(1.0, x);
    one_minus_t2 = 0.0L;
    return;
  }
  t = tanhl(x);
  one_minus_t2 = (1.0L - t) * (1.0L + t);
}

inline void reference_tanh_with_grad(double x, double& t, double& one_minus_t2) {
  long double wide_t, wide_grad;
  wide_tanh_with_grad(x, wide_t, wide_grad);
  t = static_cast<double>(wide_t);
  if (std::fabs(t) == 1.0 && std::fabs(x) <= kDoubleTanhBelowOne) t = std::copysign(1.0 - 0x1p-53, t);
  one_minus_t2 = static_cast<double>(wide_grad);
}

// The type a scalar path forms one weight-gradient term in, before it is rounded to double for
// the sum: long double for float64 features (the term then carries one rounding, as their
// other outputs do), double otherwise (exact for the products of float values).
template <typename T>
using term_t = std::conditional_t<std::is_same_v<T, double>, long double, double>;

// Rounds nothing: the float64 scalar paths compute in long double and round each output once.
struct Unrounded {
  template <typename V>
  V operator()(V x) const {
    return x;
  }
};

// The float32 scalar tail's tanh of s - r, in double: +-1 exactly where the float32
// reference's tanh of the float32 difference is (tanh_with_grad's kFloatTanhBelowOne).
inline double float_tail_tanh(float s, float r) {
  const float d = s - r;
  if (std::fabs(d) > kFloatTanhBelowOne) return std::copysign(1.0, d);
  return std::tanh(static_cast<double>(s) - static_cast<double>(r));
}

// One step of a float weight operand: broadcast (stride 0) or contiguous.
inline void load_weight2(const char* p, int64_t stride, int64_t i, F2& v) {
  if (stride == 0) {
    v[0] = v[1] = FVec(*reinterpret_cast<const float*>(p));
  } else {
    load2<float>(reinterpret_cast<const float*>(p) + i, v);
  }
}

template <typename X>
inline const X* at_(char* p, int64_t i) {
  return reinterpret_cast<const X*>(p) + i;
}

template <typename X>
inline X* out_(char* p, int64_t i) {
  return reinterpret_cast<X*>(p) + i;
}

template <typename X>
inline auto val(const char* p, int64_t stride, int64_t i) {
  return *reinterpret_cast<const X*>(p + i * stride);
}

template <typename X, typename V>
inline void put(char* p, int64_t stride, int64_t i, V v) {
  *reinterpret_cast<X*>(p + i * stride) = static_cast<X>(v);
}

// Whether output k is streamed: chosen in `mask`, and aligned.
inline bool streams(StreamMask mask, int k, const char* p) {
  return ((mask >> k) & 1u) != 0 && stream_aligned(p);
}

// How a float32 backward forms alpha's gradient terms: not at all (alpha wants no gradient),
// from the float tanh its elementwise gradients use, or from ATen's double tanh
// (Vectorized<double>, within an ulp of double). Float terms are within a few units of float
// roundoff each, so a sum of n of them is off by at most a few units times the sum of their
// magnitudes: inside rule 2's slack of sqrt(n) float32 units (docs/semantics.md#equivalence)
// once n reaches kFloatTermsMin. Smaller sums take the double tanh, and so does a float64
// alpha: its gradient is judged in float64, where that slack is 2^29 times smaller. 16-bit
// hosts always form their terms from tanh_with_grad's float tanh.
enum class Terms { kNone, kFloatTanh, kDoubleTanh };
constexpr int64_t kFloatTermsMin = 64;

inline Terms alpha_terms(bool needed, int64_t numel, const at::Tensor& alpha) {
  if (!needed) return Terms::kNone;
  const bool float_slack = alpha.scalar_type() != at::kDouble &&
                           numel >= kFloatTermsMin * std::max<int64_t>(alpha.numel(), 1);
  return float_slack ? Terms::kFloatTanh : Terms::kDoubleTanh;
}

// vector_loop(std::integral_constant<Terms, ...>): one loop each, since the terms' double
// tanh, even when skipped at run time, would crowd the other loops' registers.
template <typename Loop>
void split_on_terms(Terms terms, Loop&& vector_loop) {
  switch (terms) {
    case Terms::kNone: return vector_loop(std::integral_constant<Terms, Terms::kNone>{});
    case Terms::kFloatTanh: return vector_loop(std::integral_constant<Terms, Terms::kFloatTanh>{});
    case Terms::kDoubleTanh: return vector_loop(std::integral_constant<Terms, Terms::kDoubleTanh>{});
  }
}

// ---------------------------------------------------------------- lerp (ADD, GATE)
// operands: out(T), h(T), s(S), w(op)
template <typename T, typename S>
auto lerp_forward_loop(StreamMask stream) {
  using op_t = opmath_t<T>;
  constexpr int N = 4;
  return [stream](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    run_rows<N, kVectorizable<T>>(
        data, st, n0, n1, {sizeof(T), sizeof(T), sizeof(S), sizeof(op_t)}, 3,
        [&](auto& p, int64_t n, TilePrefetch* prefetch) -> int64_t {
          const bool nt = streams(stream, 0, p[0]);
          int64_t i = 0;
          // a broadcast weight: lerp's branch chosen once for the row, the same fused
          // multiply-add on the same coefficient and base as lerp() per element
          const float w = *reinterpret_cast<const float*>(p[3]);
          const bool small = std::fabs(w) < 0.5f;
          const auto row = [&](auto broadcast, auto small_tag) {
            const FVec coef(small ? w : w - 1.0f);
            for (; i + kStep <= n; i += kStep) {
              F2 h, s, y, wv;
              load2<T>(at_<T>(p[1], i), h);
              load2_as<T, S>(at_<S>(p[2], i), s);
              if constexpr (!decltype(broadcast)::value) load_weight2(p[3], st[3], i, wv);
              for (int k = 0; k < 2; ++k) {
                if constexpr (decltype(broadcast)::value) {
                  y[k] = at::vec::fmadd(coef, s[k] - h[k], decltype(small_tag)::value ? h[k] : s[k]);
                } else {
                  y[k] = lerp(h[k], s[k], wv[k]);
                }
              }
              store2<T>(out_<T>(p[0], i), y, nt);
              if (prefetch) prefetch->step();
            }
          };
          if (st[3] != 0) {
            row(std::false_type{}, std::false_type{});
          } else if (small) {
            row(std::true_type{}, std::true_type{});
          } else {
            row(std::true_type{}, std::false_type{});
          }
          return i;
        },
        [&](auto& p, const int64_t* s, int64_t i) {
          const op_t h = static_cast<op_t>(val<T>(p[1], s[1], i));
          const op_t sv = as_op<T>(val<S>(p[2], s[2], i));
          put<T>(p[0], s[0], i, lerp(h, sv, val<op_t>(p[3], s[3], i)));
        });
  };
}

// operands: dh(T), ds(S), [dw(op) when kElement], g(T), h(T), s(S), w(op); without kSums,
// dh(T), ds(S), g(T), w(op): the feature gradients alone read only g.
// `acc` collects sum(g * (s - h)) when kSums and not kElement.
template <typename T, typename S, bool kElement, bool kSums = true>
auto lerp_backward_loop(Accumulator& acc, StreamMask stream) {
  using op_t = opmath_t<T>;
  constexpr int E = kElement ? 1 : 0;
  constexpr int G = 2 + E;  // index of g
  constexpr int W = kSums ? G + 3 : G + 1;  // index of w
  constexpr int N = W + 1;
  return [&acc, stream](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizeof(T);
    sizes[1] = sizeof(S);
    if constexpr (kElement) sizes[2] = sizeof(double);
    sizes[G] = sizeof(T);
    if constexpr (kSums) {
      sizes[G + 1] = sizeof(T);
      sizes[G + 2] = sizeof(S);
    }
    sizes[W] = sizeof(op_t);
    run_rows<N, kVectorizable<T>>(
        data, st, n0, n1, sizes, W,
        [&](auto& p, int64_t n, TilePrefetch* prefetch) -> int64_t {
          const bool nt_dh = streams(stream, 0, p[0]), nt_ds = streams(stream, 1, p[1]);
          int64_t i = 0;
          TermLanes<T, kElement> lanes;
          for (; i + kStep <= n; i += kStep) {
            if constexpr (kElement) lanes.out = out_<double>(p[2], i);
            F2 g, h, s, w, dh, ds, unused;
            load2<T>(at_<T>(p[G], i), g);
            if constexpr (kSums) {
              load2<T>(at_<T>(p[G + 1], i), h);
              load2_as<T, S>(at_<S>(p[G + 2], i), s);
            }
            load_weight2(p[W], st[W], i, w);
            for (int k = 0; k < 2; ++k) {
              lerp_backward(g[k], g[k], g[k], w[k], dh[k], ds[k], unused[k]);
              // the gradient of s.to(T) is rounded to T first (store2<T> rounds anyway)
              if constexpr (!std::is_same_v<S, T>) ds[k] = rounded<T>(ds[k]);
              if constexpr (kSums) {
                lanes.add([](const auto& a, const auto& b, const auto& c) { return a * (b - c); },
                          g[k], s[k], h[k]);
              }
            }
            store2<T>(out_<T>(p[0], i), dh, nt_dh);
            store2<S>(out_<S>(p[1], i), ds, nt_ds);
            if (prefetch) prefetch->step();
          }
          if constexpr (kSums) lanes.flush_into(acc);
          return i;
        },
        [&](auto& p, const int64_t* s, int64_t i) {
          const op_t g = static_cast<op_t>(val<T>(p[G], s[G], i));
          op_t dh, ds, unused;
          lerp_backward(g, g, g, val<op_t>(p[W], s[W], i), dh, ds, unused);
          put<T>(p[0], s[0], i, dh);
          put<S>(p[1], s[1], i, static_cast<T>(ds));
          if constexpr (kSums) {
            const op_t h = static_cast<op_t>(val<T>(p[G + 1], s[G + 1], i));
            const op_t sv = as_op<T>(val<S>(p[G + 2], s[G + 2], i));
            using W = term_t<T>;
            const double term = static_cast<double>(W(g) * (W(sv) - W(h)));
            if constexpr (kElement) {
              put<double>(p[2], s[2], i, term);
            } else {
              acc.add(term);
            }
          }
        });
  };
}

// ---------------------------------------------------------------- MULTIPLY
// operands: out(T), [z(T) when kTanh], h(T), s(S), [r(S) unless kRIsH], c(op)
// Half-precision hosts compute in float with half_precision_tanh and round once. kTanh (float
// hosts): the tanh's complement z (tanh_with_grad) is written beside the value, for the
// backward to read (multiply_backward_from_tanh_loop) instead of evaluating tanh and reading s
// and r again.
template <typename T, typename S, bool kRIsH, bool kTanh = false>
auto multiply_forward_loop(StreamMask stream) {
  using op_t = opmath_t<T>;
  static_assert(!kTanh || std::is_same_v<T, float>, "the tanh is kept for float hosts");
  constexpr int H = kTanh ? 2 : 1;  // outputs, then h
  constexpr int N = H + (kRIsH ? 3 : 4);
  constexpr int C = N - 1;
  return [stream](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizes[H] = sizeof(T);
    if constexpr (kTanh) sizes[1] = sizeof(T);
    sizes[H + 1] = sizeof(S);
    if constexpr (!kRIsH) sizes[H + 2] = sizeof(S);
    sizes[C] = sizeof(op_t);
    run_rows<N, kVectorizable<T>>(
        data, st, n0, n1, sizes, C,
        [&](auto& p, int64_t n, TilePrefetch* prefetch) -> int64_t {
          const bool nt = streams(stream, 0, p[0]), nt_z = kTanh && streams(stream, 1, p[1]);
          int64_t i = 0;
          for (; i + kStep <= n; i += kStep) {
            F2 h, s, r, c, y, t, z;
            load2<T>(at_<T>(p[H], i), h);
            load2_as<T, S>(at_<S>(p[H + 1], i), s);
            if constexpr (kRIsH) {
              r[0] = h[0];
              r[1] = h[1];
            } else {
              load2_as<T, S>(at_<S>(p[H + 2], i), r);
            }
            load_weight2(p[C], st[C], i, c);
            for (int k = 0; k < 2; ++k) {
              if constexpr (kHalfPrecision<T>) {
                FVec unused;
                half_precision_tanh_with_grad<T>(s[k] - r[k], t[k], unused);
              } else if constexpr (kTanh) {
                FVec unused;
                tanh_with_grad(s[k] - r[k], t[k], unused, z[k]);
              } else {
                t[k] = Prims<FVec>::tanh(s[k] - r[k]);
              }
              y[k] = h[k] * valve(c[k], t[k]);
            }
            store2<T>(out_<T>(p[0], i), y, nt);
            if constexpr (kTanh) store2<T>(out_<T>(p[1], i), z, nt_z);
            if (prefetch) prefetch->step();
          }
          return i;
        },
        [&](auto& p, const int64_t* s, int64_t i) {
          const op_t h = static_cast<op_t>(val<T>(p[H], s[H], i));
          const op_t sv = as_op<T>(val<S>(p[H + 1], s[H + 1], i));
          op_t r = h;
          if constexpr (!kRIsH) r = as_op<T>(val<S>(p[H + 2], s[H + 2], i));
          const op_t c = val<op_t>(p[C], s[C], i);
          if constexpr (kHalfPrecision<T>) {
            float t, unused;
            half_precision_tanh_with_grad<T>(sv - r, t, unused);
            put<T>(p[0], s[0], i, h * valve(c, t));
          } else if constexpr (std::is_same_v<T, float>) {
            // the scalar tail (a 0-dim call is all tail) in double, rounded once: a lone
            // element is judged against eager's single rounding error, and 1 + c*t can cancel
            const double t = float_tail_tanh(sv, r);
            put<T>(p[0], s[0], i, static_cast<double>(h) * valve(static_cast<double>(c), t));
            if constexpr (kTanh) {
              float t_float, unused, z;
              tanh_with_grad(sv - r, t_float, unused, z);
              put<T>(p[1], s[1], i, z);
            }
          } else {  // float64: in long double, rounded once
            long double t, unused;
            wide_tanh_with_grad(static_cast<long double>(sv) - r, t, unused);
            put<T>(p[0], s[0], i, static_cast<double>(static_cast<long double>(h) * (1.0L + c * t)));
          }
        });
  };
}

// The backward from the forward's tanh complement z (float hosts, alpha wanting no gradient):
// dh = g (1 + c t), ds = g h c (1 - t^2), t and 1 - t^2 from z (tanh_from_complement); when r
// is h, dh also carries -ds.
// operands: dh, ds, [dr when kDr], g, h, z, c (all float)
template <bool kRIsH, bool kDr>
auto multiply_backward_from_tanh_loop(StreamMask stream) {
  using T = float;
  constexpr int G = kDr ? 3 : 2;  // outputs, then g
  constexpr int N = G + 4;
  constexpr int C = N - 1;
  return [stream](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes.fill(sizeof(T));
    run_rows<N, kVectorizable<T>>(
        data, st, n0, n1, sizes, C,
        [&](auto& p, int64_t n, TilePrefetch* prefetch) -> int64_t {
          const bool nt_dh = streams(stream, 0, p[0]), nt_ds = streams(stream, 1, p[1]);
          const bool nt_dr = kDr && streams(stream, 2, p[2]);
          int64_t i = 0;
          for (; i + kStep <= n; i += kStep) {
            F2 g, h, z, c, dh, ds, unused;
            load2<T>(at_<T>(p[G], i), g);
            load2<T>(at_<T>(p[G + 1], i), h);
            load2<T>(at_<T>(p[G + 2], i), z);
            load_weight2(p[C], st[C], i, c);
            for (int k = 0; k < 2; ++k) {
              FVec t, sech;
              tanh_from_complement(z[k], t, sech);
              multiply_backward_t<kRIsH>(g[k], h[k], t, t, c[k], dh[k], ds[k], unused[k],
                                         RoundTo<T>{}, KnownTanhGrad<FVec>{sech});
            }
            store2<T>(out_<T>(p[0], i), dh, nt_dh);
            store2<T>(out_<T>(p[1], i), ds, nt_ds);
            if constexpr (kDr) store2<T>(out_<T>(p[2], i), ds[0].neg(), ds[1].neg(), nt_dr);
            if (prefetch) prefetch->step();
          }
          return i;
        },
        [&](auto& p, const int64_t* s, int64_t i) {
          T t, sech, dh, ds, unused;
          tanh_from_complement(val<T>(p[G + 2], s[G + 2], i), t, sech);
          multiply_backward_t<kRIsH>(val<T>(p[G], s[G], i), val<T>(p[G + 1], s[G + 1], i), t, t,
                                     val<T>(p[C], s[C], i), dh, ds, unused, RoundTo<T>{},
                                     KnownTanhGrad<T>{sech});
          put<T>(p[0], s[0], i, dh);
          put<T>(p[1], s[1], i, ds);
          if constexpr (kDr) put<T>(p[2], s[2], i, -ds);
        });
  };
}

// operands: dh(T), ds(S), [dr(S) when kDr], [dc(op) when kElement], g(T), h(T), s(S),
// [r(S) unless kRIsH], c(op). kDr: whether the seed input wants its gradient (dr = -ds).
// `terms`: how alpha's gradient terms are formed (alpha_terms); kElement loops never get kNone
template <typename T, typename S, bool kRIsH, bool kElement, bool kDr = !kRIsH>
auto multiply_backward_loop(Accumulator& acc, StreamMask stream, Terms terms) {
  using op_t = opmath_t<T>;
  static_assert(!(kRIsH && kDr), "r is h: its gradient is part of dh");
  constexpr int R = kDr ? 1 : 0;  // dr among the outputs
  constexpr int E = kElement ? 1 : 0;
  constexpr int G = 2 + R + E;  // outputs, then g
  constexpr int N = G + (kRIsH ? 4 : 5);
  constexpr int C = N - 1;
  if (kElement && terms == Terms::kNone) terms = Terms::kDoubleTanh;  // the loop writes them
  return [&acc, stream, terms](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizeof(T);
    sizes[1] = sizeof(S);
    if constexpr (kDr) sizes[2] = sizeof(S);
    if constexpr (kElement) sizes[2 + R] = sizeof(double);
    sizes[G] = sizes[G + 1] = sizeof(T);
    sizes[G + 2] = sizeof(S);
    if constexpr (!kRIsH) sizes[G + 3] = sizeof(S);
    sizes[C] = sizeof(op_t);
    run_rows<N, kVectorizable<T>>(
        data, st, n0, n1, sizes, C,
        [&](auto& p, int64_t n, TilePrefetch* prefetch) -> int64_t {
          const bool nt_dh = streams(stream, 0, p[0]), nt_ds = streams(stream, 1, p[1]);
          const bool nt_dr = kDr && streams(stream, 2, p[2]);
          int64_t i = 0;
          TermLanes<T, kElement> lanes;
          const auto vector_loop = [&](auto how) {
            for (; i + kStep <= n; i += kStep) {
              if constexpr (kElement) lanes.out = out_<double>(p[2 + R], i);
              F2 g, h, s, r, c, t, dh, ds, dc;
              load2<T>(at_<T>(p[G], i), g);
              load2<T>(at_<T>(p[G + 1], i), h);
              load2_as<T, S>(at_<S>(p[G + 2], i), s);
              if constexpr (kRIsH) {
                r[0] = h[0];
                r[1] = h[1];
              } else {
                load2_as<T, S>(at_<S>(p[G + 3], i), r);
              }
              load_weight2(p[C], st[C], i, c);
              for (int k = 0; k < 2; ++k) {
                const FVec d = s[k] - r[k];
                FVec sech;
                if constexpr (kHalfPrecision<T>) {
                  half_precision_tanh_with_grad<T>(d, t[k], sech);
                } else {
                  // tanh and 1 - tanh^2 from one exp, the latter accurate where tanh saturates
                  tanh_with_grad(d, t[k], sech);
                }
                // dc (alpha's terms) is not read here: the terms are summed below
                multiply_backward_t<kRIsH>(g[k], h[k], t[k], t[k], c[k], dh[k], ds[k], dc[k],
                                           RoundTo<op_t>{}, KnownTanhGrad<FVec>{sech});
                // the gradient of s.to(T) is rounded to T first (store2<T> rounds anyway)
                if constexpr (!std::is_same_v<S, T>) ds[k] = rounded<T>(ds[k]);
              }
              // alpha's terms apart from the gradients: a branch between the two halves' tanh
              // would keep them from overlapping
              constexpr Terms kHow = decltype(how)::value;
              for (int k = 0; kHow != Terms::kNone && k < 2; ++k) {
                if constexpr (std::is_same_v<T, float> && kHow == Terms::kFloatTanh) {
                  lanes.add([](const auto& a, const auto& b, const auto& x) { return a * b * x; },
                            g[k], h[k], t[k]);
                } else if constexpr (std::is_same_v<T, float>) {
                  lanes.add([](const DVec& a, const DVec& b, const DVec& x, const DVec& y) {
                    return a * b * (x - y).tanh();
                  }, g[k], h[k], s[k], r[k]);
                } else {  // a tanh to float accuracy (half_precision_tanh is up to 8e-7 off)
                  FVec accurate, unused;
                  tanh_with_grad(s[k] - r[k], accurate, unused);
                  lanes.add([](const auto& a, const auto& b, const auto& x) { return a * b * x; },
                            g[k], h[k], accurate);
                }
              }
              store2<T>(out_<T>(p[0], i), dh, nt_dh);
              store2<S>(out_<S>(p[1], i), ds, nt_ds);
              if constexpr (kDr) store2<S>(out_<S>(p[2], i), ds[0].neg(), ds[1].neg(), nt_dr);
              if (prefetch) prefetch->step();
            }
          };
          split_on_terms(terms, vector_loop);
          if (terms != Terms::kNone) lanes.flush_into(acc);  // a row's flush costs as much as a short row
          return i;
        },
        [&](auto& p, const int64_t* s, int64_t i) {
          const op_t g = static_cast<op_t>(val<T>(p[G], s[G], i));
          const op_t h = static_cast<op_t>(val<T>(p[G + 1], s[G + 1], i));
          const op_t sv = as_op<T>(val<S>(p[G + 2], s[G + 2], i));
          op_t r = h;
          if constexpr (!kRIsH) r = as_op<T>(val<S>(p[G + 3], s[G + 3], i));
          const op_t c = val<op_t>(p[C], s[C], i);
          const op_t d = sv - r;
          op_t dh, ds, dc;
          if constexpr (std::is_same_v<T, float>) {
            // in double, each gradient rounded once, as the forward's scalar tail
            const double t = float_tail_tanh(sv, r);
            double dh_wide, ds_wide, unused;
            multiply_backward_t<kRIsH>(double(g), double(h), t, t, double(c), dh_wide, ds_wide, unused,
                                       RoundTo<double>{}, KnownTanhGrad<double>{(1.0 - t) * (1.0 + t)});
            dh = static_cast<float>(dh_wide);
            ds = static_cast<float>(ds_wide);
          } else if constexpr (kHalfPrecision<T>) {
            op_t t, sech2;
            half_precision_tanh_with_grad<T>(d, t, sech2);
            multiply_backward_t<kRIsH>(g, h, t, t, c, dh, ds, dc, RoundTo<op_t>{},
                                       KnownTanhGrad<op_t>{sech2});
          } else {  // float64: in long double, each gradient rounded once
            using ld = long double;
            ld t, sech2, dh_wide, ds_wide, unused;
            wide_tanh_with_grad(ld(sv) - r, t, sech2);
            multiply_backward_t<kRIsH>(ld(g), ld(h), t, t, ld(c), dh_wide, ds_wide, unused,
                                       Unrounded{}, KnownTanhGrad<ld>{sech2});
            dh = static_cast<double>(dh_wide);
            ds = static_cast<double>(ds_wide);
          }
          ds = as_host_value<T>(ds);  // the gradient of s.to(T)
          put<T>(p[0], s[0], i, dh);
          put<S>(p[1], s[1], i, ds);
          if constexpr (kDr) put<S>(p[2], s[2], i, -ds);
          if (terms == Terms::kNone) return;
          // the scalar path (tails, strided rows) takes tanh in double (long double for float64)
          // whatever `terms` says, at least as accurate as the vector path: of s - r for float32
          // and float64, of the float difference for 16-bit hosts
          using W = term_t<T>;
          const W diff = kHalfPrecision<T> ? W(d) : W(sv) - W(r);
          const double term = static_cast<double>(W(g) * W(h) * std::tanh(diff));
          if constexpr (kElement) {
            put<double>(p[2 + R], s[2 + R], i, term);
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
  return [](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    run_rows<3, kVectorizable<T>>(
        data, st, n0, n1, {sizeof(T), sizeof(T), sizeof(S)}, -1,
        [&](auto& p, int64_t n, TilePrefetch* prefetch) -> int64_t {
          int64_t i = 0;
          for (; i + kStep <= n; i += kStep) {
            F2 h, s;
            load2<T>(at_<T>(p[1], i), h);
            load2_as<T, S>(at_<S>(p[2], i), s);
            store2<T>(out_<T>(p[0], i), ste(h[0], s[0]), ste(h[1], s[1]));
            if (prefetch) prefetch->step();
          }
          return i;
        },
        [&](auto& p, const int64_t* s, int64_t i) {
          const op_t h = static_cast<op_t>(val<T>(p[1], s[1], i));
          put<T>(p[0], s[0], i, ste(h, as_op<T>(val<S>(p[2], s[2], i))));
        });
  };
}

// STE's value for a host and seed in different orders, each read in its own: y = h + 0 over
// h's n elements (y has h's strides) while s's n elements are checked. That is the value
// wherever s is finite once cast to T; returns false if some s is not (s * 0 is NaN exactly
// there, and a NaN stays in a sum), and then y still needs the NaNs, in h's order.
template <typename T, typename S>
bool ste_forward_if_finite(const T* h, const S* s, T* y, int64_t n, bool stream) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const bool streamed = stream && stream_aligned(y + begin);
    const FVec zero(0.0f);
    FVec acc(0.0f);
    int64_t i = begin;
    for (; i + kStep <= end; i += kStep) {
      F2 hv, sv;
      load2<T>(h + i, hv);
      load2_as<T, S>(s + i, sv);
      store2<T>(y + i, hv[0] + zero, hv[1] + zero, streamed);
      acc = at::vec::fmadd(sv[0], zero, at::vec::fmadd(sv[1], zero, acc));
    }
    if (streamed) stream_fence();
    float sum = at::vec::vec_reduce_all([](const FVec& a, const FVec& b) { return a + b; }, acc);
    for (; i < end; ++i) {
      y[i] = static_cast<T>(static_cast<opmath_t<T>>(h[i]) + 0.0f);
      sum += as_op<T>(s[i]) * 0.0f;
    }
    if (std::isnan(sum)) finite = false;
  });
  return finite;
}

// ---------------------------------------------------------------- valve multiplier
// tanh of m and 1 - tanh^2 in m's opmath type, as MULTIPLY forms them: tanh_with_grad for
// float, half_precision_tanh_with_grad (saturated where the reference's tanh in m's dtype is
// +-1) for the half types. kRoundedToM: the caller rounds t to the half-precision M, as the
// reference's tanh is rounded: tanh_with_grad's float tanh then, as half_precision_tanh's
// error (up to 8e-7) rounds a tanh near a midpoint of M to the other neighbour, and 1 - t^2
// of the rounded t moves by the rounding's whole step.
template <typename M, bool kRoundedToM = false, typename V>
inline void valve_tanh(V m, V& t, V& one_minus_t2) {
  if constexpr (kHalfPrecision<M> && !kRoundedToM) {
    half_precision_tanh_with_grad<M>(m, t, one_minus_t2);
  } else if constexpr (std::is_same_v<M, double>) {
    double wide_t, wide_grad;
    reference_tanh_with_grad(m, wide_t, wide_grad);
    t = wide_t;
    one_minus_t2 = wide_grad;
  } else {
    tanh_with_grad(m, t, one_minus_t2);
  }
}

// 1 + c * tanh(m): U is the result dtype, M the dtype of m. The reference's tanh returns m's
// dtype: a float32 result of a half-precision m reads that tanh rounded to M (a dtype
// boundary). Otherwise computed in float and rounded once.
// operands: out(U), m(M), c(op)
template <typename U, typename M>
auto valve_forward_loop(StreamMask stream) {
  using op_t = opmath_t<U>;
  constexpr bool kBoundary = !std::is_same_v<U, M>;
  constexpr bool kFloat32 = std::is_same_v<U, float> && std::is_same_v<M, float>;
  return [stream](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    run_rows<3, kVectorizable<U>>(
        data, st, n0, n1, {sizeof(U), sizeof(M), sizeof(op_t)}, 2,
        [&](auto& p, int64_t n, TilePrefetch* prefetch) -> int64_t {
          const bool nt = streams(stream, 0, p[0]);
          int64_t i = 0;
          for (; i + kStep <= n; i += kStep) {
            F2 c, m, y;
            load_weight2(p[2], st[2], i, c);
            load2<M>(at_<M>(p[1], i), m);
            for (int k = 0; k < 2; ++k) {
              FVec t, unused;
              valve_tanh<M, kBoundary>(m[k], t, unused);
              if constexpr (kBoundary) t = rounded<M>(t);
              y[k] = valve(c[k], t);
            }
            store2<U>(out_<U>(p[0], i), y, nt);
            if (prefetch) prefetch->step();
          }
          return i;
        },
        [&](auto& p, const int64_t* s, int64_t i) {
          const auto m = static_cast<op_t>(val<M>(p[1], s[1], i));
          const op_t c = val<op_t>(p[2], s[2], i);
          if constexpr (kFloat32) {  // in double, rounded once, as MULTIPLY's scalar path
            put<U>(p[0], s[0], i, valve(static_cast<double>(c), float_tail_tanh(m, 0.0f)));
          } else {
            op_t t, unused;
            valve_tanh<M, kBoundary>(m, t, unused);
            if constexpr (kBoundary) t = as_host_value<M>(t);
            put<U>(p[0], s[0], i, valve(c, t));
          }
        });
  };
}

// dm = g*c*(1 - t^2) and alpha's terms g*t. A float32 result of a half-precision m rounds
// where the reference's dtype boundary does (the tanh, and g*c as the gradient of its cast).
// operands: dm(M), [dc(op) when kElement], g(U), m(M), c(op)
// `terms`: how alpha's gradient terms are formed (alpha_terms)
template <typename U, typename M, bool kElement>
auto valve_backward_loop(Accumulator& acc, StreamMask stream, Terms terms) {
  using op_t = opmath_t<U>;
  constexpr int E = kElement ? 1 : 0;
  constexpr int N = 4 + E;
  constexpr int G = 1 + E;
  constexpr bool kBoundary = !std::is_same_v<U, M>;
  constexpr bool kFloat32 = std::is_same_v<U, float> && std::is_same_v<M, float>;
  if (kElement && terms == Terms::kNone) terms = Terms::kDoubleTanh;  // the loop writes them
  return [&acc, stream, terms](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizeof(M);
    if constexpr (kElement) sizes[1] = sizeof(double);
    sizes[G] = sizeof(U);
    sizes[G + 1] = sizeof(M);
    sizes[G + 2] = sizeof(op_t);
    run_rows<N, kVectorizable<U> && kVectorizable<M>>(
        data, st, n0, n1, sizes, G + 2,
        [&](auto& p, int64_t n, TilePrefetch* prefetch) -> int64_t {
          const bool nt = streams(stream, 0, p[0]);
          int64_t i = 0;
          TermLanes<U, kElement> lanes;
          const auto vector_loop = [&](auto how) {
            for (; i + kStep <= n; i += kStep) {
              if constexpr (kElement) lanes.out = out_<double>(p[1], i);
              F2 g, c, m, t, dm, dc;
              load2<U>(at_<U>(p[G], i), g);
              load_weight2(p[G + 2], st[G + 2], i, c);
              load2<M>(at_<M>(p[G + 1], i), m);
              for (int k = 0; k < 2; ++k) {
                FVec sech;
                valve_tanh<M, kBoundary>(m[k], t[k], sech);
                // dc (alpha's terms) is not read here: the terms are summed below
                if constexpr (kBoundary) {
                  valve_backward(g[k], c[k], rounded<M>(t[k]), t[k], dm[k], dc[k], RoundTo<M>{});
                } else {
                  valve_backward(g[k], c[k], t[k], t[k], dm[k], dc[k], RoundTo<float>{},
                                 KnownTanhGrad<FVec>{sech});
                }
              }
              // alpha's terms apart, as in multiply_backward_loop
              constexpr Terms kHow = decltype(how)::value;
              for (int k = 0; kHow != Terms::kNone && k < 2; ++k) {
                // t is made for m's dtype: a 16-bit m's tanh_with_grad is more accurate
                if constexpr (!kHalfPrecision<U> && kHow == Terms::kDoubleTanh) {
                  lanes.add([](const DVec& a, const DVec& x) { return a * x.tanh(); }, g[k], m[k]);
                } else if constexpr (kHalfPrecision<M>) {  // a tanh to float accuracy
                  FVec accurate, unused;
                  tanh_with_grad(m[k], accurate, unused);
                  lanes.add([](const auto& a, const auto& b) { return a * b; }, g[k], accurate);
                } else {
                  lanes.add([](const auto& a, const auto& b) { return a * b; }, g[k], t[k]);
                }
              }
              store2<M>(out_<M>(p[0], i), dm, nt);
              if (prefetch) prefetch->step();
            }
          };
          split_on_terms(terms, vector_loop);
          if (terms != Terms::kNone) lanes.flush_into(acc);  // a row's flush costs as much as a short row
          return i;
        },
        [&](auto& p, const int64_t* s, int64_t i) {
          const op_t g = static_cast<op_t>(val<U>(p[G], s[G], i));
          const auto m = static_cast<op_t>(val<M>(p[G + 1], s[G + 1], i));
          const op_t c = val<op_t>(p[G + 2], s[G + 2], i);
          op_t dm;
          if constexpr (kFloat32) {  // in double, rounded once, as MULTIPLY's scalar path
            const double t = float_tail_tanh(m, 0.0f);
            dm = static_cast<float>(static_cast<double>(g) * c * ((1.0 - t) * (1.0 + t)));
          } else {
            op_t t, sech, dc;
            valve_tanh<M, kBoundary>(m, t, sech);
            if constexpr (kBoundary) {
              valve_backward(g, c, as_host_value<M>(t), t, dm, dc, RoundTo<M>{});
            } else {
              valve_backward(g, c, t, t, dm, dc, RoundTo<op_t>{}, KnownTanhGrad<op_t>{sech});
            }
          }
          put<M>(p[0], s[0], i, dm);
          if (terms == Terms::kNone) return;
          // alpha's terms take tanh in double, long double for float64 (t is made for m's dtype)
          using W = term_t<M>;
          const double term = static_cast<double>(W(g) * std::tanh(W(m)));
          if constexpr (kElement) {
            put<double>(p[1], s[1], i, term);
          } else {
            acc.add(term);
          }
        });
  };
}

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
