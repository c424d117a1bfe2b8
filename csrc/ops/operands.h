// How every device's kernels read mixed-dtype operands, shared by the CPU code and the CUDA
// glue: the seed (and seed_input) in its own dtype when that is the host's, or float32 beside
// a bfloat16/float16 host (cast inside the kernel, no extra pass); m of the valve in its own
// dtype when that is the result's, or a half type beside a float32 result. Any other pairing
// is cast here, which the reference does too, so the values are the same.
#pragma once

#include <ATen/ATen.h>

namespace kk {

inline bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

inline at::Tensor kernel_operand(const at::Tensor& x, at::ScalarType host) {
  if (x.scalar_type() == host) return x;
  if (x.scalar_type() == at::kFloat && is_half(host)) return x;
  return x.to(host);
}

inline at::Tensor valve_operand(const at::Tensor& m, at::ScalarType result) {
  if (m.scalar_type() == result) return m;
  if (result == at::kFloat && is_half(m.scalar_type())) return m;
  return m.to(result);
}

}  // namespace kk
