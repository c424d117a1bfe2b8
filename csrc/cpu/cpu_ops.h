// CPU implementations of the kasmina ops (registered in ops/registration.cpp).
//
// setup.py compiles csrc/cpu once per CPU capability (ATen's names: DEFAULT, and AVX2 and
// AVX512 on x86-64), each copy with its vector flags and in its own namespace
// kk::cpu::<CAPABILITY>, so the copies never share a symbol. kernel_table.cpp gives each copy's
// entry points as one Kernels table; ops/registration.cpp, compiled once without vector flags,
// registers the table of the capability this process runs (cpu_capability() there).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kk::cpu {

// The kernels' function types, which the CUDA implementations (cuda/glue.cpp) and the
// dispatcher's typed handles (ops/registration.cpp) share.
namespace sig {
using blend_add = at::Tensor(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha);
using blend_add_backward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    bool need_alpha_grad);

using blend_gate = at::Tensor(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                              const at::Tensor& gate);
using blend_gate_backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const at::Tensor& gate, bool need_alpha_grad, bool need_gate_grad);

using blend_multiply = at::Tensor(const at::Tensor& h, const at::Tensor& s,
                                  const at::Tensor& alpha,
                                  const std::optional<at::Tensor>& seed_input);
// (the value, and the complement of the tanh of s - r, 1 - |tanh| with tanh's sign, that
// blend_multiply_backward reads when given it; an empty placeholder where a kernel keeps none)
using blend_multiply_for_backward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const std::optional<at::Tensor>& seed_input);
using blend_multiply_backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const std::optional<at::Tensor>& seed_input, bool need_alpha_grad, bool need_seed_input_grad,
    const std::optional<at::Tensor>& tanh_complement);

using ste_forward = at::Tensor(const at::Tensor& h, const at::Tensor& s);

using multiply_valve_multiplier = at::Tensor(const at::Tensor& alpha, const at::Tensor& m);
using multiply_valve_multiplier_backward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& grad, const at::Tensor& alpha, const at::Tensor& m, bool need_alpha_grad);

// The float32 tanh of MULTIPLY and the valve and its 1 - tanh^2 (kernels/blend_math.h's
// tanh_with_grad), elementwise over a float32 tensor: kasmina_kernels._C.tanh_f32, for tests.
using tanh_f32 = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x);

using gate_effective_alpha = at::Tensor(const at::Tensor& alpha, const at::Tensor& gate);
// The CPU kernels compute both weight gradients whenever one is asked for; the flags let the
// CUDA ones leave an unwanted gradient on the device.
using gate_effective_alpha_backward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& grad, const at::Tensor& alpha, const at::Tensor& gate,
    bool need_alpha_grad, bool need_gate_grad);

using gated_pool = at::Tensor(const at::Tensor& x, c10::string_view topology);
using gated_pool_backward = at::Tensor(const at::Tensor& grad, const at::Tensor& x,
                                       c10::string_view topology);

using gate_network = at::Tensor(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2,
                                c10::string_view topology);
using gate_network_backward =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
        const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology);
}  // namespace sig

// The ops registered for the CPU (ops/registration.cpp), X(name) for each.
#define KK_CPU_OPS(X)                                                                       \
  X(blend_add) X(blend_add_backward) X(blend_gate) X(blend_gate_backward) X(blend_multiply)  \
  X(blend_multiply_for_backward) X(blend_multiply_backward) X(ste_forward)                  \
  X(multiply_valve_multiplier) X(multiply_valve_multiplier_backward) X(gate_effective_alpha) \
  X(gate_effective_alpha_backward) X(gated_pool) X(gated_pool_backward) X(gate_network)      \
  X(gate_network_backward)

// Every kernel, once, in the order of the Kernels table: the ops and the tests' tanh helpers.
#define KK_CPU_KERNELS(X) KK_CPU_OPS(X) X(tanh_f32)

// One capability's kernels.
struct Kernels {
#define KK_FIELD(name) sig::name* name;
  KK_CPU_KERNELS(KK_FIELD)
#undef KK_FIELD
};

// The table of each compiled capability (kernel_table.cpp; setup.py defines KK_CPU_AVX2 and
// KK_CPU_AVX512 where it compiles those).
extern const Kernels kernels_DEFAULT;
extern const Kernels kernels_AVX2;
extern const Kernels kernels_AVX512;

#ifdef CPU_CAPABILITY
// In a kernel translation unit: this capability's copy of the kernels.
inline namespace CPU_CAPABILITY {
#define KK_DECLARE(name) sig::name name;
KK_CPU_KERNELS(KK_DECLARE)
#undef KK_DECLARE
}  // namespace CPU_CAPABILITY
#endif

}  // namespace kk::cpu
