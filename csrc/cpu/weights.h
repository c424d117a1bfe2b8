// Host-side handling of the small blend weights (alpha, gate) for the CPU kernels: reading
// them in any real dtype and reproducing the reference's casts exactly.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

// Values of a real tensor broadcast to `shape` (default: its own), row-major, as M (double or
// long double: exact for every dtype here). Reads through the strides: no copy of an expanded
// tensor.
template <typename M = double>
std::vector<M> read_values(const at::Tensor& t, at::IntArrayRef shape = {});

// Rounds a double to the precision of `dtype` the way `.to(dtype)` does (inline: the blends
// call it on every weight value).
inline double round_to(at::ScalarType dtype, double v) {
  switch (dtype) {
    case at::kDouble:
      return v;
    case at::kFloat:
      return static_cast<double>(static_cast<float>(v));
    case at::kBFloat16:
      return static_cast<double>(static_cast<float>(c10::BFloat16(static_cast<float>(v))));
    case at::kHalf:
      return static_cast<double>(static_cast<float>(c10::Half(static_cast<float>(v))));
    default:
      return v;  // integer results never reach here: blends promote to a float dtype
  }
}

// A tensor of `shape` holding `values` (row-major, each rounded to double first, then to
// `dtype`), created in `dtype` on the CPU. M is double or long double.
template <typename M>
at::Tensor tensor_from_values(const M* values, at::IntArrayRef shape, at::ScalarType dtype);

inline at::Tensor tensor_from_values(c10::ArrayRef<double> values, at::IntArrayRef shape,
                                     at::ScalarType dtype) {
  return tensor_from_values(values.data(), shape, dtype);
}

// The iteration order of a TensorIterator whose first output is `t` keeps each sample's
// elements contiguous in linear index: true for dense outputs with the batch dimension
// outermost (NCHW, channels_last, (B,T,C)).
bool batch_outermost(const at::Tensor& t);

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
