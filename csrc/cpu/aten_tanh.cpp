#include "cpu/aten_tanh.h"

#include <ATen/Context.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <dlfcn.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace kk::cpu {
namespace {

// vmsTanh(n, a, r, mode) from the MKL linked into libtorch_cpu, looked up at run time so the
// extension loads against any torch build.
using VmsTanh = void (*)(int, const float*, float*, long long);

// The mode ATen passes (ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
constexpr long long kVmlHA = 0x2;
constexpr long long kVmlFtzDazOff = 0x140000;
constexpr long long kVmlErrModeIgnore = 0x100;

VmsTanh resolve_vml() {
  if (!at::globalContext().hasMKL()) return nullptr;
  return reinterpret_cast<VmsTanh>(dlsym(RTLD_DEFAULT, "vmsTanh"));
}

}  // namespace

void aten_tanh_f32(const float* in, float* out, int64_t n) {
  static const VmsTanh vml = resolve_vml();
  if (vml != nullptr) {
    constexpr int64_t kMaxChunk = int64_t(1) << 30;
    for (int64_t begin = 0; begin < n; begin += kMaxChunk) {
      const int64_t len = std::min(kMaxChunk, n - begin);
      vml(static_cast<int>(len), in + begin, out + begin, kVmlHA | kVmlFtzDazOff | kVmlErrModeIgnore);
    }
    return;
  }
  using FVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + FVec::size() <= n; i += FVec::size()) FVec::loadu(in + i).tanh().store(out + i);
  for (; i < n; ++i) out[i] = std::tanh(in[i]);
}

const char* float_tanh_name(FloatTanh mode) {
  return mode == FloatTanh::kTorch ? "torch" : "mixed";
}

bool parse_float_tanh(const std::string& name, FloatTanh& mode) {
  for (FloatTanh m : {FloatTanh::kTorch, FloatTanh::kMixed}) {
    if (name == float_tanh_name(m)) {
      mode = m;
      return true;
    }
  }
  return false;
}

namespace {
FloatTanh default_float_tanh() {
  if (const char* env = std::getenv("KASMINA_KERNELS_FLOAT_TANH")) {
    FloatTanh mode;
    if (parse_float_tanh(env, mode)) return mode;
    TORCH_WARN("KASMINA_KERNELS_FLOAT_TANH must be 'torch' or 'mixed', got '", env,
               "': using the default");
  }
#if defined(__x86_64__) || defined(__i386__)
  const bool intel = __builtin_cpu_is("intel");
#else
  const bool intel = false;
#endif
  return resolve_vml() != nullptr && intel ? FloatTanh::kTorch : FloatTanh::kMixed;
}

std::atomic<FloatTanh>& float_tanh_mode() {
  static std::atomic<FloatTanh> mode{default_float_tanh()};
  return mode;
}
}  // namespace

FloatTanh float_tanh() { return float_tanh_mode().load(std::memory_order_relaxed); }

void set_float_tanh(FloatTanh mode) { float_tanh_mode().store(mode, std::memory_order_relaxed); }

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

float* scratch_row(int64_t n) {
  thread_local std::vector<float> row;
  if (static_cast<int64_t>(row.size()) < n) row.resize(n);
  return row.data();
}

}  // namespace kk::cpu
