// Host-side handling of the small blend weights (alpha, gate) for the CPU kernels: reading
// them in any real dtype, reproducing the reference's casts and clamps exactly, expanding the
// result over the features for TensorIterator, and chaining the per-sample gradient sums
// back through the clamps and casts to each weight's own shape and dtype.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace kk::cpu {

// How a weight broadcasts against the features: one value, one per sample (B,1,...,1), or
// anything else that broadcasts (the slower, per-element path).
enum class WeightForm { kScalar, kPerSample, kGeneral };

WeightForm classify_weight(const at::Tensor& w, const at::Tensor& features);

// Values of a real tensor, row-major over its shape, as doubles (exact for every dtype here).
std::vector<double> read_values(const at::Tensor& t);

// Rounds a double to the precision of `dtype` the way `.to(dtype)` does.
double round_to(at::ScalarType dtype, double v);

// A tensor of `shape` holding `values` (row-major), created in `dtype` on the CPU.
at::Tensor tensor_from_values(const std::vector<double>& values, at::IntArrayRef shape,
                              at::ScalarType dtype);

// The features' compute type: double for double, float otherwise.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Sums `values` laid out over `from_shape` down to `to_shape` (which broadcasts to it).
std::vector<double> sum_to_shape(const std::vector<double>& values, at::IntArrayRef from_shape,
                                 at::IntArrayRef to_shape);

// The iteration order of a TensorIterator whose first output is `t` keeps each sample's
// elements contiguous in linear index: true for dense outputs with the batch dimension
// outermost (NCHW, channels_last, (B,T,C)).
bool batch_outermost(const at::Tensor& t);

}  // namespace kk::cpu
