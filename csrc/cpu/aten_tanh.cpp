#include "cpu/aten_tanh.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

namespace {
template <typename T>
std::vector<float> build_tanh_table() {
  using FVec = at::vec::Vectorized<float>;
  std::vector<float> table(65536);
  float x[FVec::size()];
  for (int64_t base = 0; base < 65536; base += FVec::size()) {
    for (int64_t k = 0; k < FVec::size(); ++k) {
      T v;
      v.x = static_cast<uint16_t>(base + k);
      x[k] = static_cast<float>(v);
    }
    FVec::loadu(x).tanh().store(table.data() + base);
  }
  return table;
}
}  // namespace

const float* tanh_table_bf16() {
  static const std::vector<float> table = build_tanh_table<c10::BFloat16>();
  return table.data();
}

const float* tanh_table_f16() {
  static const std::vector<float> table = build_tanh_table<c10::Half>();
  return table.data();
}

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
