// Input checks shared by every device's implementation, so a direct torch.ops.kasmina call
// gets the same clear error as the Python API (which checks first, with friendlier types).
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

namespace kk {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_features(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension");
}

inline void check_same_shape(const char* op, const at::Tensor& h, const char* name,
                             const at::Tensor& s) {
  TORCH_CHECK(h.sizes() == s.sizes(), op, ": ", name, " shape ", s.sizes(),
              " differs from the host shape ", h.sizes());
  TORCH_CHECK(h.device() == s.device(), op, ": ", name, " is on ", s.device(),
              " but the host is on ", h.device());
}

// A weight must broadcast to the features' shape without enlarging it, live on the same
// device (a 0-dim CPU tensor is allowed anywhere), and be real-valued.
inline void check_weight(const char* op, const char* name, const at::Tensor& w,
                         const at::Tensor& features) {
  TORCH_CHECK(!w.is_complex() && w.scalar_type() != at::kBool, op, ": ", name,
              " must be a real number tensor, got ", w.scalar_type());
  TORCH_CHECK(w.device() == features.device() || (w.dim() == 0 && w.device().is_cpu()), op,
              ": ", name, " is on ", w.device(), " but the features are on ", features.device(),
              " (only a 0-dim CPU scalar may differ)");
  bool ok = w.dim() <= features.dim();
  for (int64_t i = 1; ok && i <= w.dim(); ++i) {
    const int64_t ws = w.size(-i), fs = features.size(-i);
    ok = ws == 1 || ws == fs;
  }
  TORCH_CHECK(ok, op, ": ", name, " of shape ", w.sizes(), " does not broadcast to ",
              features.sizes());
}

inline void check_blend(const char* op, const at::Tensor& h, const at::Tensor& s,
                        const at::Tensor& alpha) {
  check_features(op, "host", h);
  check_features(op, "seed", s);
  check_same_shape(op, h, "seed", s);
  check_weight(op, "alpha", alpha, h);
}

inline void check_topology(const at::Tensor& x, c10::string_view topology) {
  if (topology == "cnn") {
    TORCH_CHECK(x.dim() == 4, "gated_pool(topology='cnn') expects (B,C,H,W), got ", x.sizes());
  } else if (topology == "transformer") {
    TORCH_CHECK(x.dim() == 3, "gated_pool(topology='transformer') expects (B,T,C), got ",
                x.sizes());
  } else {
    TORCH_CHECK(false, "unknown topology '", topology, "': expected 'cnn' or 'transformer'");
  }
}

}  // namespace kk
