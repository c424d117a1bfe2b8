// CPU implementations of the blend family: ADD, GATE, MULTIPLY, STE, the valve multiplier
// and the gate's effective alpha, forward and backward. Each forward is one TensorIterator
// pass; each backward is one pass writing every feature gradient plus per-sample partial
// sums for alpha/gate, finished on the host by a fixed-order reduction.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

#include "cpu/blend_kernels.h"
#include "cpu/cpu_ops.h"
#include "cpu/weights.h"
#include "ops/checks.h"

namespace kk::cpu {
namespace {

bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// The seed as the kernels read it: its own dtype when that is the host's (or float beside a
// half host, cast inside the kernel); any other combination is cast here, which the reference
// does too (s.to(h.dtype)), so the values are the same.
at::Tensor kernel_operand(const at::Tensor& x, at::ScalarType host) {
  if (x.scalar_type() == host) return x;
  if (x.scalar_type() == at::kFloat && is_half(host)) return x;
  return x.to(host);
}

// Calls f(Tag<T>, Tag<S>) for the supported (host, seed) dtype pairs.
template <typename F>
void dispatch_pair(at::ScalarType host, at::ScalarType seed, const char* name, F&& f) {
  switch (host) {
    case at::kDouble:
      return f(Tag<double>{}, Tag<double>{});
    case at::kFloat:
      return f(Tag<float>{}, Tag<float>{});
    case at::kBFloat16:
      if (seed == at::kFloat) return f(Tag<c10::BFloat16>{}, Tag<float>{});
      return f(Tag<c10::BFloat16>{}, Tag<c10::BFloat16>{});
    case at::kHalf:
      if (seed == at::kFloat) return f(Tag<c10::Half>{}, Tag<float>{});
      return f(Tag<c10::Half>{}, Tag<c10::Half>{});
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", host,
                  " (expected float32, float64, bfloat16 or float16)");
  }
}

// The weight as one value per element of `values_shape`, expanded over the features.
at::Tensor expanded_weight(const std::vector<double>& values, at::IntArrayRef values_shape,
                           const at::Tensor& features) {
  at::Tensor w = tensor_from_values(values, values_shape, opmath_dtype(features.scalar_type()));
  return w.expand(features.sizes());
}

// How the backward reduces the weight's gradient for one launch.
struct ReducePlan {
  bool element = false;  // per-element output, then summed to the weight's shape
  int64_t groups = 1;    // otherwise: fixed-order sums over this many contiguous groups
  int64_t group_size = 0;
};

ReducePlan plan_reduction(at::IntArrayRef weight_shape, const at::Tensor& features,
                          const at::Tensor& first_output) {
  ReducePlan plan;
  const int64_t n = features.numel();
  const int64_t wnumel = c10::multiply_integers(weight_shape);
  if (wnumel == 1) {
    plan.group_size = n;
    return plan;
  }
  const bool per_sample = static_cast<int64_t>(weight_shape.size()) == features.dim() &&
                          weight_shape[0] == features.size(0) && wnumel == features.size(0);
  if (per_sample && batch_outermost(first_output)) {
    plan.groups = features.size(0);
    plan.group_size = plan.groups == 0 ? 0 : n / plan.groups;
    return plan;
  }
  plan.element = true;
  return plan;
}

// Runs a backward iterator block by block. MakeLoop(kElement)(acc) gives the loop.
template <typename LoopFor>
std::vector<double> run_backward(at::TensorIterator& iter, const ReducePlan& plan,
                                 LoopFor&& loop_for) {
  return grouped_sums(plan.groups, plan.group_size, [&](int64_t begin, int64_t end) {
    double acc = 0.0;
    auto loop = loop_for(acc);
    iter.serial_for_each(loop, {begin, end});
    return acc;
  });
}

// Sums of the weight gradient over the weight's shape, from either form of the plan.
std::vector<double> weight_grad_sums(const ReducePlan& plan, const std::vector<double>& group_sums,
                                     const at::Tensor& element_grad, at::IntArrayRef weight_shape) {
  if (plan.element) return read_values(at::sum_to(element_grad, weight_shape));
  return group_sums;
}

std::vector<double> clamp_values(std::vector<double> v) {
  for (double& x : v) x = clamp01(x);
  return v;
}

// One blend gradient pass (ADD or GATE): returns dh, ds and the weight gradient summed to
// `weight_shape` (zeros when not needed).
std::tuple<at::Tensor, at::Tensor, std::vector<double>> lerp_backward_pass(
    const at::Tensor& grad_in, const at::Tensor& h, const at::Tensor& s_in,
    const at::Tensor& w, at::IntArrayRef weight_shape) {
  const auto host = h.scalar_type();
  const at::Tensor g = grad_in.to(host);
  const at::Tensor s = kernel_operand(s_in, host);
  at::Tensor dh = at::empty_like(h);
  at::Tensor ds = at::empty_like(s);
  const ReducePlan plan = plan_reduction(weight_shape, h, dh);
  at::Tensor dwe;
  std::vector<double> sums;
  if (h.numel() > 0) {
    dispatch_pair(host, s.scalar_type(), "blend backward", [&](auto tt, auto st) {
      using T = typename decltype(tt)::type;
      using S = typename decltype(st)::type;
      if (plan.element) {
        dwe = at::empty(h.sizes(), h.options().dtype(opmath_dtype(host)));
        auto iter = make_iter({dh, ds, dwe}, {g, h, s, w});
        sums = run_backward(iter, plan, [](double& a) { return lerp_backward_loop<T, S, true>(a); });
      } else {
        auto iter = make_iter({dh, ds}, {g, h, s, w});
        sums = run_backward(iter, plan, [](double& a) { return lerp_backward_loop<T, S, false>(a); });
      }
    });
  } else {
    sums.assign(plan.groups, 0.0);
    if (plan.element) dwe = at::zeros(h.sizes(), h.options().dtype(opmath_dtype(host)));
  }
  std::vector<double> wsums = weight_grad_sums(plan, sums, dwe, weight_shape);
  if (static_cast<int64_t>(wsums.size()) != c10::multiply_integers(weight_shape)) {
    wsums = sum_to_shape(wsums, {static_cast<int64_t>(wsums.size())}, weight_shape);
  }
  if (ds.scalar_type() != s_in.scalar_type()) ds = ds.to(s_in.scalar_type());
  return {dh, ds, wsums};
}

at::Tensor lerp_forward_pass(const at::Tensor& h, const at::Tensor& s_in, const at::Tensor& w) {
  const auto host = h.scalar_type();
  const at::Tensor s = kernel_operand(s_in, host);
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  dispatch_pair(host, s.scalar_type(), "blend", [&](auto tt, auto st) {
    using T = typename decltype(tt)::type;
    using S = typename decltype(st)::type;
    auto iter = make_iter({out}, {h, s, w});
    lerp_forward<T, S>(iter);
  });
  return out;
}

// Effective alpha of GATE per element of the broadcast (alpha, gate) shape, as the reference
// computes it: clamp01(clamp01(alpha) * clamp01(gate)) in the promoted dtype.
struct GateWeights {
  std::vector<int64_t> shape;
  std::vector<double> a, g, e;  // alpha and gate broadcast to `shape`, and the effective alpha
  at::ScalarType promoted;
};

GateWeights gate_weights(const at::Tensor& alpha, const at::Tensor& gate) {
  GateWeights gw;
  gw.shape = at::infer_size(alpha.sizes(), gate.sizes());
  gw.promoted = at::result_type(alpha, gate);
  gw.a = read_values(alpha.expand(gw.shape));
  gw.g = read_values(gate.expand(gw.shape));
  gw.e.resize(gw.a.size());
  for (size_t i = 0; i < gw.a.size(); ++i) {
    gw.e[i] = clamp01(round_to(gw.promoted, clamp01(gw.a[i]) * clamp01(gw.g[i])));
  }
  return gw;
}

// Chains d(effective alpha) back to alpha and gate: through the outer clamp (on the rounded
// product), the product, and each inner clamp; summed to each input's own shape.
std::pair<at::Tensor, at::Tensor> gate_weights_backward(const GateWeights& gw,
                                                        const std::vector<double>& de,
                                                        const at::Tensor& alpha,
                                                        const at::Tensor& gate) {
  std::vector<double> da(de.size()), dg(de.size());
  for (size_t i = 0; i < de.size(); ++i) {
    const double ca = clamp01(gw.a[i]), cg = clamp01(gw.g[i]);
    const double p = round_to(gw.promoted, ca * cg);
    const double dp = clamp01_passes_grad(p) ? de[i] : 0.0;
    da[i] = clamp01_passes_grad(gw.a[i]) ? dp * cg : 0.0;
    dg[i] = clamp01_passes_grad(gw.g[i]) ? dp * ca : 0.0;
  }
  return {tensor_from_values(sum_to_shape(da, gw.shape, alpha.sizes()), alpha.sizes(),
                             alpha.scalar_type()),
          tensor_from_values(sum_to_shape(dg, gw.shape, gate.sizes()), gate.sizes(),
                             gate.scalar_type())};
}

// d(alpha) for a weight w = f(clamp01(alpha)): the clamp's mask on `masked_on`.
at::Tensor masked_weight_grad(const std::vector<double>& dw, const std::vector<double>& masked_on,
                              const at::Tensor& alpha) {
  std::vector<double> da(dw.size());
  for (size_t i = 0; i < dw.size(); ++i) da[i] = clamp01_passes_grad(masked_on[i]) ? dw[i] : 0.0;
  return tensor_from_values(da, alpha.sizes(), alpha.scalar_type());
}

std::vector<double> rounded(std::vector<double> v, at::ScalarType dtype) {
  for (double& x : v) x = round_to(dtype, x);
  return v;
}

}  // namespace

// ---------------------------------------------------------------- ADD
at::Tensor blend_add(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha) {
  check_blend("blend_add", h, s, alpha);
  // w = clamp01(alpha) cast to h's dtype
  const auto w = rounded(clamp_values(read_values(alpha)), h.scalar_type());
  return lerp_forward_pass(h, s, expanded_weight(w, alpha.sizes(), h));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_add_backward(const at::Tensor& grad,
                                                                 const at::Tensor& h,
                                                                 const at::Tensor& s,
                                                                 const at::Tensor& alpha,
                                                                 bool need_alpha_grad) {
  const auto a = read_values(alpha);
  const auto w = rounded(clamp_values(a), h.scalar_type());
  auto [dh, ds, dw] = lerp_backward_pass(grad, h, s, expanded_weight(w, alpha.sizes(), h),
                                         alpha.sizes());
  at::Tensor dalpha = need_alpha_grad ? masked_weight_grad(dw, a, alpha) : at::zeros(alpha.sizes(), alpha.options());
  return {dh, ds, dalpha};
}

// ---------------------------------------------------------------- GATE
at::Tensor blend_gate(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                      const at::Tensor& gate) {
  check_blend("blend_gate", h, s, alpha);
  check_weight("blend_gate", "gate", gate, h);
  const GateWeights gw = gate_weights(alpha, gate);
  return lerp_forward_pass(h, s, expanded_weight(rounded(gw.e, h.scalar_type()), gw.shape, h));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_gate_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const at::Tensor& gate, bool need_weight_grads) {
  const GateWeights gw = gate_weights(alpha, gate);
  auto [dh, ds, de] = lerp_backward_pass(
      grad, h, s, expanded_weight(rounded(gw.e, h.scalar_type()), gw.shape, h), gw.shape);
  if (!need_weight_grads) return {dh, ds, at::zeros(alpha.sizes(), alpha.options()), at::zeros(gate.sizes(), gate.options())};
  auto [dalpha, dgate] = gate_weights_backward(gw, de, alpha, gate);
  return {dh, ds, dalpha, dgate};
}

// ---------------------------------------------------------------- MULTIPLY
namespace {
// c = clamp01(alpha.to(h.dtype))
std::vector<double> multiply_coefficients(const std::vector<double>& a, at::ScalarType host) {
  return clamp_values(rounded(a, host));
}
}  // namespace

at::Tensor blend_multiply(const at::Tensor& h, const at::Tensor& s_in, const at::Tensor& alpha,
                          const std::optional<at::Tensor>& seed_input) {
  check_blend("blend_multiply", h, s_in, alpha);
  if (seed_input.has_value()) {
    check_features("blend_multiply", "seed_input", *seed_input);
    check_same_shape("blend_multiply", h, "seed_input", *seed_input);
  }
  const auto host = h.scalar_type();
  const at::Tensor s = kernel_operand(s_in, host);
  const at::Tensor c = expanded_weight(multiply_coefficients(read_values(alpha), host),
                                       alpha.sizes(), h);
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  if (!seed_input.has_value()) {
    dispatch_pair(host, s.scalar_type(), "blend_multiply", [&](auto tt, auto st) {
      using T = typename decltype(tt)::type;
      using S = typename decltype(st)::type;
      auto iter = make_iter({out}, {h, s, c});
      multiply_forward<T, S, true>(iter);
    });
    return out;
  }
  const at::Tensor r = seed_input->to(s.scalar_type());  // exact: r is read as h's dtype
  dispatch_pair(host, s.scalar_type(), "blend_multiply", [&](auto tt, auto st) {
    using T = typename decltype(tt)::type;
    using S = typename decltype(st)::type;
    auto iter = make_iter({out}, {h, s, r, c});
    multiply_forward<T, S, false>(iter);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_multiply_backward(
    const at::Tensor& grad_in, const at::Tensor& h, const at::Tensor& s_in,
    const at::Tensor& alpha, const std::optional<at::Tensor>& seed_input, bool need_alpha_grad) {
  const auto host = h.scalar_type();
  const at::Tensor g = grad_in.to(host);
  const at::Tensor s = kernel_operand(s_in, host);
  const auto a = read_values(alpha);
  const at::Tensor c = expanded_weight(multiply_coefficients(a, host), alpha.sizes(), h);
  const bool r_is_h = !seed_input.has_value();
  const at::Tensor r = r_is_h ? at::Tensor() : seed_input->to(s.scalar_type());
  at::Tensor dh = at::empty_like(h);
  at::Tensor ds = at::empty_like(s);
  at::Tensor dr = r_is_h ? at::empty({0}, h.options()) : at::empty_like(r);
  const ReducePlan plan = plan_reduction(alpha.sizes(), h, dh);
  at::Tensor dce;
  std::vector<double> sums(plan.groups, 0.0);
  if (plan.element) dce = at::zeros(h.sizes(), h.options().dtype(opmath_dtype(host)));
  if (h.numel() > 0) {
    dispatch_pair(host, s.scalar_type(), "blend_multiply backward", [&](auto tt, auto st) {
      using T = typename decltype(tt)::type;
      using S = typename decltype(st)::type;
      auto run = [&](auto r_is_h_tag, auto element_tag) {
        constexpr bool kRIsH = decltype(r_is_h_tag)::value;
        constexpr bool kElement = decltype(element_tag)::value;
        auto loop_for = [](double& acc) { return multiply_backward_loop<T, S, kRIsH, kElement>(acc); };
        if constexpr (kRIsH && kElement) {
          auto iter = make_iter({dh, ds, dce}, {g, h, s, c});
          sums = run_backward(iter, plan, loop_for);
        } else if constexpr (kRIsH) {
          auto iter = make_iter({dh, ds}, {g, h, s, c});
          sums = run_backward(iter, plan, loop_for);
        } else if constexpr (kElement) {
          auto iter = make_iter({dh, ds, dr, dce}, {g, h, s, r, c});
          sums = run_backward(iter, plan, loop_for);
        } else {
          auto iter = make_iter({dh, ds, dr}, {g, h, s, r, c});
          sums = run_backward(iter, plan, loop_for);
        }
      };
      using True = std::true_type;
      using False = std::false_type;
      if (r_is_h) {
        plan.element ? run(True{}, True{}) : run(True{}, False{});
      } else {
        plan.element ? run(False{}, True{}) : run(False{}, False{});
      }
    });
  }
  if (ds.scalar_type() != s_in.scalar_type()) ds = ds.to(s_in.scalar_type());
  if (!r_is_h && dr.scalar_type() != seed_input->scalar_type()) {
    dr = dr.to(seed_input->scalar_type());
  }
  at::Tensor dalpha;
  if (need_alpha_grad) {
    auto dc = weight_grad_sums(plan, sums, dce, alpha.sizes());
    if (static_cast<int64_t>(dc.size()) != alpha.numel()) {
      dc = sum_to_shape(dc, {static_cast<int64_t>(dc.size())}, alpha.sizes());
    }
    dalpha = masked_weight_grad(dc, rounded(a, host), alpha);
  } else {
    dalpha = at::zeros(alpha.sizes(), alpha.options());
  }
  return {dh, ds, dalpha, dr};
}

// ---------------------------------------------------------------- STE
at::Tensor ste_forward(const at::Tensor& h, const at::Tensor& s_in) {
  check_features("ste_forward", "host", h);
  check_features("ste_forward", "seed", s_in);
  check_same_shape("ste_forward", h, "seed", s_in);
  const auto host = h.scalar_type();
  const at::Tensor s = kernel_operand(s_in, host);
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  dispatch_pair(host, s.scalar_type(), "ste_forward", [&](auto tt, auto st) {
    using T = typename decltype(tt)::type;
    using S = typename decltype(st)::type;
    auto iter = make_iter({out}, {h, s});
    kk::cpu::ste_forward<T, S>(iter);
  });
  return out;
}

// ---------------------------------------------------------------- valve multiplier
namespace {
// m as the kernels read it: its own dtype when it is the result's (or a half type beside a
// float result); otherwise cast to the result dtype.
at::Tensor valve_operand(const at::Tensor& m, at::ScalarType result) {
  if (m.scalar_type() == result) return m;
  if (result == at::kFloat && is_half(m.scalar_type())) return m;
  return m.to(result);
}

template <typename F>
void dispatch_valve(at::ScalarType result, at::ScalarType m, F&& f) {
  switch (result) {
    case at::kDouble:
      return f(Tag<double>{}, Tag<double>{});
    case at::kFloat:
      if (m == at::kBFloat16) return f(Tag<float>{}, Tag<c10::BFloat16>{});
      if (m == at::kHalf) return f(Tag<float>{}, Tag<c10::Half>{});
      return f(Tag<float>{}, Tag<float>{});
    case at::kBFloat16:
      return f(Tag<c10::BFloat16>{}, Tag<c10::BFloat16>{});
    case at::kHalf:
      return f(Tag<c10::Half>{}, Tag<c10::Half>{});
    default:
      TORCH_CHECK(false, "multiply_valve_multiplier: unsupported dtype ", result);
  }
}
}  // namespace

at::Tensor multiply_valve_multiplier(const at::Tensor& alpha, const at::Tensor& m_in) {
  check_features("multiply_valve_multiplier", "m", m_in);
  check_weight("multiply_valve_multiplier", "alpha", alpha, m_in);
  const auto result = at::result_type(alpha, m_in);
  const at::Tensor m = valve_operand(m_in, result);
  // c = clamp01(alpha) promoted to the result dtype
  const auto c = rounded(clamp_values(read_values(alpha)), result);
  at::Tensor out = at::empty_like(m_in, m_in.options().dtype(result));
  if (m.numel() == 0) return out;
  const at::Tensor cw = tensor_from_values(c, alpha.sizes(), opmath_dtype(result)).expand(m.sizes());
  dispatch_valve(result, m.scalar_type(), [&](auto ut, auto mt) {
    using U = typename decltype(ut)::type;
    using M = typename decltype(mt)::type;
    auto iter = make_iter({out}, {m, cw});
    valve_forward<U, M>(iter);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> multiply_valve_multiplier_backward(const at::Tensor& grad_in,
                                                                      const at::Tensor& alpha,
                                                                      const at::Tensor& m_in,
                                                                      bool need_alpha_grad) {
  const auto result = at::result_type(alpha, m_in);
  const at::Tensor g = grad_in.to(result);
  const at::Tensor m = valve_operand(m_in, result);
  const auto a = read_values(alpha);
  const auto c = rounded(clamp_values(a), result);
  const at::Tensor cw = tensor_from_values(c, alpha.sizes(), opmath_dtype(result)).expand(m.sizes());
  at::Tensor dm = at::empty_like(m);
  const ReducePlan plan = plan_reduction(alpha.sizes(), m, dm);
  at::Tensor dce;
  std::vector<double> sums(plan.groups, 0.0);
  if (plan.element) dce = at::zeros(m.sizes(), m.options().dtype(opmath_dtype(result)));
  if (m.numel() > 0) {
    dispatch_valve(result, m.scalar_type(), [&](auto ut, auto mt) {
      using U = typename decltype(ut)::type;
      using M = typename decltype(mt)::type;
      if (plan.element) {
        auto iter = make_iter({dm, dce}, {g, m, cw});
        sums = run_backward(iter, plan, [](double& acc) { return valve_backward_loop<U, M, true>(acc); });
      } else {
        auto iter = make_iter({dm}, {g, m, cw});
        sums = run_backward(iter, plan, [](double& acc) { return valve_backward_loop<U, M, false>(acc); });
      }
    });
  }
  if (dm.scalar_type() != m_in.scalar_type()) dm = dm.to(m_in.scalar_type());
  at::Tensor dalpha;
  if (need_alpha_grad) {
    auto dc = weight_grad_sums(plan, sums, dce, alpha.sizes());
    if (static_cast<int64_t>(dc.size()) != alpha.numel()) {
      dc = sum_to_shape(dc, {static_cast<int64_t>(dc.size())}, alpha.sizes());
    }
    dalpha = masked_weight_grad(dc, a, alpha);
  } else {
    dalpha = at::zeros(alpha.sizes(), alpha.options());
  }
  return {dalpha, dm};
}

// ---------------------------------------------------------------- gate effective alpha
at::Tensor gate_effective_alpha(const at::Tensor& alpha, const at::Tensor& gate) {
  TORCH_CHECK(is_supported_float(gate.scalar_type()) || is_supported_float(alpha.scalar_type()),
              "gate_effective_alpha: alpha or gate must be a float tensor");
  const GateWeights gw = gate_weights(alpha, gate);
  return tensor_from_values(gw.e, gw.shape, gw.promoted);
}

std::tuple<at::Tensor, at::Tensor> gate_effective_alpha_backward(const at::Tensor& grad,
                                                                 const at::Tensor& alpha,
                                                                 const at::Tensor& gate) {
  const GateWeights gw = gate_weights(alpha, gate);
  return gate_weights_backward(gw, read_values(grad.expand(gw.shape)), alpha, gate);
}

}  // namespace kk::cpu
