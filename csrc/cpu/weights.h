// Host-side handling of the small blend weights (alpha, gate) for the CPU kernels: reading
// them in any real dtype, reproducing the reference's casts and clamps exactly, expanding the
// result over the features for TensorIterator, and chaining the per-sample gradient sums
// back through the clamps and casts to each weight's own shape and dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <vector>

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

// Values of a real tensor, row-major over its shape, as doubles (exact for every dtype here).
std::vector<double> read_values(const at::Tensor& t);

// Rounds a double to the precision of `dtype` the way `.to(dtype)` does.
double round_to(at::ScalarType dtype, double v);

// A tensor of `shape` holding `values` (row-major), created in `dtype` on the CPU.
at::Tensor tensor_from_values(c10::ArrayRef<double> values, at::IntArrayRef shape,
                              at::ScalarType dtype);

// Sums `values` laid out over `from_shape` down to `to_shape` (which broadcasts to it).
template <typename V>
std::vector<V> sum_to_shape(const std::vector<V>& values, at::IntArrayRef from_shape,
                            at::IntArrayRef to_shape) {
  const int64_t to_numel = c10::multiply_integers(to_shape);
  if (to_numel == static_cast<int64_t>(values.size())) return values;
  std::vector<V> out(to_numel, V(0));
  if (to_numel == 1) {
    V acc = 0;
    for (V v : values) acc += v;
    out[0] = acc;
    return out;
  }
  // general case: map each source index to its destination through broadcast strides
  const int64_t nd = static_cast<int64_t>(from_shape.size());
  const int64_t offset = nd - static_cast<int64_t>(to_shape.size());
  std::vector<int64_t> dst_stride(nd, 0);
  int64_t running = 1;
  for (int64_t d = static_cast<int64_t>(to_shape.size()) - 1; d >= 0; --d) {
    dst_stride[d + offset] = to_shape[d] == 1 ? 0 : running;
    running *= to_shape[d];
  }
  std::vector<int64_t> idx(nd, 0);
  for (size_t i = 0; i < values.size(); ++i) {
    int64_t dst = 0;
    for (int64_t d = 0; d < nd; ++d) dst += idx[d] * dst_stride[d];
    out[dst] += values[i];
    for (int64_t d = nd - 1; d >= 0; --d) {
      if (++idx[d] < from_shape[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

// The iteration order of a TensorIterator whose first output is `t` keeps each sample's
// elements contiguous in linear index: true for dense outputs with the batch dimension
// outermost (NCHW, channels_last, (B,T,C)).
bool batch_outermost(const at::Tensor& t);

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
