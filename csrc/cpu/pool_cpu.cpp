// CPU gated pooling (mean over the spatial or sequence axis) and the fused gate network
// (pool -> Linear -> ReLU -> Linear -> Sigmoid). Pooling reads x once with double
// accumulators; the gate MLP is tiny ((B,C) x (C,hidden)) and runs in float32 (float64 for
// double inputs) on the pooled means without rounding them to x's dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "cpu/blend_kernels.h"
#include "cpu/cpu_ops.h"
#include "cpu/weights.h"
#include "ops/checks.h"

namespace kk::cpu {
namespace {

// x viewed as (B, C, H, W) strides; a transformer's (B,T,C) is (B, C, T, 1).
struct PoolView {
  int64_t B, C, H, W;
  int64_t sb, sc, sh, sw;
};


PoolView pool_view(const at::Tensor& x, c10::string_view topology) {
  check_topology(x, topology);
  if (topology == "cnn") {
    return {x.size(0), x.size(1), x.size(2), x.size(3),
            x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  }
  return {x.size(0), x.size(2), x.size(1), 1, x.stride(0), x.stride(2), x.stride(1), 0};
}

// Means over (H, W) as a (B, C) tensor of `out_dtype`, accumulated in double.
template <typename T>
void pool_means(const T* x, const PoolView& v, double* means) {
  const double count = static_cast<double>(v.H * v.W);
  if constexpr (std::is_same_v<T, double>) {
    // float64: compensated sums, one plane at a time (gradcheck and high-precision use)
    at::parallel_for(0, v.B * v.C, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const double* plane = x + (p / v.C) * v.sb + (p % v.C) * v.sc;
        Accumulator acc;
        for (int64_t i = 0; i < v.H; ++i) {
          for (int64_t j = 0; j < v.W; ++j) acc.add(plane[i * v.sh + j * v.sw]);
        }
        means[p] = static_cast<double>(acc.value_ld() / count);
      }
    });
    return;
  }
  if (v.sc == 1 && v.C > 1) {
    // channels_last / (B,T,C): channels are contiguous; accumulate a row of C at a time.
    at::parallel_for(0, v.B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* acc = means + b * v.C;
        std::fill(acc, acc + v.C, 0.0);
        for (int64_t i = 0; i < v.H; ++i) {
          for (int64_t j = 0; j < v.W; ++j) {
            const T* row = x + b * v.sb + i * v.sh + j * v.sw;
            for (int64_t c = 0; c < v.C; ++c) acc[c] += static_cast<double>(row[c]);
          }
        }
        for (int64_t c = 0; c < v.C; ++c) acc[c] /= count;
      }
    });
    return;
  }
  // NCHW and anything else: one (b, c) plane at a time.
  at::parallel_for(0, v.B * v.C, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / v.C, c = p % v.C;
      const T* plane = x + b * v.sb + c * v.sc;
      // rows contiguous along W: float vectors into double lanes; a whole contiguous plane
      // (H*W elements, NCHW) is read as one row
      DoubleLanes lanes;
      double tail = 0.0;
      const bool plane_contiguous = v.sw == 1 && v.sh == v.W;
      const int64_t rows = plane_contiguous ? 1 : v.H;
      const int64_t len = plane_contiguous ? v.H * v.W : v.W;
      for (int64_t i = 0; i < rows; ++i) {
        const T* row = plane + i * v.sh;
        int64_t j = 0;
        if constexpr (kVectorizable<T>) {
          if (v.sw == 1) {
            for (; j + kStep <= len; j += kStep) {
              FVec a, b;
              load2<T>(row + j, a, b);
              lanes.add(a);
              lanes.add(b);
            }
          }
        }
        for (; j < len; ++j) tail += static_cast<double>(row[j * v.sw]);
      }
      Accumulator acc;
      lanes.flush_into(acc);
      acc.add(tail);
      means[p] = static_cast<double>(acc.value_ld()) / count;
    }
  });
}

// Pooled means of x as a (B, C) tensor of `dtype` (rounded once from double sums).
at::Tensor pooled_means(const at::Tensor& x, c10::string_view topology, at::ScalarType dtype) {
  const PoolView v = pool_view(x, topology);
  std::vector<double> means(v.B * v.C, 0.0);
  if (v.H * v.W > 0 && v.B * v.C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_pool", [&] {
      pool_means<scalar_t>(x.const_data_ptr<scalar_t>(), v, means.data());
    });
  } else if (v.H * v.W == 0) {
    std::fill(means.begin(), means.end(), std::nan(""));  // mean over nothing, as torch gives
  }
  return tensor_from_values(means, {v.B, v.C}, dtype);
}

// dx = grad[b, c] / (H*W) broadcast over x's layout, rounded once to x's dtype.
at::Tensor pool_input_grad(const at::Tensor& grad_bc, const at::Tensor& x,
                           c10::string_view topology) {
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const bool cnn = topology == "cnn";
  const int64_t count = cnn ? x.size(2) * x.size(3) : x.size(1);
  const at::Tensor g = cnn ? grad_bc.view({x.size(0), x.size(1), 1, 1}).expand(x.sizes())
                           : grad_bc.view({x.size(0), 1, x.size(2)}).expand(x.sizes());
  auto iter = make_iter({dx}, {g});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_pool_backward", [&] {
    using dx_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "gated_pool_backward", [&] {
      using g_t = scalar_t;
      // float math for a float/half gradient (as torch's mean backward), double for double
      using op_t = std::conditional_t<std::is_same_v<g_t, double> || std::is_same_v<dx_t, double>, double, float>;
      const op_t div = static_cast<op_t>(count);
      iter.for_each(
          [div](char** data, const int64_t* st, int64_t n0, int64_t n1) {
            for (int64_t j = 0; j < n1; ++j) {
              char* out = data[0] + j * st[2];
              const char* in = data[1] + j * st[3];
              for (int64_t i = 0; i < n0; ++i) {
                const op_t gv = static_cast<op_t>(*reinterpret_cast<const g_t*>(in + i * st[1]));
                *reinterpret_cast<dx_t*>(out + i * st[0]) = static_cast<dx_t>(gv / div);
              }
            }
          },
          kGrain);
    });
  });
  return dx;
}

}  // namespace

at::Tensor gated_pool(const at::Tensor& x, c10::string_view topology) {
  return pooled_means(x, topology, x.scalar_type());
}

at::Tensor gated_pool_backward(const at::Tensor& grad, const at::Tensor& x,
                               c10::string_view topology) {
  check_topology(x, topology);
  return pool_input_grad(grad, x, topology);
}

namespace {
// The gate MLP runs in float64 whatever x's dtype: it is (B,C) x (C,hidden), negligible next
// to the pooling pass, and double keeps its single-value outputs (db2) correctly rounded.
constexpr at::ScalarType kGateMath = at::kDouble;

struct GateForward {
  at::Tensor pooled, z1, a1, y;  // all in kGateMath
};

GateForward gate_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                         const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  const auto op = kGateMath;
  GateForward f;
  f.pooled = pooled_means(x, topology, op);
  f.z1 = at::addmm(b1.to(op), f.pooled, w1.to(op).t());
  f.a1 = at::relu(f.z1);
  f.y = at::sigmoid(at::addmm(b2.to(op), f.a1, w2.to(op).t()));
  return f;
}

std::vector<int64_t> gate_shape(const at::Tensor& x, c10::string_view topology) {
  if (topology == "cnn") return {x.size(0), 1, 1, 1};
  return {x.size(0), 1, 1};
}
}  // namespace

at::Tensor gate_network(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  check_topology(x, topology);
  const GateForward f = gate_forward(x, w1, b1, w2, b2, topology);
  return f.y.to(x.scalar_type()).view(gate_shape(x, topology));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_network_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  check_topology(x, topology);
  const auto op = kGateMath;
  const GateForward f = gate_forward(x, w1, b1, w2, b2, topology);
  const at::Tensor gy = grad.reshape({x.size(0), 1}).to(op);
  const at::Tensor dz2 = gy * (1 - f.y) * f.y;  // torch's sigmoid_backward order
  const at::Tensor dw2 = at::mm(dz2.t(), f.a1);
  const at::Tensor db2 = dz2.sum(0);
  // ReLU's gradient is a select, as torch's threshold_backward: a NaN upstream gradient does
  // not leak through units that were off.
  const at::Tensor da1 = at::mm(dz2, w2.to(op));
  const at::Tensor dz1 = at::where(f.z1 <= 0, at::zeros_like(da1), da1);
  const at::Tensor dw1 = at::mm(dz1.t(), f.pooled);
  const at::Tensor db1 = dz1.sum(0);
  const at::Tensor dpooled = at::mm(dz1, w1.to(op));
  return {pool_input_grad(dpooled, x, topology), dw1.to(w1.scalar_type()),
          db1.to(b1.scalar_type()), dw2.to(w2.scalar_type()), db2.to(b2.scalar_type())};
}

}  // namespace kk::cpu
