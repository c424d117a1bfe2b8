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

// ---------------------------------------------------------------- first derivatives
// One autograd convention for every forward op, read off the schemas (optable.py): the
// backward op kasmina::<op>_backward takes (grad, the forward's arguments, a
// need_<input>_grad flag for some inputs) and returns one gradient per tensor input, a
// placeholder where none is needed. STE has no backward op: its gradient is the identity.
struct Plan {
  std::string name;                                // "kasmina::<op>"
  std::optional<c10::OperatorHandle> backward;     // absent for ste_forward
  std::vector<size_t> tensors;                     // the tensor arguments' positions
  std::vector<size_t> need;                        // per need flag, its input's tensor index
};

Plan make_plan(const c10::OperatorHandle& op) {
  const auto& schema = op.schema();
  Plan plan{schema.name(), c10::Dispatcher::singleton().findOp({schema.name() + "_backward", ""}),
            {}, {}};
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

// The Autograd kernel of every forward op: the kernel below autograd, then, where an input
// requires grad, a FusedBackward node that saves the op's inputs only.
class ForwardAutograd final : public c10::OperatorKernel {
 public:
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                  torch::jit::Stack* stack) {
    // the schemas are defined from Python after this library loads: read them on first call
    std::call_once(once_, [&] { plan_ = std::make_shared<const Plan>(make_plan(op)); });
    const size_t num_args = op.schema().arguments().size();
    auto args = torch::jit::last(*stack, num_args);
    variable_list inputs;
    bool requires_grad = false;
    for (size_t i : plan_->tensors) {
      inputs.push_back(args[i].isTensor() ? args[i].toTensor() : at::Tensor());
      requires_grad = requires_grad || (inputs.back().defined() && inputs.back().requires_grad());
    }
    check_first_order_only(plan_->name, inputs);
    c10::intrusive_ptr<FusedBackward> node;
    if (requires_grad && torch::autograd::GradMode::is_enabled()) {
      node = c10::make_intrusive<FusedBackward>();
      node->plan = plan_;
      node->set_next_edges(torch::autograd::collect_next_edges(inputs));
      for (size_t i = 0, k = 0; i < num_args; ++i) {
        const bool tensor = k < plan_->tensors.size() && plan_->tensors[k] == i;
        node->args.push_back(tensor ? c10::IValue() : args[i]);
        if (tensor) node->saved.emplace_back(inputs[k++], false);
      }
      if (!plan_->backward) node->seed_dtype = inputs[1].scalar_type();
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    }
    if (node) {
      at::Tensor y = stack->back().toTensor();
      torch::autograd::set_history(y, node);
    }
  }

 private:
  std::once_flag once_;
  std::shared_ptr<const Plan> plan_;
};

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
  for (const char* name :
       {"blend_add", "blend_gate", "blend_multiply", "ste_forward", "multiply_valve_multiplier",
        "gate_effective_alpha", "gated_pool", "gate_network"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<ForwardAutograd>()));
  }
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
