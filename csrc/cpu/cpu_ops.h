// CPU implementations of the kasmina ops (registered in ops/registration.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kk::cpu {

at::Tensor blend_add(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha);
std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_add_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    bool need_alpha_grad);

at::Tensor blend_gate(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                      const at::Tensor& gate);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_gate_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const at::Tensor& gate, bool need_alpha_grad, bool need_gate_grad);

at::Tensor blend_multiply(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                          const std::optional<at::Tensor>& seed_input);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_multiply_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const std::optional<at::Tensor>& seed_input, bool need_alpha_grad, bool need_seed_input_grad);

at::Tensor ste_forward(const at::Tensor& h, const at::Tensor& s);

at::Tensor multiply_valve_multiplier(const at::Tensor& alpha, const at::Tensor& m);
std::tuple<at::Tensor, at::Tensor> multiply_valve_multiplier_backward(
    const at::Tensor& grad, const at::Tensor& alpha, const at::Tensor& m, bool need_alpha_grad);

// The float32 tanh of MULTIPLY and the valve and its 1 - tanh^2 (kernels/blend_math.h's
// tanh_with_grad), elementwise over a float32 tensor: kasmina_kernels._C.tanh_f32, for tests.
std::tuple<at::Tensor, at::Tensor> tanh_f32(const at::Tensor& x);
// The double tanh of the float32 MULTIPLY and valve alpha-gradient terms (tanh_pd in
// cpu/blend_kernels.h; std::tanh in a build without AVX2), elementwise over a float64 tensor:
// kasmina_kernels._C.tanh_f64, for the tests.
at::Tensor tanh_f64(const at::Tensor& x);

at::Tensor gate_effective_alpha(const at::Tensor& alpha, const at::Tensor& gate);
// The CPU kernels compute both weight gradients whenever one is asked for; the flags let the
// CUDA ones leave an unwanted gradient on the device.
std::tuple<at::Tensor, at::Tensor> gate_effective_alpha_backward(const at::Tensor& grad,
                                                                 const at::Tensor& alpha,
                                                                 const at::Tensor& gate,
                                                                 bool need_alpha_grad,
                                                                 bool need_gate_grad);

at::Tensor gated_pool(const at::Tensor& x, c10::string_view topology);
at::Tensor gated_pool_backward(const at::Tensor& grad, const at::Tensor& x,
                               c10::string_view topology);

at::Tensor gate_network(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_network_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology);

}  // namespace kk::cpu
