// This capability's Kernels table (cpu_ops.h), kernels_<CPU_CAPABILITY>.
#include "cpu/cpu_ops.h"

#define KK_CONCAT_(a, b) a##b
#define KK_CONCAT(a, b) KK_CONCAT_(a, b)

namespace kk::cpu {

#if defined(CPU_CAPABILITY_AVX512)
// pool_cpu.cpp is written for 8 float lanes and pooling is memory-bound: the AVX512
// capability has no copy of it and takes AVX2's, which every AVX-512 CPU runs (setup.py
// compiles AVX2 wherever it compiles AVX512).
namespace AVX2 {
sig::gated_pool gated_pool;
sig::gated_pool_backward gated_pool_backward;
sig::gate_network gate_network;
sig::gate_network_backward gate_network_backward;
}  // namespace AVX2
namespace pool = AVX2;
#else
namespace pool = CPU_CAPABILITY;
#endif

constinit const Kernels KK_CONCAT(kernels_, CPU_CAPABILITY){
    .blend_add = &blend_add,
    .blend_add_backward = &blend_add_backward,
    .blend_gate = &blend_gate,
    .blend_gate_backward = &blend_gate_backward,
    .blend_multiply = &blend_multiply,
    .blend_multiply_backward = &blend_multiply_backward,
    .ste_forward = &ste_forward,
    .multiply_valve_multiplier = &multiply_valve_multiplier,
    .multiply_valve_multiplier_backward = &multiply_valve_multiplier_backward,
    .tanh_f32 = &tanh_f32,
    .tanh_f64 = &tanh_f64,
    .gate_effective_alpha = &gate_effective_alpha,
    .gate_effective_alpha_backward = &gate_effective_alpha_backward,
    .gated_pool = &pool::gated_pool,
    .gated_pool_backward = &pool::gated_pool_backward,
    .gate_network = &pool::gate_network,
    .gate_network_backward = &pool::gate_network_backward,
};

}  // namespace kk::cpu
