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

template <typename T>
struct Prims;

template <>
struct Prims<float> {
  KK_HD static float abs(float x) { return fabsf(x); }
  KK_HD static bool lt(float a, float b) { return a < b; }
  KK_HD static float select(bool c, float a, float b) { return c ? a : b; }
  KK_HD static float tanh(float x) { return tanhf(x); }
  KK_HD static float exp(float x) { return expf(x); }
};

template <>
struct Prims<double> {
  KK_HD static double abs(double x) { return fabs(x); }
  KK_HD static bool lt(double a, double b) { return a < b; }
  KK_HD static double select(bool c, double a, double b) { return c ? a : b; }
  KK_HD static double tanh(double x) { return ::tanh(x); }
  KK_HD static double exp(double x) { return ::exp(x); }
};

// tanh built from exp, for float32 vector code (where a library tanh costs several times an
// exp) and for interpreters without libdevice: the odd Taylor series to x^11 below |x| = 0.3
// (truncation < 1e-9 relative there), 1 - 2 / (exp(2|x|) + 1) above (a few float32 ulps;
// exp overflowing to inf gives exactly 1). NaN propagates; tanh(-0) returns +0.
template <typename T>
KK_HD T tanh_from_exp(T x) {
  using P = Prims<T>;
  const T a = P::abs(x);
  const T a2 = a * a;
  const T poly =
      a * (T(1.0f) +
           a2 * (T(-1.0f / 3.0f) +
                 a2 * (T(2.0f / 15.0f) +
                       a2 * (T(-17.0f / 315.0f) +
                             a2 * (T(62.0f / 2835.0f) + a2 * T(-1382.0f / 155925.0f))))));
  const T big = T(1.0f) - T(2.0f) / (P::exp(a + a) + T(1.0f));
  const T t = P::select(P::lt(a, T(0.3f)), poly, big);
  return P::select(P::lt(x, T(0.0f)), T(0.0f) - t, t);
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

// torch.lerp's two-branch form: exact at w == 0 (gives h) and at w == 1 (gives s).
template <typename T>
KK_HD T lerp(T h, T s, T w) {
  using P = Prims<T>;
  const T d = s - h;
  return P::select(P::lt(P::abs(w), T(0.5f)), h + w * d, s - d * (T(1.0f) - w));
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
  return T(1.0f) + c * t;
}

template <typename T>
KK_HD T multiply(T h, T s, T r, T c) {
  return h * valve(c, Prims<T>::tanh(s - r));
}

// Gradients of h * (1 + c * tanh(s - r)). When r is h itself, h's gradient also carries the
// path through r (-ds). dc_term = g*h*t is summed to alpha's shape; dr = -ds.
template <bool kReferenceIsHost, typename T>
KK_HD void multiply_backward(T g, T h, T s, T r, T c, T& dh, T& ds, T& dc_term) {
  const T t = Prims<T>::tanh(s - r);
  const T gh = g * h;
  ds = gh * c * (T(1.0f) - t * t);
  dh = g * valve(c, t);
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

// multiply_valve_multiplier's gradients for t = tanh(m): dm = g*c*(1-t^2), dc_term = g*t.
template <typename T>
KK_HD void valve_backward(T g, T c, T t, T& dm, T& dc_term) {
  dm = g * c * (T(1.0f) - t * t);
  dc_term = g * t;
}

template <typename T>
KK_HD T sigmoid(T x) {
  return T(1) / (T(1) + Prims<T>::exp(-x));
}

}  // namespace kk
