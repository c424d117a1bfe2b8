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
using blend_multiply_backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const std::optional<at::Tensor>& seed_input, bool need_alpha_grad, bool need_seed_input_grad);

using ste_forward = at::Tensor(const at::Tensor& h, const at::Tensor& s);

using multiply_valve_multiplier = at::Tensor(const at::Tensor& alpha, const at::Tensor& m);
using multiply_valve_multiplier_backward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& grad, const at::Tensor& alpha, const at::Tensor& m, bool need_alpha_grad);

// The float32 tanh of MULTIPLY and the valve and its 1 - tanh^2 (kernels/blend_math.h's
// tanh_with_grad), elementwise over a float32 tensor: kasmina_kernels._C.tanh_f32, for tests.
using tanh_f32 = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x);
// The double tanh of the float32 MULTIPLY and valve alpha-gradient terms (tanh_pd in
// cpu/blend_kernels.h; std::tanh in the DEFAULT capability), elementwise over a float64
// tensor: kasmina_kernels._C.tanh_f64, for the tests.
using tanh_f64 = at::Tensor(const at::Tensor& x);

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

// One capability's kernels.
struct Kernels {
  sig::blend_add* blend_add;
  sig::blend_add_backward* blend_add_backward;
  sig::blend_gate* blend_gate;
  sig::blend_gate_backward* blend_gate_backward;
  sig::blend_multiply* blend_multiply;
  sig::blend_multiply_backward* blend_multiply_backward;
  sig::ste_forward* ste_forward;
  sig::multiply_valve_multiplier* multiply_valve_multiplier;
  sig::multiply_valve_multiplier_backward* multiply_valve_multiplier_backward;
  sig::tanh_f32* tanh_f32;
  sig::tanh_f64* tanh_f64;
  sig::gate_effective_alpha* gate_effective_alpha;
  sig::gate_effective_alpha_backward* gate_effective_alpha_backward;
  sig::gated_pool* gated_pool;
  sig::gated_pool_backward* gated_pool_backward;
  sig::gate_network* gate_network;
  sig::gate_network_backward* gate_network_backward;
};

// The table of each compiled capability (kernel_table.cpp; setup.py defines KK_CPU_AVX2 and
// KK_CPU_AVX512 where it compiles those).
extern const Kernels kernels_DEFAULT;
extern const Kernels kernels_AVX2;
extern const Kernels kernels_AVX512;

#ifdef CPU_CAPABILITY
// In a kernel translation unit: this capability's copy of the kernels.
inline namespace CPU_CAPABILITY {
sig::blend_add blend_add;
sig::blend_add_backward blend_add_backward;
sig::blend_gate blend_gate;
sig::blend_gate_backward blend_gate_backward;
sig::blend_multiply blend_multiply;
sig::blend_multiply_backward blend_multiply_backward;
sig::ste_forward ste_forward;
sig::multiply_valve_multiplier multiply_valve_multiplier;
sig::multiply_valve_multiplier_backward multiply_valve_multiplier_backward;
sig::tanh_f32 tanh_f32;
sig::tanh_f64 tanh_f64;
sig::gate_effective_alpha gate_effective_alpha;
sig::gate_effective_alpha_backward gate_effective_alpha_backward;
sig::gated_pool gated_pool;
sig::gated_pool_backward gated_pool_backward;
sig::gate_network gate_network;
sig::gate_network_backward gate_network_backward;
}  // namespace CPU_CAPABILITY
#endif

}  // namespace kk::cpu
