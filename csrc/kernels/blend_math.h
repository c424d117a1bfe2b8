// Per-element formulas of every blend operator: the one definition shared by the CPU
// kernels (scalar and at::vec::Vectorized<float>) and the CUDA kernels.
//
// This header depends on nothing but <cmath>: no torch, no CUDA runtime. A vector type joins
// in by specialising kk::Prims<V> (abs, lt, select, tanh) before instantiating the formulas.
// All math runs in the "opmath" type (float for float/bfloat16/float16, double for double);
// callers load, convert and round once.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KK_HD __host__ __device__ __forceinline__
#else
#define KK_HD inline
#endif

namespace kk {
// Each CPU capability's copy of these templates in its own namespace (setup.py compiles the CPU
// kernels once per capability, with different vector flags): copies that the linker merged
// would run one capability's code in another's.
#ifdef CPU_CAPABILITY
inline namespace CPU_CAPABILITY {
#endif

template <typename T>
struct Prims;

template <>
struct Prims<float> {
  KK_HD static float abs(float x) { return fabsf(x); }
  KK_HD static bool lt(float a, float b) { return a < b; }
  KK_HD static float select(bool c, float a, float b) { return c ? a : b; }
  KK_HD static float copysign(float mag, float x) { return copysignf(mag, x); }
  KK_HD static float tanh(float x) { return tanhf(x); }
  KK_HD static float exp(float x) { return expf(x); }
  KK_HD static float fnma(float a, float b, float c) { return fmaf(-a, b, c); }
  KK_HD static float fma(float a, float b, float c) { return fmaf(a, b, c); }
};

template <>
struct Prims<double> {
  KK_HD static double abs(double x) { return fabs(x); }
  KK_HD static bool lt(double a, double b) { return a < b; }
  KK_HD static double select(bool c, double a, double b) { return c ? a : b; }
  KK_HD static double copysign(double mag, double x) { return ::copysign(mag, x); }
  KK_HD static double tanh(double x) { return ::tanh(x); }
  KK_HD static double exp(double x) { return ::exp(x); }
  KK_HD static double fnma(double a, double b, double c) { return ::fma(-a, b, c); }
  KK_HD static double fma(double a, double b, double c) { return ::fma(a, b, c); }
};

// tanh built from exp, for float32 vector code (where a library tanh costs several times an
// exp) and for interpreters without libdevice, with 1 - tanh^2 alongside. Below |x| = 0.6:
// x P(x^2), P of degree 5 fitted to tanh(x)/x there for least maximum relative error
// (5e-9 with its float coefficients). Above it, with q = 2 / (exp(2|x|) + 1) = 1 - |tanh x|:
// tanh = 1 - q and 1 - tanh^2 = q (2 - q). tanh is within 2 float32 ulps over the whole line;
// 1 - tanh^2 keeps its relative accuracy where tanh saturates, where forming it from a rounded
// tanh (1 - t*t) would cancel to a few bits. tanh(10) is 1 in float32: clamping keeps exp's
// argument in [0, 20]. Above |x| = kFloatTanhBelowOne, tanh is exactly +-1 and 1 - tanh^2
// exactly 0, as the reference's float32 tanh on CPU (ATen's) is there and not below
// (tests/test_contracts.py checks it): 1 - t^2 then vanishes where the reference's does, and
// an infinite factor beside it gives NaN as there. NaN propagates; tanh keeps x's sign (-0 too).
constexpr float kFloatTanhBelowOne = 9.010839462280273f;  // ATen's tanh is 1 from the next float

// `complement`: 1 - |tanh x| with tanh's sign, to the same relative accuracy as 1 - tanh^2
// (exactly +-0 where tanh is +-1): what MULTIPLY's forward keeps for its backward
// (tanh_from_complement).
template <typename T>
KK_HD void tanh_with_grad(T x, T& t, T& one_minus_t2, T& complement) {
  using P = Prims<T>;
  const T a = P::abs(x);
  const T a2 = a * a;
  T poly = P::fma(T(-5.895432084798813e-3f), a2, T(2.0796185359358788e-2f));
  poly = P::fma(poly, a2, T(-5.378388613462448e-2f));
  poly = P::fma(poly, a2, T(1.3331924378871918e-1f));
  poly = P::fma(poly, a2, T(-3.3333298563957214e-1f));
  poly = P::fma(poly, a2, T(1.0f));
  const T t_small = a * poly;
  const T ac = P::select(P::lt(T(10.0f), a), T(10.0f), a);  // NaN passes through
  const T q_exp = T(2.0f) / (P::exp(ac + ac) + T(1.0f));
  const T q = P::select(P::lt(T(kFloatTanhBelowOne), a), T(0.0f), q_exp);  // 0 where saturated
  const auto small = P::lt(a, T(0.6f));
  t = P::copysign(P::select(small, t_small, T(1.0f) - q), x);
  one_minus_t2 = P::select(small, P::fnma(t_small, t_small, T(1.0f)), q * (T(2.0f) - q));
  complement = P::copysign(P::select(small, T(1.0f) - t_small, q), x);  // -0 where t is -1
}

template <typename T>
KK_HD void tanh_with_grad(T x, T& t, T& one_minus_t2) {
  T unused;
  tanh_with_grad(x, t, one_minus_t2, unused);
}

// tanh and 1 - tanh^2 back from tanh_with_grad's `complement` z = +-q: t = +-(1 - q), and
// 1 - t^2 = q (2 - q), which keeps its relative accuracy where t rounds near +-1.
template <typename T>
KK_HD void tanh_from_complement(T z, T& t, T& one_minus_t2) {
  using P = Prims<T>;
  const T q = P::abs(z);
  t = P::copysign(T(1.0f) - q, z);
  one_minus_t2 = q * (T(2.0f) - q);
}

template <typename T>
KK_HD T tanh_from_exp(T x) {
  T t, unused;
  tanh_with_grad(x, t, unused);
  return t;
}

// The reference's tanh of a bfloat16 or float16 argument d is exactly +-1 where |d| (before
// its rounding to that dtype) is at least this: the midpoint below the smallest value whose
// tanh rounds to 1 (3.46875 in bfloat16, 4.5078125 in float16; both even, so a tie rounds d
// onto them). Kernels that compute the tanh unrounded take +-1 there, so that 1 + c*t and
// 1 - t^2 vanish where the reference's do and an infinite factor beside them gives NaN.
constexpr float kBFloat16TanhSaturates = 3.4609375f;
constexpr float kFloat16TanhSaturates = 4.505859375f;

// tanh for the bfloat16 and float16 kernels, whose tanh rounds to 8 or 11 bits: the odd
// rational function x P(x^2) / Q(x^2) of degrees 7 and 8 fitted to tanh on [0, 9] for least
// maximal relative error (under 4e-7; 8e-7 evaluated in float32), with x clamped to
// [-9, 9] (tanh 9 = 1 - 3e-8). Far below half an ulp of either dtype, so it rounds as the
// exact tanh does but for values within 1e-6 of a rounding midpoint; cheaper than
// tanh_with_grad, whose float32 accuracy these dtypes do not need, and than a table of every
// value.
// NaN propagates; tanh(-0) = -0.
template <typename T>
KK_HD T half_precision_tanh(T x) {
  using P = Prims<T>;
  const T lim(9.0f), neg_lim(-9.0f);
  T xc = P::select(P::lt(lim, x), lim, x);  // NaN passes through
  xc = P::select(P::lt(xc, neg_lim), neg_lim, xc);
  const T z = xc * xc;
  T num = T(1.0424355241293176e-05f);
  num = num * z + T(0.0028551334469274275f);
  num = num * z + T(0.12835365891813302f);
  num = num * z + T(0.9999996184404291f);
  T den = T(2.1457398591273602e-07f);
  den = den * z + T(0.00022529201784759296f);
  den = den * z + T(0.023420142242495806f);
  den = den * z + T(0.4616841274975032f);
  den = den * z + T(1.0f);
  return xc * num / den;
}

// clamp(x, 0, 1) that keeps NaN, as torch.clamp does (both comparisons are false for NaN).
template <typename T>
KK_HD T clamp01(T x) {
  return x < T(0) ? T(0) : (x > T(1) ? T(1) : x);
}

// torch.clamp passes the gradient on the closed interval [0, 1].
template <typename T>
KK_HD bool clamp01_passes_grad(T x) {
  return x >= T(0) && x <= T(1);
}

// torch.lerp's two-branch form, |w| < 0.5 ? h + w*(s-h) : s - (s-h)*(1-w), as ATen's lerp
// evaluates it: one fused multiply-add on the selected coefficient and base; in the DEFAULT
// CPU capability, whose ATen lerp has no FMA, a product and a sum rounded apart. Exact at
// w == 0 (gives h) and at w == 1 (gives s); NaN where s - h is not finite, as the reference.
template <typename T>
KK_HD T lerp(T h, T s, T w) {
  using P = Prims<T>;
  const auto small = P::lt(P::abs(w), T(0.5f));
#if defined(CPU_CAPABILITY_DEFAULT)
  return P::select(small, w, w - T(1.0f)) * (s - h) + P::select(small, h, s);
#else
  return P::fma(P::select(small, w, w - T(1.0f)), s - h, P::select(small, h, s));
#endif
}

// Gradients of lerp: dh = g*(1-w), ds = g*w; dw_term is summed to the weight's shape.
template <typename T>
KK_HD void lerp_backward(T g, T h, T s, T w, T& dh, T& ds, T& dw_term) {
  dh = g * (T(1.0f) - w);
  ds = g * w;
  dw_term = g * (s - h);
}

// MULTIPLY's valve: 1 + c * t, with c = clamp01(alpha) and t = tanh(seed - reference).
template <typename T>
KK_HD T valve(T c, T t) {
  // one rounding: 1 + c*t cancels where c*t nears -1, and a separately rounded product would
  // add its error there (builds without FMA instructions do not contract this themselves)
  return Prims<T>::fma(c, t, T(1.0f));
}

template <typename T>
KK_HD T multiply(T h, T s, T r, T c) {
  return h * valve(c, Prims<T>::tanh(s - r));
}

// 1 - t^2 of tanh's gradient, as each device's eager tanh_backward forms it from the saved
// tanh t. FusedTanhGrad: one fused multiply-add in the opmath type (ATen's CPU kernels, and
// its CUDA kernels for float and double). StorageTanhGrad: ATen's CUDA kernel for
// bfloat16/float16 computes `a * (1 - b * b)` in the 16-bit type, rounding t*t and then
// 1 - t*t to it; with an identity rounding it falls back to the fused form.
struct FusedTanhGrad {
  template <typename T, typename Round>
  KK_HD T operator()(T t, Round) const {
    return Prims<T>::fnma(t, t, T(1.0f));
  }
};

// 1 - t^2 formed beforehand, from the tanh's own parts (tanh_with_grad), not from t.
template <typename V>
struct KnownTanhGrad {
  V value;
  template <typename T, typename Round>
  KK_HD T operator()(T, Round) const {
    return value;
  }
};

struct StorageTanhGrad {
  template <typename T, typename Round>
  KK_HD T operator()(T t, Round round) const {
    if constexpr (Round::kIdentity) {
      return Prims<T>::fnma(t, t, T(1.0f));
    } else {
      return round(T(1.0f) - round(t * t));
    }
  }
};

// Gradients of h * (1 + c * tanh(s - r)) given the tanh, at the reference autograd's
// rounding points: `round` rounds an intermediate to the host dtype where the reference
// rounds it (NoRound for float/double hosts, whose arithmetic already rounds there), and
// 1 - t^2 is formed as the device's tanh_backward forms it (`tanh_grad`). `t_grad` is the
// tanh the reference saved (rounded to the host dtype), `t` the unrounded one for the alpha
// term. When r is h itself, h's gradient also carries the path through r (-ds).
// ds comes back rounded (a host-dtype value), and so does dh unless r is h (then dh - ds is
// left to the caller's store). dc_term = g*h*t is summed to alpha's shape; dr = -ds.
template <bool kReferenceIsHost, typename T, typename Round, typename TanhGrad = FusedTanhGrad>
KK_HD void multiply_backward_t(T g, T h, T t_grad, T t, T c, T& dh, T& ds, T& dc_term,
                               Round round, TanhGrad tanh_grad = {}) {
  const T gh = round(g * h);
  ds = round(round(gh * c) * tanh_grad(t_grad, round));
  dh = round(g * round(T(1.0f) + round(c * t_grad)));
  if (kReferenceIsHost) {
    dh = dh - ds;
  }
  dc_term = gh * t;
}

// Straight-through estimator: the value is h, NaN where s is not finite.
template <typename T>
KK_HD T ste(T h, T s) {
  return h + (s - s);
}

// multiply_valve_multiplier's gradients for t = tanh(m): dm = round(g*c) * (1 - t_grad^2)
// with t_grad the tanh rounded to m's dtype and `round` rounding to m's dtype (the reference's
// tanh backward runs in m's dtype), dc_term = g*t with the unrounded t.
template <typename T, typename Round, typename TanhGrad = FusedTanhGrad>
KK_HD void valve_backward(T g, T c, T t_grad, T t, T& dm, T& dc_term, Round round,
                          TanhGrad tanh_grad = {}) {
  dm = round(g * c) * tanh_grad(t_grad, round);
  dc_term = g * t;
}

template <typename T>
KK_HD T sigmoid(T x) {
  return T(1) / (T(1) + Prims<T>::exp(-x));
}

#ifdef CPU_CAPABILITY
}  // namespace CPU_CAPABILITY
#endif
}  // namespace kk
