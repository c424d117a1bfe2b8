#include "cpu/weights.h"

#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <c10/util/irange.h>

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

template <typename M>
std::vector<M> read_values(const at::Tensor& t, at::IntArrayRef shape) {
  if (shape.empty() && t.dim() > 0) shape = t.sizes();
  // the broadcast's strides: 0 along the dimensions `t` is broadcast over
  const auto strides = at::inferExpandGeometry_dimvector(t.sizes(), t.strides(), shape).strides;
  const int64_t dims = static_cast<int64_t>(shape.size());
  std::vector<M> out(c10::multiply_integers(shape));
  // row-major and dense in the broadcast (a per-sample alpha): one linear read
  bool linear = true;
  for (int64_t d = dims - 1, step = 1; d >= 0; step *= shape[d--]) {
    linear = linear && (shape[d] == 1 || strides[d] == step);
  }
  AT_DISPATCH_ALL_TYPES_AND3(at::kBFloat16, at::kHalf, at::kBool, t.scalar_type(), "read_values", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    if (linear) {
      for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<M>(static_cast<double>(p[i]));
      return;
    }
    std::vector<int64_t> index(dims, 0);
    int64_t offset = 0;
    for (M& v : out) {
      v = static_cast<M>(static_cast<double>(p[offset]));
      for (int64_t d = dims - 1; d >= 0; --d) {  // the next index, row-major
        offset += strides[d];
        if (++index[d] < shape[d]) break;
        offset -= strides[d] * shape[d];
        index[d] = 0;
      }
    }
  });
  return out;
}

template <typename M>
at::Tensor tensor_from_values(const M* values, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_ALL_TYPES_AND3(at::kBFloat16, at::kHalf, at::kBool, dtype, "tensor_from_values", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    for (const auto i : c10::irange(out.numel())) {
      p[i] = static_cast<scalar_t>(static_cast<double>(values[i]));
    }
  });
  return out;
}

template std::vector<double> read_values<double>(const at::Tensor&, at::IntArrayRef);
template std::vector<long double> read_values<long double>(const at::Tensor&, at::IntArrayRef);
template at::Tensor tensor_from_values<double>(const double*, at::IntArrayRef, at::ScalarType);
template at::Tensor tensor_from_values<long double>(const long double*, at::IntArrayRef,
                                                    at::ScalarType);

bool batch_outermost(const at::Tensor& t) {
  if (t.dim() == 0 || t.size(0) <= 1 || t.numel() == 0) return true;
  return t.is_non_overlapping_and_dense() && t.stride(0) == t.numel() / t.size(0);
}

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
