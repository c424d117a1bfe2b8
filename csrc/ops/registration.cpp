// The kasmina op library's CPU implementations, and autograd written in C++ so that an eager
// call costs one dispatcher hop rather than a Python autograd.Function. The schemas and the
// fake kernels are registered from Python, from the op table (kasmina_kernels/native.py).
#include <ATen/FuncTorchTLS.h>
#include <ATen/Version.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

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

using torch::autograd::variable_list;

// ---------------------------------------------------------------- what autograd cannot do
// The fused ops have a first derivative only. Forward-mode AD (dual tensors of
// torch.autograd.forward_ad) and torch.func transforms (jvp, vmap, grad, ...) would otherwise
// fail in autograd with a message that names no op; this check runs before the kernel and
// names it.
void check_first_order_only(const std::string& op, const variable_list& tensors) {
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
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(!(t.defined() && t._fw_grad(0).defined()), op,
                ": forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not supported: "
                "the fused op has no forward derivative; use backend=\"reference\" for it");
  }
}

// ---------------------------------------------------------------- autograd
// One autograd convention for every op, read off the schemas (optable.py). A forward op's
// backward op kasmina::<op>_backward takes (grad, the forward's arguments, a
// need_<input>_grad flag for some inputs) and returns one gradient per tensor input, a
// placeholder where none is needed; STE has no backward op (its gradient is the identity).
// A backward op's kernels have no derivative of their own: when autograd records one
// (create_graph=True) its outputs get a grad_fn that raises, naming the op, if differentiated,
// so double backward is an error, never a silently zero second derivative.
struct Plan {
  std::string name;                             // "kasmina::<op>"
  bool is_backward;                             // a kasmina::*_backward op
  std::optional<c10::OperatorHandle> backward;  // a forward op's backward op (not STE's)
  std::vector<size_t> tensors;                  // the tensor arguments' positions
  std::vector<size_t> need;                     // per need flag, its input's tensor index
};

Plan make_plan(const c10::OperatorHandle& op) {
  const auto& schema = op.schema();
  const std::string suffix = "_backward";
  const std::string& name = schema.name();
  Plan plan{name, name.size() > suffix.size() && name.ends_with(suffix), std::nullopt, {}, {}};
  if (!plan.is_backward) plan.backward = c10::Dispatcher::singleton().findOp({name + suffix, ""});
  std::vector<std::string> names;
  for (size_t i = 0; i < schema.arguments().size(); ++i) {
    const auto& arg = schema.arguments()[i];
    if (arg.type()->isSubtypeOf(*c10::OptionalType::ofTensor())) {
      plan.tensors.push_back(i);
      names.push_back(arg.name());
    }
  }
  if (plan.backward) {
    for (const auto& arg : plan.backward->schema().arguments()) {
      for (size_t k = 0; k < names.size(); ++k) {
        if (arg.name() == "need_" + names[k] + "_grad") plan.need.push_back(k);
      }
    }
  }
  return plan;
}

struct FusedBackward : torch::autograd::Node {
  std::shared_ptr<const Plan> plan;
  std::vector<c10::IValue> args;  // the forward's arguments, tensors left out (saved below)
  std::vector<torch::autograd::SavedVariable> saved;  // its tensor arguments
  at::ScalarType seed_dtype = at::kFloat;              // STE's ds is the gradient in s's dtype

  std::string name() const override { return plan->name + "Backward"; }

  variable_list apply(variable_list&& grads) override {
    const Plan& p = *plan;
    const at::Tensor g = grads[0].defined() ? grads[0] : input_metadata(0).zeros_like();
    variable_list out(p.tensors.size());
    if (!p.backward) {
      if (should_compute_output(0)) out[0] = g;
      if (should_compute_output(1)) out[1] = g.to(seed_dtype);
      return out;
    }
    torch::jit::Stack stack{g};
    for (size_t i = 0, k = 0; i < args.size(); ++i) {
      if (k < p.tensors.size() && p.tensors[k] == i) {
        const at::Tensor t = saved[k++].unpack();
        stack.emplace_back(t.defined() ? c10::IValue(t) : c10::IValue());
      } else {
        stack.push_back(args[i]);
      }
    }
    for (size_t k : p.need) stack.emplace_back(should_compute_output(k));
    p.backward->callBoxed(&stack);
    for (size_t k = 0; k < out.size(); ++k) {
      if (should_compute_output(k)) out[k] = std::move(stack[k]).toTensor();
    }
    return out;
  }

  void release_variables() override {
    for (auto& s : saved) s.reset_data();
  }
};

// The Autograd kernel of every op: the kernel below autograd and, where an input requires
// grad, the node above (which saves the op's inputs only) or, for a backward op, an error node.
class AutogradKernel final : public c10::OperatorKernel {
 public:
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                  torch::jit::Stack* stack) {
    // the schemas are defined from Python after this library loads: read them on first call
    std::call_once(once_, [&] { plan_ = std::make_shared<const Plan>(make_plan(op)); });
    const Plan& p = *plan_;
    const size_t num_args = op.schema().arguments().size();
    auto args = torch::jit::last(*stack, num_args);
    variable_list inputs;
    bool requires_grad = false;
    for (size_t i : p.tensors) {
      inputs.push_back(args[i].isTensor() ? args[i].toTensor() : at::Tensor());
      requires_grad = requires_grad || (inputs.back().defined() && inputs.back().requires_grad());
    }
    if (!p.is_backward) check_first_order_only(p.name, inputs);
    c10::intrusive_ptr<torch::autograd::Node> node;
    if (requires_grad && torch::autograd::GradMode::is_enabled()) {
      node = p.is_backward ? error_node(p, inputs) : fused_node(args, inputs);
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    }
    if (node) {
      for (const c10::IValue& y : torch::jit::last(*stack, op.schema().returns().size())) {
        torch::autograd::set_history(y.toTensor(), node);
      }
    }
  }

 private:
  c10::intrusive_ptr<torch::autograd::Node> fused_node(c10::ArrayRef<c10::IValue> args,
                                                       const variable_list& inputs) {
    auto node = c10::make_intrusive<FusedBackward>();
    node->plan = plan_;
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    for (size_t i = 0, k = 0; i < args.size(); ++i) {
      const bool tensor = k < plan_->tensors.size() && plan_->tensors[k] == i;
      node->args.push_back(tensor ? c10::IValue() : args[i]);
      if (tensor) node->saved.emplace_back(inputs[k++], false);
    }
    if (!plan_->backward) node->seed_dtype = inputs[1].scalar_type();
    return node;
  }

  static c10::intrusive_ptr<torch::autograd::Node> error_node(const Plan& p,
                                                              const variable_list& inputs) {
    const std::string forward = p.name.substr(0, p.name.size() - std::string("_backward").size());
    return c10::make_intrusive<torch::autograd::Error>(
        forward + ": double backward (differentiating a gradient computed with "
        "create_graph=True) is not supported: the fused gradient kernel (" + p.name + ") has "
        "no derivative of its own; use backend=\"reference\" for higher-order derivatives",
        torch::autograd::collect_next_edges(inputs));
  }

  std::once_flag once_;
  std::shared_ptr<const Plan> plan_;
};

}  // namespace

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
  const auto kernel = [] {
    return torch::CppFunction::makeFromBoxedFunctor(std::make_unique<AutogradKernel>());
  };
  for (const std::string name :
       {"blend_add", "blend_gate", "blend_multiply", "ste_forward", "multiply_valve_multiplier",
        "gate_effective_alpha", "gated_pool", "gate_network"}) {
    m.impl(name.c_str(), kernel());
    if (name != "ste_forward") m.impl((name + "_backward").c_str(), kernel());
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
