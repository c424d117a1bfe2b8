// CPU gated pooling (mean over the spatial or sequence axis) and the fused gate network
// (pool -> Linear -> ReLU -> Linear -> Sigmoid).
//
// Pooling reads x once, prefetching ahead. float32 values are widened to double as they are
// loaded (each term enters its double sums exactly); bfloat16/float16 terms are summed a few
// at a time in float first, then widened; float64 inputs use compensated long-double sums.
// W is the float vector width. Four loop shapes, picked from x's strides:
//   - positions contiguous (NCHW, a transposed (B,T,C)): one (b, c) plane at a time;
//   - channels contiguous, up to 4W of them (channels_last): one sample at a time, a block of
//     channels held in registers over all positions (2 or 4 position streams for narrow
//     blocks, so the adds do not wait on each other);
//   - channels contiguous, more than 4W ((B,T,C) transformers): one sample at a time, its rows
//     streamed four at a time into C double sums held in L1;
//   - anything else: scalar double sums.
// Every sum has a fixed order that does not depend on how at::parallel_for splits the work.
//
// The backward of a mean is a broadcast: each (b, c) value is rounded once to x's dtype and
// dx is a stride-0 expanded view of those B*C values (no write of x's size).
//
// The gate MLP is tiny ((B,C) x (C,hidden)); it runs in double on the double pooled means,
// single-threaded, hidden-major ((hidden, B) activations), so that every product reads w1 as
// it is: register-tiled GEMMs (small_gemm.cpp) widen w1 into double as they pack it, through
// its strides; no converted copy of w1, no zero-filled scratch, no ATen op per step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/loops.h"
#include "cpu/small_gemm.h"
#include "cpu/vec_io.h"
#include "cpu/weights.h"
#include "ops/checks.h"

namespace kk::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// ---------------------------------------------------------------- views
// x as (B, C) planes of R rows by L positions; the rows are merged into one when they are
// evenly spaced, so a dense NCHW plane, a channels_last sample and a (B,T,C) sequence are
// all a single row. A row of one position has stride 1.
struct PoolView {
  int64_t B, C, R, L;
  int64_t sb, sc, sr, sl;
  int64_t count() const { return R * L; }
};

PoolView pool_view(const at::Tensor& x, c10::string_view topology) {
  check_topology(x, topology);
  int64_t H, W, sh, sw;
  PoolView v{};
  v.B = x.size(0);
  v.sb = x.stride(0);
  if (topology == "cnn") {
    v.C = x.size(1);
    v.sc = x.stride(1);
    H = x.size(2), W = x.size(3), sh = x.stride(2), sw = x.stride(3);
  } else {
    v.C = x.size(2);
    v.sc = x.stride(2);
    H = 1, W = x.size(1), sh = 0, sw = x.stride(1);
  }
  if (W == 1) {
    W = H, sw = sh, H = 1;
  }
  if (H == 1 || sh == W * sw) {
    v.R = 1, v.L = H * W, v.sr = 0, v.sl = sw;
  } else {
    v.R = H, v.L = W, v.sr = sh, v.sl = sw;
  }
  if (v.L == 1) v.sl = 1;
  return v;
}

// ---------------------------------------------------------------- double lanes
constexpr int64_t W = FVec::size();

// The W float values at p, widened (vec_io.h's DLanes)
inline DLanes lanes_of(const float* p) {
  DLanes d;
  d.add(FVec::loadu(p));
  return d;
}

// The lanes' halves added pairwise, in a fixed order
inline double total(const DLanes& d) {
  double s[DVec::size()];
  (d.lo + d.hi).store(s);
  for (int64_t n = DVec::size(); n > 1; n /= 2) {
    for (int64_t k = 0; k < n / 2; ++k) s[k] += s[k + n / 2];
  }
  return s[0];
}

template <typename T>
inline FVec load1(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return FVec::loadu(p);
  } else {
    FVec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

// float terms per lane summed in float before they are widened, for half-precision inputs
constexpr int kHalfBlock = 8;

// Rows elements apart by `sr`, each `L` contiguous values: their sum in double.
template <typename T>
inline double contiguous_plane_sum(const T* plane, int64_t R, int64_t L, int64_t sr) {
  DLanes a, b, a2, b2;  // four accumulators for float, so the adds overlap
  double tail = 0.0;
  for (int64_t r = 0; r < R; ++r) {
    const T* row = plane + r * sr;
    int64_t j = 0;
    if constexpr (std::is_same_v<T, float>) {
      for (; j + 4 * W <= L; j += 4 * W) {
        prefetch_ahead<4 * W * sizeof(T)>(row + j);
        a.add(lanes_of(row + j));
        b.add(lanes_of(row + j + W));
        a2.add(lanes_of(row + j + 2 * W));
        b2.add(lanes_of(row + j + 3 * W));
      }
      for (; j + kStep <= L; j += kStep) {
        a.add(lanes_of(row + j));
        b.add(lanes_of(row + j + W));
      }
    } else {
      // bfloat16/float16: up to kHalfBlock terms per lane summed in float first (exact for
      // all but widely spread magnitudes, and then off by 2^-24 relative, far below the
      // inputs' own precision), then widened: a quarter of the conversions
      while (j + kStep <= L) {
        FVec fa(0.0f), fb(0.0f);
        for (int k = 0; k < kHalfBlock && j + kStep <= L; ++k, j += kStep) {
          F2 u;
          load2<T>(row + j, u);
          fa = fa + u[0];
          fb = fb + u[1];
        }
        a.add(fa);
        b.add(fb);
      }
    }
    if (j + W <= L) {
      a.add(load1<T>(row + j));
      j += W;
    }
    for (; j < L; ++j) tail += static_cast<double>(static_cast<float>(row[j]));
  }
  a.add(a2);
  b.add(b2);
  a.add(b);
  return total(a) + tail;
}

// out[b * C + c] = mean of plane (b, c), for planes [p0, p1), positions contiguous.
template <typename T, typename O>
void planes_contiguous(const T* x, const PoolView& v, int64_t p0, int64_t p1, O* out) {
  const double count = static_cast<double>(v.count());
  int64_t b = p0 / v.C, c = p0 % v.C;
  for (int64_t p = p0; p < p1; ++p) {
    const double sum = contiguous_plane_sum(x + b * v.sb + c * v.sc, v.R, v.L, v.sr);
    out[p] = static_cast<O>(sum / count);
    if (++c == v.C) c = 0, ++b;
  }
}

// Sums over all positions of NV * W contiguous channels starting at `base`, into sums[].
// U position streams keep U independent add chains per lane group.
template <typename T, int NV, int U>
void channel_block_sums(const T* base, const PoolView& v, double* sums) {
  DLanes acc[U][NV];
  for (int64_t r = 0; r < v.R; ++r) {
    const T* row = base + r * v.sr;
    int64_t l = 0;
    if constexpr (std::is_same_v<T, float>) {
      for (; l + U <= v.L; l += U) {
        for (int u = 0; u < U; ++u) {
          const T* pos = row + (l + u) * v.sl;
          prefetch_ahead<NV * W * sizeof(T)>(pos);
          for (int k = 0; k < NV; ++k) acc[u][k].add(lanes_of(pos + W * k));
        }
      }
    } else {
      // half precision: kHalfBlock positions per stream summed in float, then widened
      while (l + U <= v.L) {
        FVec f[U][NV];
        for (int u = 0; u < U; ++u) {
          for (int k = 0; k < NV; ++k) f[u][k] = FVec(0.0f);
        }
        for (int step = 0; step < kHalfBlock && l + U <= v.L; ++step, l += U) {
          for (int u = 0; u < U; ++u) {
            const T* pos = row + (l + u) * v.sl;
            for (int k = 0; k < NV; ++k) f[u][k] = f[u][k] + load1<T>(pos + W * k);
          }
        }
        for (int u = 0; u < U; ++u) {
          for (int k = 0; k < NV; ++k) acc[u][k].add(f[u][k]);
        }
      }
    }
    for (; l < v.L; ++l) {
      const T* pos = row + l * v.sl;
      for (int k = 0; k < NV; ++k) acc[0][k].add(load1<T>(pos + W * k));
    }
  }
  for (int u = 1; u < U; ++u) {
    for (int k = 0; k < NV; ++k) acc[0][k].add(acc[u][k]);
  }
  for (int k = 0; k < NV; ++k) {
    acc[0][k].lo.store(sums + W * k);
    acc[0][k].hi.store(sums + W * k + DVec::size());
  }
}

// Means of one sample whose channels are contiguous (sc == 1).
template <typename T, typename O>
void sample_channels_contiguous(const T* x, const PoolView& v, int64_t b, O* out) {
  const double count = static_cast<double>(v.count());
  const T* sample = x + b * v.sb;
  O* o = out + b * v.C;
  if (v.C > 4 * W) {
    // wide rows ((B,T,C) transformers): stream the rows in order into C double sums held in
    // L1, rather than walk the rows once per channel block. Four rows at a time: each
    // W-channel chunk of the four is summed in registers, (r0 + r1) + (r2 + r3), before it
    // meets its sum in L1, so those sums are loaded and stored once per four rows
    std::vector<double> acc(v.C, 0.0);
    double* a = acc.data();
    const int64_t rows = v.R * v.L;
    auto row_at = [&](int64_t i) { return sample + (i / v.L) * v.sr + (i % v.L) * v.sl; };
    auto term = [](T value) { return static_cast<double>(static_cast<float>(value)); };
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) {
      const T* r0 = row_at(i);
      const T* r1 = row_at(i + 1);
      const T* r2 = row_at(i + 2);
      const T* r3 = row_at(i + 3);
      // the next group's rows, prefetched while this group is summed (the rows of a group
      // are C values apart, so a prefetch a fixed distance ahead of each would fetch the
      // group's own later rows)
      const bool ahead = i + 8 <= rows;
      const T* n0 = ahead ? row_at(i + 4) : r0;
      const T* n1 = ahead ? row_at(i + 5) : r1;
      const T* n2 = ahead ? row_at(i + 6) : r2;
      const T* n3 = ahead ? row_at(i + 7) : r3;
      int64_t c = 0;
      for (; c + W <= v.C; c += W) {
        if ((c * sizeof(T)) % 64 == 0) {
          __builtin_prefetch(n0 + c);
          __builtin_prefetch(n1 + c);
          __builtin_prefetch(n2 + c);
          __builtin_prefetch(n3 + c);
        }
        DLanes sum;
        if constexpr (std::is_same_v<T, float>) {
          sum = lanes_of(r0 + c);
          sum.add(lanes_of(r1 + c));
          DLanes s23 = lanes_of(r2 + c);
          s23.add(lanes_of(r3 + c));
          sum.add(s23);
        } else {
          // bfloat16/float16: the four terms summed in float first (exact unless their
          // magnitudes spread widely, as in contiguous_plane_sum), then widened once
          sum.add((load1<T>(r0 + c) + load1<T>(r1 + c)) + (load1<T>(r2 + c) + load1<T>(r3 + c)));
        }
        sum.add_into(a + c);
      }
      for (; c < v.C; ++c) a[c] += (term(r0[c]) + term(r1[c])) + (term(r2[c]) + term(r3[c]));
    }
    for (; i < rows; ++i) {
      const T* row = row_at(i);
      int64_t c = 0;
      for (; c + W <= v.C; c += W) {  // the last rows % 4 rows: no hot path
        DLanes d;
        d.add(load1<T>(row + c));
        d.add_into(a + c);
      }
      for (; c < v.C; ++c) a[c] += term(row[c]);
    }
    for (int64_t c = 0; c < v.C; ++c) o[c] = static_cast<O>(a[c] / count);
    return;
  }
  double sums[4 * W];
  int64_t c = 0;
  auto emit = [&](int64_t n) {
    for (int64_t k = 0; k < n; ++k) o[c + k] = static_cast<O>(sums[k] / count);
    c += n;
  };
  for (; c + 4 * W <= v.C;) {
    channel_block_sums<T, 4, 1>(sample + c, v, sums);
    emit(4 * W);
  }
  if (c + 2 * W <= v.C) {
    channel_block_sums<T, 2, 2>(sample + c, v, sums);
    emit(2 * W);
  }
  if (c + W <= v.C) {
    channel_block_sums<T, 1, 4>(sample + c, v, sums);
    emit(W);
  }
  for (; c < v.C; ++c) {  // the last C % W channels
    double s = 0.0;
    for (int64_t r = 0; r < v.R; ++r) {
      for (int64_t l = 0; l < v.L; ++l) {
        s += static_cast<double>(static_cast<float>(sample[c + r * v.sr + l * v.sl]));
      }
    }
    o[c] = static_cast<O>(s / count);
  }
}

// Elements per parallel task, about.
constexpr int64_t kTaskElems = 32768;

// out[b * C + c] = mean over the positions of plane (b, c), as O. Needs R * L > 0.
template <typename T, typename O>
void pool_means(const T* x, const PoolView& v, O* out) {
  const int64_t planes = v.B * v.C;
  const int64_t n = v.count();
  const int64_t grain = std::max<int64_t>(1, kTaskElems / n);
  if constexpr (!std::is_same_v<T, double>) {
    if (v.sl == 1) {
      at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
        planes_contiguous<T, O>(x, v, p0, p1, out);
      });
      return;
    }
    if (v.sc == 1) {
      at::parallel_for(0, v.B, std::max<int64_t>(1, grain / v.C), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) sample_channels_contiguous<T, O>(x, v, b, out);
      });
      return;
    }
  }
  // float64 (compensated long-double sums, for gradcheck and high-precision use) and any
  // other strides (double sums): one plane at a time
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    int64_t b = p0 / v.C, c = p0 % v.C;
    for (int64_t p = p0; p < p1; ++p) {
      const T* plane = x + b * v.sb + c * v.sc;
      Compensated<long double> acc;
      double sum = 0.0;
      for (int64_t r = 0; r < v.R; ++r) {
        for (int64_t l = 0; l < v.L; ++l) {
          const T e = plane[r * v.sr + l * v.sl];
          if constexpr (std::is_same_v<T, double>) {
            acc.add(e);
          } else {
            sum += static_cast<double>(static_cast<float>(e));
          }
        }
      }
      if constexpr (std::is_same_v<T, double>) {
        const long double mean = acc.value() / static_cast<long double>(n);
        out[p] = static_cast<O>(std::is_same_v<O, long double> ? mean : static_cast<double>(mean));
      } else {
        out[p] = static_cast<O>(sum / static_cast<double>(n));
      }
      if (++c == v.C) c = 0, ++b;
    }
  });
}

// Pooled means of x into out[B * C] (O = x's dtype or double); NaN for a mean over nothing.
template <typename O>
void pooled_means_into(const at::Tensor& x, const PoolView& v, O* out) {
  if (v.B * v.C == 0) return;
  if (v.count() == 0) {
    std::fill(out, out + v.B * v.C, static_cast<O>(std::nan("")));  // as torch gives
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_pool", [&] {
    pool_means<scalar_t, O>(x.const_data_ptr<scalar_t>(), v, out);
  });
}

// ---------------------------------------------------------------- backward broadcast
// dx[b, c, ...] = grad(b, c) / count, computed in float for a float/half gradient into a
// float/half dx (as torch's mean backward), in double otherwise, rounded once to x's dtype.
// `grad_at(b, c)` gives the gradient as G. dx is returned as a stride-0 broadcast of the B*C
// values over the pooled positions, as torch's own sum backward returns its gradient: the
// backward of a mean writes B*C values instead of a tensor of x's size, and whatever consumes
// dx (the autograd engine adding it to h's other gradient, AccumulateGrad for a leaf) reads it
// in its own pass.
template <typename G, typename GradAt>
at::Tensor pool_input_grad(const at::Tensor& x, c10::string_view topology, GradAt&& grad_at) {
  if (x.numel() == 0) return at::empty_like(x);
  const PoolView v = pool_view(x, topology);
  const bool cnn = topology == "cnn";
  const auto contiguous = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor vals = cnn ? at::empty({v.B, v.C, 1, 1}, contiguous) : at::empty({v.B, 1, v.C}, contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_pool_backward", [&] {
    using dx_t = scalar_t;
    using op_t = std::conditional_t<
        std::is_same_v<G, long double>, long double,
        std::conditional_t<std::is_same_v<G, double> || std::is_same_v<dx_t, double>, double, float>>;
    const op_t div = static_cast<op_t>(v.count());
    dx_t* out = vals.data_ptr<dx_t>();
    for (int64_t b = 0; b < v.B; ++b) {
      for (int64_t c = 0; c < v.C; ++c) {
        const op_t q = static_cast<op_t>(grad_at(b, c)) / div;
        if constexpr (std::is_same_v<op_t, long double>) {
          out[b * v.C + c] = static_cast<dx_t>(static_cast<double>(q));
        } else {
          out[b * v.C + c] = static_cast<dx_t>(q);
        }
      }
    }
  });
  return vals.expand(x.sizes());
}

}  // namespace

at::Tensor gated_pool(const at::Tensor& x, c10::string_view topology) {
  const PoolView v = pool_view(x, topology);
  at::Tensor out = at::empty({v.B, v.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_pool", [&] {
    pooled_means_into<scalar_t>(x, v, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor gated_pool_backward(const at::Tensor& grad, const at::Tensor& x,
                               c10::string_view topology) {
  const PoolView v = pool_view(x, topology);
  TORCH_CHECK(grad.numel() == v.B * v.C, "gated_pool_backward: grad has ", grad.numel(),
              " elements, expected ", v.B * v.C);
  TORCH_CHECK(grad.is_floating_point(), "gated_pool_backward: grad must be floating point");
  const at::Tensor g = grad.reshape({v.B, v.C});
  at::Tensor dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "gated_pool_backward", [&] {
    using g_t = scalar_t;
    const g_t* gp = g.const_data_ptr<g_t>();
    const int64_t s0 = g.stride(0), s1 = g.stride(1);
    dx = pool_input_grad<g_t>(x, topology, [&](int64_t b, int64_t c) { return gp[b * s0 + c * s1]; });
  });
  return dx;
}

// ---------------------------------------------------------------- gate network
namespace {

void check_gate_weights(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  check_topology(x, topology);
  const int64_t C = topology == "cnn" ? x.size(1) : x.size(2);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, "gate_network: w1 has shape ", w1.sizes(),
              ", expected (hidden, ", C, ")");
  const int64_t hidden = w1.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == hidden, "gate_network: b1 has shape ", b1.sizes(),
              ", expected (", hidden, ",)");
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == 1 && w2.size(1) == hidden,
              "gate_network: w2 has shape ", w2.sizes(), ", expected (1, ", hidden, ")");
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == 1, "gate_network: b2 has shape ", b2.sizes(),
              ", expected (1,)");
  for (const at::Tensor* t : {&w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->is_floating_point() && t->device().is_cpu(),
                "gate_network: weights must be floating-point CPU tensors");
  }
}

// f.template operator()<M>() with the MLP's math type M: double for float32/bfloat16/float16 (far
// below their rounding), long double when x or a weight is float64 (so a float64 call stays
// within an ulp or so of a long-double oracle, below eager float64's own rounding).
template <typename F>
auto with_gate_math(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology, F&& f) {
  check_gate_weights(x, w1, b1, w2, b2, topology);
  for (const at::Tensor* t : {&x, &w1, &b1, &w2, &b2}) {
    if (t->scalar_type() == at::kDouble) return f.template operator()<long double>();
  }
  return f.template operator()<double>();
}

// Values every one of which is written before it is read: no zero fill (a std::vector's costs
// a store per element, several hundred KB per call for the (hidden, C) ones).
template <typename M>
using Scratch = std::unique_ptr<M[]>;

template <typename M>
Scratch<M> scratch(int64_t n) {
  return std::make_unique_for_overwrite<M[]>(static_cast<size_t>(n));
}

// f(w1's data pointer, in w1's own dtype)
template <typename F>
void with_w1(const at::Tensor& w1, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w1.scalar_type(), "gate_network", [&] {
    f(w1.const_data_ptr<scalar_t>());
  });
}

// The forward in M, hidden-major so that every product reads w1 as it is: pooled (B, C) and
// its transpose (C, B), z1t and a1t (H, B), y (B); w2 for the backward (w1 is read by the
// products themselves, in its own dtype).
template <typename M>
struct GateForward {
  int64_t B, C, H;
  std::vector<M> w2;
  Scratch<M> pooled, pooled_t, z1t, a1t;
  std::vector<M> y;
};

template <typename M>
GateForward<M> gate_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  const PoolView v = pool_view(x, topology);
  const int64_t B = v.B, C = v.C, H = w1.size(0);
  const std::vector<M> bias1 = read_values<M>(b1), bias2 = read_values<M>(b2);
  GateForward<M> f{B, C, H, read_values<M>(w2)};
  f.pooled = scratch<M>(B * C);
  f.pooled_t = scratch<M>(B * C);
  f.z1t = scratch<M>(H * B);
  f.a1t = scratch<M>(H * B);
  f.y.resize(B);
  pooled_means_into<M>(x, v, f.pooled.get());
  // eight samples at a time, so each line of pooled_t is written whole
  for (int64_t b0 = 0; b0 < B; b0 += 8) {
    const int64_t b_end = std::min(B, b0 + 8);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t b = b0; b < b_end; ++b) f.pooled_t[c * B + b] = f.pooled[b * C + c];
    }
  }
  // z1^T = b1 + w1 . pooled^T
  with_w1(w1, [&](const auto* w1p) {
    small_gemm<M>(H, C, B, w1p, w1.stride(0), w1.stride(1), f.pooled_t.get(), bias1.data(),
                  nullptr, f.z1t.get());
  });
  for (int64_t j = 0; j < H * B; ++j) {
    const M z = f.z1t[j];
    f.a1t[j] = std::isnan(z) ? z : std::max(z, M(0));  // relu keeps NaN, as at::relu
  }
  for (int64_t b = 0; b < B; ++b) {
    M z2 = bias2[0];
    for (int64_t j = 0; j < H; ++j) z2 += f.a1t[j * B + b] * f.w2[j];
    f.y[b] = M(1) / (M(1) + std::exp(-z2));
  }
  return f;
}

template <typename M>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_network_backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  const GateForward<M> f = gate_forward<M>(x, w1, b1, w2, b2, topology);
  const int64_t B = f.B, C = f.C, H = f.H;
  TORCH_CHECK(grad.numel() == B, "gate_network_backward: grad has ", grad.numel(),
              " elements, expected ", B);
  const std::vector<M> gy = read_values<M>(grad);
  std::vector<M> db1(H, M(0)), dw2(H, M(0));
  Scratch<M> dw1 = scratch<M>(H * C), dpooled_t = scratch<M>(C * B), dz1t = scratch<M>(H * B);
  M db2 = 0;
  for (int64_t b = 0; b < B; ++b) {
    const M y = f.y[b];
    const M dz2 = gy[b] * (1 - y) * y;  // torch's sigmoid_backward order
    db2 += dz2;
    for (int64_t j = 0; j < H; ++j) {
      dw2[j] += dz2 * f.a1t[j * B + b];
      // ReLU's gradient is a select, as torch's threshold_backward: a NaN upstream gradient
      // does not leak through units that were off
      const M d = f.z1t[j * B + b] <= 0 ? M(0) : dz2 * f.w2[j];
      dz1t[j * B + b] = d;
      db1[j] += d;
    }
  }
  // dw1 = dz1^T . pooled; dpooled^T = w1^T . dz1^T
  small_gemm<M>(H, B, C, dz1t.get(), B, 1, f.pooled.get(), nullptr, nullptr, dw1.get());
  with_w1(w1, [&](const auto* w1p) {
    small_gemm<M>(C, H, B, w1p, w1.stride(1), w1.stride(0), dz1t.get(), nullptr, nullptr,
                  dpooled_t.get());
  });
  at::Tensor dx = pool_input_grad<M>(x, topology, [&](int64_t b, int64_t c) { return dpooled_t[c * B + b]; });
  return {dx, tensor_from_values(dw1.get(), w1.sizes(), w1.scalar_type()),
          tensor_from_values(db1.data(), b1.sizes(), b1.scalar_type()),
          tensor_from_values(dw2.data(), w2.sizes(), w2.scalar_type()),
          tensor_from_values(&db2, b2.sizes(), b2.scalar_type())};
}

}  // namespace

at::Tensor gate_network(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  return with_gate_math(x, w1, b1, w2, b2, topology, [&]<typename M>() {
    const GateForward<M> f = gate_forward<M>(x, w1, b1, w2, b2, topology);
    const auto shape = topology == "cnn" ? std::vector<int64_t>{f.B, 1, 1, 1}
                                         : std::vector<int64_t>{f.B, 1, 1};
    return tensor_from_values(f.y.data(), shape, x.scalar_type());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_network_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  return with_gate_math(x, w1, b1, w2, b2, topology, [&]<typename M>() {
    return gate_network_backward_impl<M>(grad, x, w1, b1, w2, b2, topology);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu

