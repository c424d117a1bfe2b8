// The kasmina op library's CPU implementations, and the autograd kernel of every backend's
// ops (native's and triton's), written in C++ so that an eager call costs one dispatcher hop
// rather than a Python autograd.Function. The schemas, fake kernels and vmap rules are
// registered from Python, from the op table, which then gives the ops this autograd kernel
// (kasmina_kernels/native.py, `register`).
#include <ATen/FuncTorchTLS.h>
#include <ATen/Version.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
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

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------- what autograd cannot do
// The fused ops have a first derivative only. Forward-mode AD (dual tensors of
// torch.autograd.forward_ad) and torch.func's differentiating transforms (grad, vjp, jvp,
// jacrev, ...) would otherwise fail in autograd with a message that names no op; this check
// runs before the kernel and names it. It raises NotImplementedError, which the drop-ins
// answer with Esper's eager math (validation.DECLINED).
void check_first_order_only(const std::string& op, const variable_list& tensors) {
  const auto& functorch_tls = at::functorch::functorchTLSAccessor();
  if (functorch_tls) {
    try {
      functorch_tls->checkSupportsCppAutogradFunction();
    } catch (const c10::Error&) {
      TORCH_CHECK_NOT_IMPLEMENTED(
          false, op,
          ": torch.func's differentiating transforms (grad, vjp, jvp, jacrev, ...) are not "
          "supported by the fused op; call it outside the transform, or use backend=\"reference\"");
    }
  }
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !(t.defined() && t._fw_grad(0).defined()), op,
        ": forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not supported: "
        "the fused op has no forward derivative; use backend=\"reference\" for it");
  }
}

// An op with a backward op saves its inputs, and autograd cannot save an inference tensor.
// Eager math that saves none of its inputs takes one (eager ADD of an inference-mode host and
// a seed that requires grad, alpha wanting none), so this raises NotImplementedError, which
// the drop-ins answer with Esper's eager math, rather than autograd's RuntimeError.
void check_savable(const std::string& op, const variable_list& tensors) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !(t.defined() && t.is_inference()), op,
        ": an input is an inference tensor (made under torch.inference_mode()), which autograd "
        "cannot save for the backward, and the fused op saves its inputs; make it outside "
        "inference mode (or clone() it) to record this call");
  }
}

// ---------------------------------------------------------------- autograd
// One autograd convention for every op, read off the schemas (optable.py). A forward op's
// backward op kasmina::<op>_backward takes (grad, the forward's arguments, a
// need_<input>_grad flag for some inputs) and returns one gradient per tensor input, a
// placeholder where none is needed; STE has no backward op (its gradient is the identity).
// Where the backend also has kasmina::<op>_for_backward for the inputs' device, the forward
// runs that instead: it returns the value and a residual (what the backward would otherwise
// recompute, or an empty placeholder), which the backward op takes as its last argument.
// Backward and for_backward ops have no derivative of their own: when autograd records one
// (create_graph=True) its outputs get a grad_fn that raises, naming the op, if differentiated,
// so double backward is an error, never a silently zero second derivative.
struct Plan {
  std::string name;                                 // "kasmina::<op>"
  bool is_backward;                                 // a kasmina::*_backward op (for_backward too)
  std::optional<c10::OperatorHandle> backward;      // a forward op's backward op (not STE's)
  std::optional<c10::OperatorHandle> for_backward;  // its value-and-residual op, if any
  std::vector<size_t> tensors;                      // the tensor arguments' positions
  std::vector<size_t> need;                         // per need flag, its input's tensor index
  std::vector<size_t> clamped;                      // alpha's and gate's tensor indices
  size_t num_args;
};

// The names of the inputs the eager math reads only through a clamp (alpha, gate), as
// register_autograd is given them (at import; plans read them from any thread).
std::vector<std::string>& clamped_input_names() {
  static std::vector<std::string> names;
  return names;
}

Plan make_plan(const c10::OperatorHandle& op) {
  const auto& schema = op.schema();
  const std::string suffix = "_backward";
  const std::string& name = schema.name();
  Plan plan{name, name.ends_with(suffix), std::nullopt, std::nullopt, {}, {}, {}, schema.arguments().size()};
  if (!plan.is_backward) {
    plan.backward = c10::Dispatcher::singleton().findOp({name + suffix, ""});
    plan.for_backward = c10::Dispatcher::singleton().findOp({name + "_for" + suffix, ""});
  }
  std::vector<std::string> names;
  for (size_t i = 0; i < schema.arguments().size(); ++i) {
    const auto& arg = schema.arguments()[i];
    if (arg.type()->isSubtypeOf(*c10::OptionalType::ofTensor())) {
      const auto& clamped = clamped_input_names();
      if (std::find(clamped.begin(), clamped.end(), arg.name()) != clamped.end()) {
        plan.clamped.push_back(plan.tensors.size());
      }
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

// A forward op's autograd Function. Its tensor arguments come in five optional slots (an op
// has at most five), after the plan and the dispatcher's call; autograd's edges are the
// present ones, in order. The context keeps the tensors, the plan's address (plans live as
// long as the library) and the other arguments.
using OptTensor = std::optional<at::Tensor>;

// Whether forwards keep residuals (kasmina_kernels.keep_residuals): off by default, so that a
// fused op saves only its inputs for backward. Process-wide.
std::atomic<bool> keep_residuals{false};

struct FusedFn : torch::autograd::Function<FusedFn> {
  static constexpr size_t kInputs = 5;  // the arguments before the tensor slots
  static constexpr size_t kSlots = 5;

  static at::Tensor forward(AutogradContext* ctx, const Plan* plan, const c10::OperatorHandle* op,
                            c10::DispatchKeySet keys, torch::jit::Stack* stack, bool keep_residual,
                            const OptTensor& t0, const OptTensor& t1, const OptTensor& t2,
                            const OptTensor& t3, const OptTensor& t4) {
    variable_list inputs;
    for (const OptTensor* t : {&t0, &t1, &t2, &t3, &t4}) {
      if (inputs.size() < plan->tensors.size()) inputs.push_back(t->value_or(at::Tensor()));
    }
    ctx->saved_data["plan"] = reinterpret_cast<int64_t>(plan);
    auto args = torch::jit::last(*stack, op->schema().arguments().size());
    for (size_t i = 0, k = 0; i < args.size(); ++i) {
      if (k < plan->tensors.size() && plan->tensors[k] == i) {
        ++k;
      } else {
        ctx->saved_data[std::to_string(i)] = args[i];
      }
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    const c10::DispatchKeySet below = keys & c10::after_ADInplaceOrView_keyset;
    if (keep_residual && plan->for_backward &&
        plan->for_backward->hasKernelForDispatchKey(inputs[0].is_cuda() ? c10::DispatchKey::CUDA
                                                                        : c10::DispatchKey::CPU)) {
      plan->for_backward->redispatchBoxed(below, stack);
      at::Tensor residual = torch::jit::pop(*stack).toTensor();  // saved last; none if empty
      inputs.push_back(residual.numel() > 0 ? std::move(residual) : at::Tensor());
    } else {
      op->redispatchBoxed(below, stack);
    }
    if (plan->backward) {
      ctx->save_for_backward(inputs);
    } else {  // STE: ds is the gradient in s's dtype
      ctx->saved_data["seed_dtype"] = static_cast<int64_t>(inputs[1].scalar_type());
    }
    return torch::jit::pop(*stack).toTensor();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Plan& p = *reinterpret_cast<const Plan*>(ctx->saved_data["plan"].toInt());
    variable_list out(kInputs + kSlots);
    const variable_list saved = p.backward ? ctx->get_saved_variables() : variable_list();
    std::vector<bool> need_grad;  // per tensor argument
    for (size_t k = 0, edge = 0; k < p.tensors.size(); ++k) {
      const bool present = saved.empty() || saved[k].defined();
      need_grad.push_back(present && ctx->needs_input_grad(edge));
      edge += present;
    }
    const auto needs = [&](size_t k) { return bool(need_grad[k]); };
    if (!p.backward) {
      const auto seed_dtype = static_cast<at::ScalarType>(ctx->saved_data["seed_dtype"].toInt());
      if (needs(0)) out[kInputs] = grads[0];
      if (needs(1)) out[kInputs + 1] = grads[0].to(seed_dtype);
      return out;
    }
    torch::jit::Stack stack{grads[0]};
    for (size_t i = 0, k = 0; i < p.num_args; ++i) {
      if (k < p.tensors.size() && p.tensors[k] == i) {
        const at::Tensor& t = saved[k++];
        stack.emplace_back(t.defined() ? c10::IValue(t) : c10::IValue());
      } else {
        stack.push_back(ctx->saved_data[std::to_string(i)]);
      }
    }
    for (size_t k : p.need) stack.emplace_back(needs(k));
    if (stack.size() < p.backward->schema().arguments().size()) {  // the residual, if kept
      const bool kept = saved.size() > p.tensors.size() && saved.back().defined();
      stack.emplace_back(kept ? c10::IValue(saved.back()) : c10::IValue());
    }
    p.backward->callBoxed(&stack);
    for (size_t k = 0; k < p.tensors.size(); ++k) {
      if (needs(k)) out[kInputs + k] = std::move(stack[k]).toTensor();
    }
    return out;
  }
};

// The Autograd kernel of every op: a forward op runs through FusedFn (which saves the op's
// inputs only) where autograd records it, and straight below autograd otherwise; a backward
// op runs below autograd, its outputs given an error node where autograd records them.
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
    const bool recording = requires_grad && torch::autograd::GradMode::is_enabled();
    if (p.is_backward) {
      NodePtr node;
      if (recording) node = error_node(p, inputs);
      redispatch_below_autograd(op, keys, stack);
      if (node) {
        for (const c10::IValue& y : torch::jit::last(*stack, op.schema().returns().size())) {
          torch::autograd::set_history(y.toTensor(), node);
        }
      }
      return;
    }
    check_first_order_only(p.name, inputs);
    if (!recording) {  // nothing for autograd to record: no Function node to build
      redispatch_below_autograd(op, keys, stack);
      return;
    }
    for (size_t k : p.clamped) {
      // alpha or gate made under inference_mode (an alpha cached on a validation pass) is saved
      // as a copy: the eager math saves its clamped copy, never the tensor it is given
      at::Tensor& w = inputs[k];
      if (w.defined() && w.is_inference() && !w.requires_grad()) w = w.clone();
    }
    if (p.backward) check_savable(p.name, inputs);
    inputs.resize(FusedFn::kSlots);
    const auto slot = [&](size_t k) {
      return inputs[k].defined() ? OptTensor(inputs[k]) : OptTensor();
    };
    const bool keep_residual = keep_residuals.load(std::memory_order_relaxed);
    stack->emplace_back(FusedFn::apply(&p, &op, keys, stack, keep_residual, slot(0), slot(1),
                                       slot(2), slot(3), slot(4)));
  }

 private:
  // torch holds autograd nodes in std::shared_ptr up to 2.12 and in c10::intrusive_ptr since;
  // both take ownership from a std::unique_ptr
  using NodePtr = decltype(torch::autograd::Edge::function);

  static void redispatch_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                        torch::jit::Stack* stack) {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }

  static NodePtr error_node(const Plan& p, const variable_list& inputs) {
    std::string forward = p.name.substr(0, p.name.size() - std::string("_backward").size());
    if (forward.ends_with("_for")) forward.resize(forward.size() - std::string("_for").size());
    return NodePtr(std::make_unique<torch::autograd::Error>(
        forward + ": double backward (differentiating a gradient computed with "
        "create_graph=True) is not supported: the fused kernel (" + p.name + ") has "
        "no derivative of its own; use backend=\"reference\" for higher-order derivatives",
        torch::autograd::collect_next_edges(inputs)));
  }

  std::once_flag once_;
  std::shared_ptr<const Plan> plan_;
};

}  // namespace

TORCH_LIBRARY_IMPL(kasmina, CPU, m) {
  const cpu::Kernels& k = *cpu_capability().kernels;
#define KK_REGISTER(name) m.impl(#name, k.name);
  KK_CPU_OPS(KK_REGISTER)
#undef KK_REGISTER
}

// Gives the named ops of the kasmina library (forward and backward ops, of any backend) the
// one autograd kernel; `clamped_inputs` names the inputs the eager math reads only through a
// clamp (alpha, gate). The libraries are never freed: dropping one drops its kernels.
void register_autograd(const std::vector<std::string>& names,
                       const std::vector<std::string>& clamped_inputs) {
  clamped_input_names() = clamped_inputs;
  auto* library = new torch::Library(torch::Library::IMPL, "kasmina", c10::DispatchKey::Autograd,
                                     __FILE__, __LINE__);
  for (const std::string& name : names) {
    library->impl(name.c_str(),
                  torch::CppFunction::makeFromBoxedFunctor(std::make_unique<AutogradKernel>()));
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
  m.def(
      "set_keep_residuals",
      [](bool enabled) { return kk::keep_residuals.exchange(enabled); },
      "Whether forwards keep residuals for their backward (process-wide); returns the previous "
      "setting",
      py::arg("enabled"));
  m.def("register_autograd", &kk::register_autograd,
        "Registers the fused ops' autograd kernel for the named kasmina ops, with the names of "
        "the inputs the eager math reads only through a clamp",
        py::arg("names"), py::arg("clamped_inputs"));
  const kk::cpu::Kernels& k = *kk::cpu_capability().kernels;
  m.def("tanh_f32", k.tanh_f32,
        "(tanh(x), 1 - tanh(x)^2) as the float32 CPU MULTIPLY and valve kernels compute them, "
        "elementwise (for tests)",
        pybind11::arg("x"));
}
