// Device helpers shared by the CUDA kernels: storage types and their conversions (explicit
// intrinsics only, so they build under torch's __CUDA_NO_HALF_CONVERSIONS__ and friends),
// 16-byte packs, weights in any dtype, fixed-order block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "kk_cuda.h"
#include "kernels/blend_math.h"

#define KK_DEV __device__ __forceinline__

namespace kk::cuda {

// ---------------------------------------------------------------- storage types
// 16-bit floats are kept as raw bits: no implicit conversions exist to go wrong.
struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

// The compute type of a storage type: float, double for double.
template <typename X>
using opmath_t = std::conditional_t<std::is_same_v<X, double>, double, float>;

KK_DEV float to_float(bf16_t v) { return __uint_as_float(static_cast<uint32_t>(v.x) << 16); }
KK_DEV float to_float(f16_t v) { return __half2float(__ushort_as_half(v.x)); }

// A bool element: one byte, 0 or 1.
struct bool_t {
  uint8_t x;
};

// Calls f(X{}) with X the storage type of t.
template <typename F>
KK_DEV auto visit_dtype(DType t, F&& f, decltype(f(float{})) fallback = {}) {
  switch (t) {
    case DType::kFloat:
      return f(float{});
    case DType::kDouble:
      return f(double{});
    case DType::kBFloat16:
      return f(bf16_t{});
    case DType::kHalf:
      return f(f16_t{});
    case DType::kUInt8:
      return f(uint8_t{});
    case DType::kInt8:
      return f(int8_t{});
    case DType::kInt16:
      return f(int16_t{});
    case DType::kInt32:
      return f(int32_t{});
    case DType::kInt64:
      return f(int64_t{});
    case DType::kBool:
      return f(bool_t{});
  }
  return fallback;
}

// f(X{}) with X the storage type of the float dtype t, else `other`.
#pragma nv_exec_check_disable
template <typename R, typename F>
__host__ __device__ __forceinline__ R visit_float(DType t, R other, F&& f) {
  switch (t) {
    case DType::kFloat:
      return f(float{});
    case DType::kDouble:
      return f(double{});
    case DType::kBFloat16:
      return f(bf16_t{});
    case DType::kHalf:
      return f(f16_t{});
    default:
      return other;
  }
}

template <typename F>
cudaError_t dispatch_float(DType t, F&& f) {
  return visit_float(t, cudaErrorInvalidValue, f);
}

template <typename X>
constexpr bool kIsHalf = std::is_same_v<X, bf16_t> || std::is_same_v<X, f16_t>;

// Widening loads, exact.
template <typename O, typename X>
KK_DEV O widen(X v) {
  if constexpr (kIsHalf<X>) {
    return static_cast<O>(to_float(v));
  } else if constexpr (std::is_same_v<X, bool_t>) {
    return v.x != 0 ? O(1) : O(0);
  } else {
    return static_cast<O>(v);
  }
}

// Rounding to a storage type, as c10 does it: round to nearest even; a double goes through
// float first (c10::BFloat16 and c10::Half are built from a float).
template <typename X, typename V>
KK_DEV X narrow(V v) {
  if constexpr (std::is_same_v<X, bf16_t>) {
    return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(v)))};
  } else if constexpr (std::is_same_v<X, f16_t>) {
    return f16_t{__half_as_ushort(__float2half_rn(static_cast<float>(v)))};
  } else if constexpr (std::is_same_v<X, bool_t>) {
    return bool_t{static_cast<uint8_t>(v != V(0) ? 1 : 0)};
  } else if constexpr (std::is_same_v<X, uint8_t>) {
    return static_cast<uint8_t>(static_cast<int64_t>(v));  // negative values wrap, as on the host
  } else {
    return static_cast<X>(v);
  }
}

// v rounded to X's precision and widened back: the reference's `.to(X)` inside a computation.
template <typename X, typename V>
KK_DEV V round_through(V v) {
  if constexpr (std::is_same_v<X, V>) {
    return v;
  } else {
    return widen<V>(narrow<X>(v));
  }
}

// ---------------------------------------------------------------- runtime-typed scalars
KK_DEV double load_as_double(const void* base, DType t, int64_t off) {
  return visit_dtype(t, [&](auto x) { return widen<double>(static_cast<const decltype(x)*>(base)[off]); });
}

// Stores a double as dtype t the way a static_cast from double does on the host.
KK_DEV void store_from_double(void* base, DType t, int64_t off, double v) {
  visit_dtype(t, [&](auto x) {
    using X = decltype(x);
    static_cast<X*>(base)[off] = narrow<X>(v);
    return 0;
  });
}

// `.to(t)` of a double value, as a double (the rounding of kk::cpu::round_to): integer dtypes
// keep the value (blends always promote to a float dtype before rounding).
KK_DEV double round_to(DType t, double v) {
  switch (t) {
    case DType::kFloat:
      return round_through<float>(v);
    case DType::kBFloat16:
      return round_through<bf16_t>(v);
    case DType::kHalf:
      return round_through<f16_t>(v);
    default:
      return v;
  }
}

KK_DEV double read_weight(const WeightSource& w, int64_t j) {
  if (w.ptr == nullptr) return w.host_value;
  return load_as_double(w.ptr, w.dtype, map_offset(w.map, j));
}

// ---------------------------------------------------------------- compile-time loops
template <typename F, int... Is>
KK_DEV void static_for_impl(F&& f, std::integer_sequence<int, Is...>) {
  (f(std::integral_constant<int, Is>{}), ...);
}
template <int N, typename F>
KK_DEV void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// ---------------------------------------------------------------- 16-byte packs
// VEC elements of X, loaded and stored as whole 16-byte words (VEC * sizeof(X) is 16 or 32):
// explicit uint4 accesses, so the compiler emits 128-bit loads and stores.
template <typename X, int VEC>
union Pack {
  static_assert((VEC * sizeof(X)) % 16 == 0, "packs are whole 16-byte words");
  static constexpr int kWords = static_cast<int>(VEC * sizeof(X) / 16);
  uint4 w[kWords];
  X v[VEC];
};

template <typename X, int VEC, typename O>
KK_DEV void load_pack(const void* base, int64_t i, O (&out)[VEC]) {
  using P = Pack<X, VEC>;
  P p;
  const uint4* src = reinterpret_cast<const uint4*>(static_cast<const X*>(base) + i);
#pragma unroll
  for (int k = 0; k < P::kWords; ++k) p.w[k] = src[k];
#pragma unroll
  for (int l = 0; l < VEC; ++l) out[l] = widen<O>(p.v[l]);
}

// Raw bits of a storage value, widened to 64 bits.
KK_DEV uint64_t bits_of(float v) { return __float_as_uint(v); }
KK_DEV uint64_t bits_of(double v) { return static_cast<uint64_t>(__double_as_longlong(v)); }
KK_DEV uint64_t bits_of(bf16_t v) { return v.x; }
KK_DEV uint64_t bits_of(f16_t v) { return v.x; }

// Stores are assembled into 32-bit words from the elements' bits and written as uint4 with
// an explicit 128-bit store instruction (plain stores of packs were split by the compiler).
template <typename X, int VEC, typename O>
KK_DEV void store_pack(void* base, int64_t i, const O (&in)[VEC]) {
  static_assert((VEC * sizeof(X)) % 16 == 0, "packs are whole 16-byte words");
  constexpr int kWords32 = static_cast<int>(VEC * sizeof(X) / 4);
  uint32_t w[kWords32];
  if constexpr (sizeof(X) == 2) {
#pragma unroll
    for (int k = 0; k < kWords32; ++k) {
      w[k] = static_cast<uint32_t>(bits_of(narrow<X>(in[2 * k]))) |
             (static_cast<uint32_t>(bits_of(narrow<X>(in[2 * k + 1]))) << 16);
    }
  } else if constexpr (sizeof(X) == 4) {
#pragma unroll
    for (int k = 0; k < kWords32; ++k) w[k] = static_cast<uint32_t>(bits_of(narrow<X>(in[k])));
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const uint64_t b = bits_of(narrow<X>(in[k]));
      w[2 * k] = static_cast<uint32_t>(b);
      w[2 * k + 1] = static_cast<uint32_t>(b >> 32);
    }
  }
  uint4* dst = reinterpret_cast<uint4*>(static_cast<X*>(base) + i);
#pragma unroll
  for (int k = 0; k < kWords32 / 4; ++k) {
    // __stwb: a plain (write-back) 128-bit global store that the optimizer cannot split.
    __stwb(dst + k, make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]));
  }
}

template <typename X, typename O>
KK_DEV O load_one(const void* base, int64_t off) {
  return widen<O>(static_cast<const X*>(base)[off]);
}

template <typename X, typename O>
KK_DEV void store_one(void* base, int64_t off, O v) {
  static_cast<X*>(base)[off] = narrow<X>(v);
}

// ---------------------------------------------------------------- fixed-order reductions
// A double sum with the rounding error of every addition carried alongside (Neumaier's
// TwoSum), so long sums of float terms, and double sums for float64 hosts, stay within about
// one rounding of exact. Fixed order: the result depends only on the order of add() calls.
struct CompensatedSum {
  double sum = 0.0, err = 0.0;
  KK_DEV void add(double v) {
    const double t = sum + v;
    // an infinite or NaN sum carries no rounding error (inf - inf would make it NaN)
    if (isfinite(t)) err += fabs(sum) >= fabs(v) ? (sum - t) + v : (v - t) + sum;
    sum = t;
  }
  KK_DEV void add(const CompensatedSum& o) {
    add(o.sum);
    err += o.err;
  }
  KK_DEV double value() const { return isfinite(sum) ? sum + err : sum; }
};

KK_DEV double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

KK_DEV CompensatedSum warp_sum(CompensatedSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double other_sum = __shfl_xor_sync(0xffffffffu, v.sum, o);
    const double other_err = __shfl_xor_sync(0xffffffffu, v.err, o);
    // both lanes of a pair must compute the same bits: add the lower lane's value first.
    // Selected field by field: selecting whole structs put them in local memory, which cost
    // more traffic than a short block's elements.
    const bool lower = (threadIdx.x & o) == 0;
    CompensatedSum r;
    r.sum = lower ? v.sum : other_sum;
    r.err = lower ? v.err : other_err;
    r.add(lower ? other_sum : v.sum);
    r.err += lower ? other_err : v.err;
    v = r;
  }
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024) of each thread's double or
// CompensatedSum, in a fixed order; the result is valid in thread 0. `scratch` holds 32
// doubles of shared memory.
template <typename V>
KK_DEV double block_sum(V v, double* scratch) {
  constexpr bool kCompensated = std::is_same_v<V, CompensatedSum>;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __shared__ double err_scratch[32];
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
    if constexpr (kCompensated) {
      scratch[warp] = v.sum;
      err_scratch[warp] = v.err;
    } else {
      scratch[warp] = v;
    }
  }
  __syncthreads();
  V r{};
  if (warp == 0) {
    if constexpr (kCompensated) {
      if (lane < nwarps) {
        r.sum = scratch[lane];
        r.err = err_scratch[lane];
      }
    } else {
      r = lane < nwarps ? scratch[lane] : 0.0;
    }
    r = warp_sum(r);
  }
  if constexpr (kCompensated) {
    return r.value();
  } else {
    return r;
  }
}

// ---------------------------------------------------------------- weights
// The per-element weight of each blend, from the raw alpha (and gate) values, exactly as the
// CPU kernels compute it (kk::cpu::blend_add, blend_gate, blend_multiply, the valve).
KK_DEV double blend_weight(BlendOp op, DType host, DType promoted, double a, double g) {
  switch (op) {
    case BlendOp::kAdd:
      return round_to(host, kk::clamp01(a));
    case BlendOp::kGate:
      return round_to(host, kk::clamp01(round_to(promoted, kk::clamp01(a) * kk::clamp01(g))));
    case BlendOp::kMultiply:
      return kk::clamp01(round_to(host, a));
    case BlendOp::kValve:
      return round_to(host, kk::clamp01(a));
    default:
      return 0.0;
  }
}

}  // namespace kk::cuda
