// TensorIterator loop bodies of the blend family (lerp for ADD/GATE, MULTIPLY, STE and the
// valve multiplier), forward and backward, templated on the feature dtype T and the seed's
// dtype S (T itself, or float beside a bfloat16/float16 host). Math comes from
// kernels/blend_math.h; these files only move data and round once.
#pragma once

#include "cpu/loops.h"
#include "cpu/vec_io.h"

namespace kk::cpu {

constexpr int64_t kGrain = 32768;

template <typename T>
struct Tag {
  using type = T;
};

// Flushes a float lane accumulator into a double every few vector steps, so long rows sum
// with double accuracy at float speed.
constexpr int64_t kFlushSteps = 16;

inline double lanes_sum(const FVec& v) {
  float tmp[FVec::size()];
  v.store(tmp);
  double acc = 0.0;
  for (int64_t k = 0; k < FVec::size(); ++k) acc += tmp[k];
  return acc;
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
auto lerp_forward_loop() {
  using op_t = opmath_t<T>;
  constexpr int N = 4;
  return [](char** data, const int64_t* st, int64_t n0, int64_t n1) {
        run_rows<N, kVectorizable<T>>(
            data, st, n0, n1, {sizeof(T), sizeof(T), sizeof(S), sizeof(op_t)}, 3,
            [&](std::array<char*, N>& p, int64_t n) -> int64_t {
              if constexpr (kVectorizable<T>) {
                const bool wb = st[3] == 0;
                int64_t i = 0;
                for (; i + kStep <= n; i += kStep) {
                  FVec h0, h1, s0, s1, w0, w1;
                  load2<T>(reinterpret_cast<const T*>(p[1]) + i, h0, h1);
                  load2_as<T, S>(reinterpret_cast<const S*>(p[2]) + i, s0, s1);
                  load_weight2<float>(p[3] + (wb ? 0 : i * sizeof(float)), wb, w0, w1);
                  store2<T>(reinterpret_cast<T*>(p[0]) + i, lerp(h0, s0, w0), lerp(h1, s1, w1));
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
auto lerp_backward_loop(double& acc) {
  using op_t = opmath_t<T>;
  constexpr int E = kElement ? 1 : 0;
  constexpr int N = 6 + E;
  constexpr int G = 2 + E;  // index of g
  return [&acc](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizeof(T);
    sizes[1] = sizeof(S);
    if constexpr (kElement) sizes[2] = sizeof(op_t);
    sizes[G] = sizeof(T);
    sizes[G + 1] = sizeof(T);
    sizes[G + 2] = sizeof(S);
    sizes[G + 3] = sizeof(op_t);
    run_rows<N, kVectorizable<T>>(
        data, st, n0, n1, sizes, G + 3,
        [&](std::array<char*, N>& p, int64_t n) -> int64_t {
          if constexpr (kVectorizable<T>) {
            const bool wb = st[G + 3] == 0;
            int64_t i = 0;
            while (i + kStep <= n) {
              FVec accv(0.0f);
              const int64_t seg_end = std::min(n, i + kFlushSteps * kStep);
              for (; i + kStep <= seg_end; i += kStep) {
                FVec g0, g1, h0, h1, s0, s1, w0, w1, dh0, dh1, ds0, ds1, dw0, dw1;
                load2<T>(reinterpret_cast<const T*>(p[G]) + i, g0, g1);
                load2<T>(reinterpret_cast<const T*>(p[G + 1]) + i, h0, h1);
                load2_as<T, S>(reinterpret_cast<const S*>(p[G + 2]) + i, s0, s1);
                load_weight2<float>(p[G + 3] + (wb ? 0 : i * sizeof(float)), wb, w0, w1);
                lerp_backward(g0, h0, s0, w0, dh0, ds0, dw0);
                lerp_backward(g1, h1, s1, w1, dh1, ds1, dw1);
                store2<T>(reinterpret_cast<T*>(p[0]) + i, dh0, dh1);
                // the gradient of s.to(T) is rounded to T first (store2<T> rounds anyway)
                if constexpr (!std::is_same_v<S, T>) round_through<T>(ds0, ds1);
                store2<S>(reinterpret_cast<S*>(p[1]) + i, ds0, ds1);
                if constexpr (kElement) {
                  store2<float>(reinterpret_cast<float*>(p[2]) + i, dw0, dw1);
                } else {
                  accv = accv + (dw0 + dw1);
                }
              }
              if constexpr (!kElement) acc += lanes_sum(accv);
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
          if constexpr (kElement) {
            put<op_t>(p[2], s[2], i, dw);
          } else {
            acc += static_cast<double>(dw);
          }
        });
  };
}

// ---------------------------------------------------------------- MULTIPLY
// operands: out(T), h(T), s(S), [r(S) unless kRIsH], c(op)
template <typename T, typename S, bool kRIsH>
auto multiply_forward_loop() {
  using op_t = opmath_t<T>;
  constexpr int N = kRIsH ? 4 : 5;
  constexpr int C = N - 1;
  return [](char** data, const int64_t* st, int64_t n0, int64_t n1) {
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
                  store2<T>(reinterpret_cast<T*>(p[0]) + i, multiply(h0, s0, r0, c0),
                            multiply(h1, s1, r1, c1));
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
              put<T>(p[0], s[0], i, multiply(h, sv, r, c));
            });
      };
}

// operands: dh(T), ds(S), [dr(S)], [dc(op) when kElement], g(T), h(T), s(S), [r(S)], c(op)
template <typename T, typename S, bool kRIsH, bool kElement>
auto multiply_backward_loop(double& acc) {
  using op_t = opmath_t<T>;
  constexpr int R = kRIsH ? 0 : 1;
  constexpr int E = kElement ? 1 : 0;
  constexpr int NO = 2 + R + E;  // outputs
  constexpr int N = NO + 4 + R;
  constexpr int G = NO;
  constexpr int C = N - 1;
  return [&acc](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizeof(T);
    sizes[1] = sizeof(S);
    if constexpr (!kRIsH) sizes[2] = sizeof(S);
    if constexpr (kElement) sizes[2 + R] = sizeof(op_t);
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
            int64_t i = 0;
            while (i + kStep <= n) {
              FVec accv(0.0f);
              const int64_t seg_end = std::min(n, i + kFlushSteps * kStep);
              for (; i + kStep <= seg_end; i += kStep) {
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
                multiply_backward<kRIsH>(g0, h0, s0, r0, c0, dh0, ds0, dc0);
                multiply_backward<kRIsH>(g1, h1, s1, r1, c1, dh1, ds1, dc1);
                store2<T>(reinterpret_cast<T*>(p[0]) + i, dh0, dh1);
                if constexpr (!std::is_same_v<S, T>) round_through<T>(ds0, ds1);
                store2<S>(reinterpret_cast<S*>(p[1]) + i, ds0, ds1);
                if constexpr (!kRIsH) {
                  store2<S>(reinterpret_cast<S*>(p[2]) + i, FVec(0.0f) - ds0, FVec(0.0f) - ds1);
                }
                if constexpr (kElement) {
                  store2<float>(reinterpret_cast<float*>(p[2 + R]) + i, dc0, dc1);
                } else {
                  accv = accv + (dc0 + dc1);
                }
              }
              if constexpr (!kElement) acc += lanes_sum(accv);
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
          op_t dh, ds, dc;
          multiply_backward<kRIsH>(g, h, sv, r, c, dh, ds, dc);
          put<T>(p[0], s[0], i, dh);
          const T ds_t = static_cast<T>(ds);
          put<S>(p[1], s[1], i, ds_t);
          if constexpr (!kRIsH) put<S>(p[2], s[2], i, -static_cast<op_t>(ds_t));
          if constexpr (kElement) {
            put<op_t>(p[2 + R], s[2 + R], i, dc);
          } else {
            acc += static_cast<double>(dc);
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
// 1 + c * tanh(m): U is the result dtype, M the dtype of m (tanh is rounded to M, as the
// reference computes it in m's dtype before promoting). operands: out(U), m(M), c(op)
template <typename U, typename M>
auto valve_forward_loop() {
  using op_t = opmath_t<U>;
  constexpr int N = 3;
  return [](char** data, const int64_t* st, int64_t n0, int64_t n1) {
        run_rows<N, kVectorizable<U>>(
            data, st, n0, n1, {sizeof(U), sizeof(M), sizeof(op_t)}, 2,
            [&](std::array<char*, N>& p, int64_t n) -> int64_t {
              if constexpr (kVectorizable<U>) {
                const bool cb = st[2] == 0;
                int64_t i = 0;
                for (; i + kStep <= n; i += kStep) {
                  FVec m0, m1, c0, c1;
                  load2<M>(reinterpret_cast<const M*>(p[1]) + i, m0, m1);
                  load_weight2<float>(p[2] + (cb ? 0 : i * sizeof(float)), cb, c0, c1);
                  FVec t0 = Prims<FVec>::tanh(m0), t1 = Prims<FVec>::tanh(m1);
                  round_through<M>(t0, t1);
                  store2<U>(reinterpret_cast<U*>(p[0]) + i, valve(c0, t0), valve(c1, t1));
                }
                return i;
              }
              return 0;
            },
            [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
              const auto m = static_cast<opmath_t<M>>(val<M>(p[1], s[1], i));
              const op_t t = static_cast<op_t>(static_cast<M>(Prims<opmath_t<M>>::tanh(m)));
              const op_t c = val<op_t>(p[2], s[2], i);
              put<U>(p[0], s[0], i, valve(c, t));
            });
      };
}

// operands: dm(M), [dc(op) when kElement], g(U), m(M), c(op)
template <typename U, typename M, bool kElement>
auto valve_backward_loop(double& acc) {
  using op_t = opmath_t<U>;
  constexpr int E = kElement ? 1 : 0;
  constexpr int N = 4 + E;
  constexpr int G = 1 + E;
  return [&acc](char** data, const int64_t* st, int64_t n0, int64_t n1) {
    std::array<int64_t, N> sizes;
    sizes[0] = sizeof(M);
    if constexpr (kElement) sizes[1] = sizeof(op_t);
    sizes[G] = sizeof(U);
    sizes[G + 1] = sizeof(M);
    sizes[G + 2] = sizeof(op_t);
    run_rows<N, kVectorizable<U> && kVectorizable<M>>(
        data, st, n0, n1, sizes, G + 2,
        [&](std::array<char*, N>& p, int64_t n) -> int64_t {
          if constexpr (kVectorizable<U> && kVectorizable<M>) {
            const bool cb = st[G + 2] == 0;
            int64_t i = 0;
            while (i + kStep <= n) {
              FVec accv(0.0f);
              const int64_t seg_end = std::min(n, i + kFlushSteps * kStep);
              for (; i + kStep <= seg_end; i += kStep) {
                FVec g0, g1, m0, m1, c0, c1, dm0, dm1, dc0, dc1;
                load2<U>(reinterpret_cast<const U*>(p[G]) + i, g0, g1);
                load2<M>(reinterpret_cast<const M*>(p[G + 1]) + i, m0, m1);
                load_weight2<float>(p[G + 2] + (cb ? 0 : i * sizeof(float)), cb, c0, c1);
                FVec t0 = Prims<FVec>::tanh(m0), t1 = Prims<FVec>::tanh(m1);
                round_through<M>(t0, t1);
                valve_backward(g0, c0, t0, dm0, dc0);
                valve_backward(g1, c1, t1, dm1, dc1);
                store2<M>(reinterpret_cast<M*>(p[0]) + i, dm0, dm1);
                if constexpr (kElement) {
                  store2<float>(reinterpret_cast<float*>(p[1]) + i, dc0, dc1);
                } else {
                  accv = accv + (dc0 + dc1);
                }
              }
              if constexpr (!kElement) acc += lanes_sum(accv);
            }
            return i;
          }
          return 0;
        },
        [&](std::array<char*, N>& p, const int64_t* s, int64_t i) {
          const op_t g = static_cast<op_t>(val<U>(p[G], s[G], i));
          const auto m = static_cast<opmath_t<M>>(val<M>(p[G + 1], s[G + 1], i));
          const op_t t = static_cast<op_t>(static_cast<M>(Prims<opmath_t<M>>::tanh(m)));
          const op_t c = val<op_t>(p[G + 2], s[G + 2], i);
          op_t dm, dc;
          valve_backward(g, c, t, dm, dc);
          put<M>(p[0], s[0], i, dm);
          if constexpr (kElement) {
            put<op_t>(p[1], s[1], i, dc);
          } else {
            acc += static_cast<double>(dc);
          }
        });
  };
}

}  // namespace kk::cpu
