#include "cpu/weights.h"

#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <c10/util/irange.h>

namespace kk::cpu {

WeightForm classify_weight(const at::Tensor& w, const at::Tensor& features) {
  if (w.numel() == 1) return WeightForm::kScalar;
  if (w.dim() == features.dim() && features.dim() >= 1 && w.size(0) == features.size(0)) {
    bool rest_ones = true;
    for (int64_t d = 1; d < w.dim(); ++d) rest_ones = rest_ones && w.size(d) == 1;
    if (rest_ones) return WeightForm::kPerSample;
  }
  return WeightForm::kGeneral;
}

std::vector<double> read_values(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::vector<double> out(c.numel());
  AT_DISPATCH_ALL_TYPES_AND3(at::kBFloat16, at::kHalf, at::kBool, c.scalar_type(), "read_values", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (const auto i : c10::irange(c.numel())) out[i] = static_cast<double>(p[i]);
  });
  return out;
}

double round_to(at::ScalarType dtype, double v) {
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

at::Tensor tensor_from_values(const std::vector<double>& values, at::IntArrayRef shape,
                              at::ScalarType dtype) {
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_ALL_TYPES_AND3(at::kBFloat16, at::kHalf, at::kBool, dtype, "tensor_from_values", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    for (const auto i : c10::irange(out.numel())) p[i] = static_cast<scalar_t>(values[i]);
  });
  return out;
}

std::vector<double> sum_to_shape(const std::vector<double>& values, at::IntArrayRef from_shape,
                                 at::IntArrayRef to_shape) {
  const int64_t to_numel = c10::multiply_integers(to_shape);
  if (to_numel == static_cast<int64_t>(values.size())) return values;
  std::vector<double> out(to_numel, 0.0);
  if (to_numel == 1) {
    double acc = 0.0;
    for (double v : values) acc += v;
    out[0] = acc;
    return out;
  }
  // General case: map each source index to its destination through broadcast strides.
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

bool batch_outermost(const at::Tensor& t) {
  if (t.dim() == 0 || t.size(0) <= 1 || t.numel() == 0) return true;
  return t.is_non_overlapping_and_dense() && t.stride(0) == t.numel() / t.size(0);
}

}  // namespace kk::cpu
