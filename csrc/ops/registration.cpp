// The kasmina op library: schemas, the CPU implementations, and autograd written in C++ so
// that an eager call costs one dispatcher hop rather than a Python autograd.Function. Fake
// (meta) kernels are registered from Python (kasmina_kernels/native.py).
#include <ATen/FuncTorchTLS.h>
#include <ATen/Version.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "cpu/cpu_ops.h"

namespace kk {
namespace {

// ---------------------------------------------------------------- CPU capability
// The CPU kernels are compiled once per capability (cpu/cpu_ops.h); the one registered is
// chosen once, when the library loads.
struct CpuCapability {
  const char* name;  // ATen's
  int rank;          // DEFAULT 0, AVX2 1, AVX512 2
  const cpu::Kernels* kernels;
};

// The compiled capabilities, narrowest first (setup.py defines KK_CPU_AVX2, KK_CPU_AVX512).
constexpr CpuCapability kCpuCapabilities[] = {
    {"DEFAULT", 0, &cpu::kernels_DEFAULT},
#ifdef KK_CPU_AVX2
    {"AVX2", 1, &cpu::kernels_AVX2},
#endif
#ifdef KK_CPU_AVX512
    {"AVX512", 2, &cpu::kernels_AVX512},
#endif
};

// The widest capability this CPU has. ATen trusts ATEN_CPU_CAPABILITY without asking the CPU;
// this keeps an override that names a capability the CPU lacks from running code it cannot.
int cpu_rank() {
#if defined(KK_CPU_AVX2) || defined(KK_CPU_AVX512)  // x86-64 only
  __builtin_cpu_init();
  // the CPU flags setup.py compiles each capability with (-m<flag>)
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))) {
    return 0;
  }
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
             ? 2
             : 1;
#else
  return 0;
#endif
}

// The capability in use: ATen's (at::get_cpu_capability(): the widest this CPU runs, or
// ATEN_CPU_CAPABILITY, both read once per process), no wider than the CPU's, and of the
// compiled capabilities the widest not above it.
const CpuCapability& cpu_capability() {
  static const CpuCapability& chosen = []() -> const CpuCapability& {
    const std::string aten = at::get_cpu_capability();
    const int rank = std::min(aten == "AVX512" ? 2 : aten == "AVX2" ? 1 : 0, cpu_rank());
    const CpuCapability* best = &kCpuCapabilities[0];
    for (const CpuCapability& c : kCpuCapabilities) {
      if (c.rank <= rank) best = &c;
    }
    return *best;
  }();
  return chosen;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor grad_if(AutogradContext* ctx, size_t i, const at::Tensor& g) {
  return ctx->needs_input_grad(i) ? g : at::Tensor();
}

// ---------------------------------------------------------------- what autograd cannot do
// The fused ops have a first derivative only. Forward-mode AD (dual tensors of
// torch.autograd.forward_ad) and torch.func transforms (jvp, vmap, grad, ...) would otherwise
// fail inside torch::autograd::Function with a message that names no op; these checks run
// before the kernel and name it.
inline bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(0).defined(); }
inline bool has_tangent(const std::optional<at::Tensor>& t) {
  return t.has_value() && has_tangent(*t);
}

template <typename... Ts>
void check_first_order_only(const char* op, const Ts&... tensors) {
  const auto& functorch_tls = at::functorch::functorchTLSAccessor();
  if (functorch_tls) {
    try {
      functorch_tls->checkSupportsCppAutogradFunction();
    } catch (const c10::Error&) {
      TORCH_CHECK(false, op,
                  ": torch.func transforms (jvp, jacfwd, vmap, grad, vjp, ...) are not supported "
                  "by the fused op; call it outside the transform, or use backend=\"reference\"");
    }
  }
  TORCH_CHECK(!(has_tangent(tensors) || ...), op,
              ": forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not supported: "
              "the fused op has no forward derivative; use backend=\"reference\" for it");
}

// The Autograd kernel of every kasmina::*_backward op. The backward ops compute a gradient
// with fused kernels that have no derivative of their own, so when autograd records them
// (backward with create_graph=True, where grad mode is on and saved inputs require grad) each
// output gets a grad_fn that raises, naming the op, if it is ever differentiated: double
// backward is an error, never a silently zero or missing second derivative. A first-order
// backward (create_graph=False) runs with grad mode off and pays one flag check.
void backward_op_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                          torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t num_args = schema.arguments().size();
  torch::autograd::variable_list inputs;
  bool record = false;
  if (torch::autograd::GradMode::is_enabled()) {
    for (auto it = stack->end() - num_args; it != stack->end(); ++it) {
      if (it->isTensor()) {
        const at::Tensor& t = it->toTensor();
        record = record || (t.defined() && t.requires_grad());
        inputs.push_back(t);
      }
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (!record) return;
  std::string name = schema.name();  // "kasmina::<op>_backward"
  const std::string forward = name.substr(0, name.size() - std::string("_backward").size());
  const std::string msg =
      forward + ": double backward (differentiating a gradient computed with create_graph=True) "
      "is not supported: the fused gradient kernel (" + name + ") has no derivative of its own; "
      "use backend=\"reference\" for higher-order derivatives";
  const size_t num_returns = schema.returns().size();
  torch::autograd::tensor_list outputs;
  for (auto it = stack->end() - num_returns; it != stack->end(); ++it) {
    outputs.push_back(std::move(*it).toTensor());
  }
  auto wrapped = torch::autograd::wrap_outputs(
      inputs, std::move(outputs), [&msg](torch::autograd::edge_list&& next_edges) {
        return c10::make_intrusive<torch::autograd::Error>(msg, std::move(next_edges));
      });
  torch::jit::drop(*stack, num_returns);
  for (auto& t : wrapped) stack->emplace_back(std::move(t));
}

// ---------------------------------------------------------------- ADD
struct BlendAddFn : torch::autograd::Function<BlendAddFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& s,
                            const at::Tensor& alpha) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({h, s, alpha});
    static auto op = op_handle<cpu::sig::blend_add>("kasmina::blend_add");
    return op.call(h, s, alpha);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static auto op = op_handle<cpu::sig::blend_add_backward>("kasmina::blend_add_backward");
    auto [dh, ds, da] = op.call(grads[0], saved[0], saved[1], saved[2], ctx->needs_input_grad(2));
    return {grad_if(ctx, 0, dh), grad_if(ctx, 1, ds), grad_if(ctx, 2, da)};
  }
};

// ---------------------------------------------------------------- GATE
struct BlendGateFn : torch::autograd::Function<BlendGateFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& s,
                            const at::Tensor& alpha, const at::Tensor& gate) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({h, s, alpha, gate});
    static auto op = op_handle<cpu::sig::blend_gate>("kasmina::blend_gate");
    return op.call(h, s, alpha, gate);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static auto op = op_handle<cpu::sig::blend_gate_backward>("kasmina::blend_gate_backward");
    // separate flags: a gradient nobody needs is not brought back to a CPU alpha/gate (a
    // device-to-host copy is a host sync, which CUDA graph capture forbids)
    auto [dh, ds, da, dg] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3],
                                    ctx->needs_input_grad(2), ctx->needs_input_grad(3));
    return {grad_if(ctx, 0, dh), grad_if(ctx, 1, ds), grad_if(ctx, 2, da), grad_if(ctx, 3, dg)};
  }
};

// ---------------------------------------------------------------- MULTIPLY
// seed_input may be absent: then r is h itself.
struct BlendMultiplyFn : torch::autograd::Function<BlendMultiplyFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& s,
                            const at::Tensor& alpha, const std::optional<at::Tensor>& seed_input) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool has_r = seed_input.has_value() && seed_input->defined();
    ctx->saved_data["has_r"] = has_r;
    if (has_r) {
      ctx->save_for_backward({h, s, alpha, *seed_input});
    } else {
      ctx->save_for_backward({h, s, alpha});
    }
    static auto op = op_handle<cpu::sig::blend_multiply>("kasmina::blend_multiply");
    return op.call(h, s, alpha, has_r ? seed_input : std::nullopt);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static auto op =
        op_handle<cpu::sig::blend_multiply_backward>("kasmina::blend_multiply_backward");
    const bool has_r = ctx->saved_data["has_r"].toBool();
    const std::optional<at::Tensor> r = has_r ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    auto [dh, ds, da, dr] = op.call(grads[0], saved[0], saved[1], saved[2], r,
                                    ctx->needs_input_grad(2), has_r && ctx->needs_input_grad(3));
    return {grad_if(ctx, 0, dh), grad_if(ctx, 1, ds), grad_if(ctx, 2, da),
            has_r ? grad_if(ctx, 3, dr) : at::Tensor()};
  }
};

at::Tensor blend_multiply_autograd(const at::Tensor& h, const at::Tensor& s,
                                   const at::Tensor& alpha,
                                   const std::optional<at::Tensor>& seed_input) {
  check_first_order_only("kasmina::blend_multiply", h, s, alpha, seed_input);
  return BlendMultiplyFn::apply(h, s, alpha, seed_input);
}

// ---------------------------------------------------------------- STE
// Gradient 1 to both inputs: dh is the incoming gradient, ds the same in s's dtype.
struct SteFn : torch::autograd::Function<SteFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& s) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["seed_dtype"] = static_cast<int64_t>(s.scalar_type());
    static auto op = op_handle<cpu::sig::ste_forward>("kasmina::ste_forward");
    return op.call(h, s);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto seed_dtype = static_cast<at::ScalarType>(ctx->saved_data["seed_dtype"].toInt());
    const at::Tensor& g = grads[0];
    return {grad_if(ctx, 0, g), ctx->needs_input_grad(1) ? g.to(seed_dtype) : at::Tensor()};
  }
};

// ---------------------------------------------------------------- valve multiplier
struct ValveFn : torch::autograd::Function<ValveFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& alpha, const at::Tensor& m) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({alpha, m});
    static auto op =
        op_handle<cpu::sig::multiply_valve_multiplier>("kasmina::multiply_valve_multiplier");
    return op.call(alpha, m);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static auto op = op_handle<cpu::sig::multiply_valve_multiplier_backward>(
        "kasmina::multiply_valve_multiplier_backward");
    auto [da, dm] = op.call(grads[0], saved[0], saved[1], ctx->needs_input_grad(0));
    return {grad_if(ctx, 0, da), grad_if(ctx, 1, dm)};
  }
};

// ---------------------------------------------------------------- gate effective alpha
struct GateEffectiveFn : torch::autograd::Function<GateEffectiveFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& alpha, const at::Tensor& gate) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({alpha, gate});
    static auto op =
        op_handle<cpu::sig::gate_effective_alpha>("kasmina::gate_effective_alpha");
    return op.call(alpha, gate);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static auto op = op_handle<cpu::sig::gate_effective_alpha_backward>(
        "kasmina::gate_effective_alpha_backward");
    auto [da, dg] = op.call(grads[0], saved[0], saved[1], ctx->needs_input_grad(0),
                            ctx->needs_input_grad(1));
    return {grad_if(ctx, 0, da), grad_if(ctx, 1, dg)};
  }
};

// ---------------------------------------------------------------- pooling and gate network
struct GatedPoolFn : torch::autograd::Function<GatedPoolFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::string_view topology) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x});
    ctx->saved_data["topology"] = std::string(topology);
    static auto op = op_handle<cpu::sig::gated_pool>("kasmina::gated_pool");
    return op.call(x, topology);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::string topology = ctx->saved_data["topology"].toStringRef();
    static auto op = op_handle<cpu::sig::gated_pool_backward>("kasmina::gated_pool_backward");
    return {op.call(grads[0], saved[0], topology), at::Tensor()};
  }
};

struct GateNetworkFn : torch::autograd::Function<GateNetworkFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            c10::string_view topology) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, w1, b1, w2, b2});
    ctx->saved_data["topology"] = std::string(topology);
    static auto op = op_handle<cpu::sig::gate_network>("kasmina::gate_network");
    return op.call(x, w1, b1, w2, b2, topology);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::string topology = ctx->saved_data["topology"].toStringRef();
    static auto op =
        op_handle<cpu::sig::gate_network_backward>("kasmina::gate_network_backward");
    auto [dx, dw1, db1, dw2, db2] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], topology);
    return {grad_if(ctx, 0, dx), grad_if(ctx, 1, dw1), grad_if(ctx, 2, db1),
            grad_if(ctx, 3, dw2), grad_if(ctx, 4, db2), at::Tensor()};
  }
};

}  // namespace

TORCH_LIBRARY(kasmina, m) {
  m.def("blend_add(Tensor h, Tensor s, Tensor alpha) -> Tensor");
  m.def("blend_add_backward(Tensor grad, Tensor h, Tensor s, Tensor alpha, bool need_alpha_grad)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("blend_gate(Tensor h, Tensor s, Tensor alpha, Tensor gate) -> Tensor");
  m.def("blend_gate_backward(Tensor grad, Tensor h, Tensor s, Tensor alpha, Tensor gate,"
        " bool need_alpha_grad, bool need_gate_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("blend_multiply(Tensor h, Tensor s, Tensor alpha, Tensor? seed_input) -> Tensor");
  m.def("blend_multiply_backward(Tensor grad, Tensor h, Tensor s, Tensor alpha,"
        " Tensor? seed_input, bool need_alpha_grad, bool need_seed_input_grad)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ste_forward(Tensor h, Tensor s) -> Tensor");
  m.def("multiply_valve_multiplier(Tensor alpha, Tensor m) -> Tensor");
  m.def("multiply_valve_multiplier_backward(Tensor grad, Tensor alpha, Tensor m,"
        " bool need_alpha_grad) -> (Tensor, Tensor)");
  m.def("gate_effective_alpha(Tensor alpha, Tensor gate) -> Tensor");
  m.def("gate_effective_alpha_backward(Tensor grad, Tensor alpha, Tensor gate,"
        " bool need_alpha_grad, bool need_gate_grad)"
        " -> (Tensor, Tensor)");
  m.def("gated_pool(Tensor x, str topology) -> Tensor");
  m.def("gated_pool_backward(Tensor grad, Tensor x, str topology) -> Tensor");
  m.def("gate_network(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, str topology)"
        " -> Tensor");
  m.def("gate_network_backward(Tensor grad, Tensor x, Tensor w1, Tensor b1, Tensor w2,"
        " Tensor b2, str topology) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kasmina, CPU, m) {
  const cpu::Kernels& k = *cpu_capability().kernels;
  m.impl("blend_add", k.blend_add);
  m.impl("blend_add_backward", k.blend_add_backward);
  m.impl("blend_gate", k.blend_gate);
  m.impl("blend_gate_backward", k.blend_gate_backward);
  m.impl("blend_multiply", k.blend_multiply);
  m.impl("blend_multiply_backward", k.blend_multiply_backward);
  m.impl("ste_forward", k.ste_forward);
  m.impl("multiply_valve_multiplier", k.multiply_valve_multiplier);
  m.impl("multiply_valve_multiplier_backward", k.multiply_valve_multiplier_backward);
  m.impl("gate_effective_alpha", k.gate_effective_alpha);
  m.impl("gate_effective_alpha_backward", k.gate_effective_alpha_backward);
  m.impl("gated_pool", k.gated_pool);
  m.impl("gated_pool_backward", k.gated_pool_backward);
  m.impl("gate_network", k.gate_network);
  m.impl("gate_network_backward", k.gate_network_backward);
}

TORCH_LIBRARY_IMPL(kasmina, Autograd, m) {
  m.impl("blend_add", [](const at::Tensor& h, const at::Tensor& s, const at::Tensor& a) {
    check_first_order_only("kasmina::blend_add", h, s, a);
    return BlendAddFn::apply(h, s, a);
  });
  m.impl("blend_gate", [](const at::Tensor& h, const at::Tensor& s, const at::Tensor& a,
                          const at::Tensor& g) {
    check_first_order_only("kasmina::blend_gate", h, s, a, g);
    return BlendGateFn::apply(h, s, a, g);
  });
  m.impl("blend_multiply", &blend_multiply_autograd);
  m.impl("ste_forward", [](const at::Tensor& h, const at::Tensor& s) {
    check_first_order_only("kasmina::ste_forward", h, s);
    return SteFn::apply(h, s);
  });
  m.impl("multiply_valve_multiplier", [](const at::Tensor& a, const at::Tensor& x) {
    check_first_order_only("kasmina::multiply_valve_multiplier", a, x);
    return ValveFn::apply(a, x);
  });
  m.impl("gate_effective_alpha", [](const at::Tensor& a, const at::Tensor& g) {
    check_first_order_only("kasmina::gate_effective_alpha", a, g);
    return GateEffectiveFn::apply(a, g);
  });
  m.impl("gated_pool", [](const at::Tensor& x, c10::string_view topology) {
    check_first_order_only("kasmina::gated_pool", x);
    return GatedPoolFn::apply(x, topology);
  });
  m.impl("gate_network", [](const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2,
                            c10::string_view topology) {
    check_first_order_only("kasmina::gate_network", x, w1, b1, w2, b2);
    return GateNetworkFn::apply(x, w1, b1, w2, b2, topology);
  });
  for (const char* name :
       {"blend_add_backward", "blend_gate_backward", "blend_multiply_backward",
        "multiply_valve_multiplier_backward", "gate_effective_alpha_backward",
        "gated_pool_backward", "gate_network_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&backward_op_autograd>());
  }
}

}  // namespace kk

namespace {
py::dict build_info() {
  py::dict info;
  py::list capabilities;
  for (const auto& c : kk::kCpuCapabilities) capabilities.append(c.name);
  info["cpu_capabilities"] = capabilities;
  info["cpu_capability"] = kk::cpu_capability().name;
#ifdef KK_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["torch_version_at_build"] = TORCH_VERSION;
  return info;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kasmina-kernels native extension: registers the torch.ops.kasmina ops";
  m.def("build_info", &build_info, "How this extension was built");
  const kk::cpu::Kernels& k = *kk::cpu_capability().kernels;
  m.def("tanh_f32", k.tanh_f32,
        "(tanh(x), 1 - tanh(x)^2) as the float32 CPU MULTIPLY and valve kernels compute them, "
        "elementwise (for tests)",
        pybind11::arg("x"));
  m.def("tanh_f64", k.tanh_f64,
        "The double tanh of the CPU float32 MULTIPLY and valve alpha-gradient terms, "
        "elementwise (for tests)");
}
