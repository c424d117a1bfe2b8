// The small kernels around the blend weights: the fixed-order reductions that finish a
// blend backward (per-block partial sums, or per-element terms for a general broadcast
// weight), the clamp masks and casts back to the weight's dtype, and gate_effective_alpha
// forward and backward. One block per output element, threads striding in a fixed order,
// then a fixed tree: deterministic, no atomics.
#include "device_utils.cuh"
#include "reduce.h"

namespace kk::cuda {
namespace detail {
namespace {

constexpr int kReduceThreads = 256;

KK_DEV void finish(const FinishArgs& f, int64_t j, double v) {
  if (f.kind == Finish::kStoreDouble) {
    f.out_double[j] = v;
    return;
  }
  double mask_on = read_weight(f.alpha, j);
  if (f.kind == Finish::kMultiply) mask_on = round_to(f.host, mask_on);
  const double d = kk::clamp01_passes_grad(mask_on) ? v : 0.0;
  store_from_double(f.out.ptr, f.out.dtype, j, d);
}

__global__ void __launch_bounds__(kReduceThreads)
    reduce_partials_kernel(const double* partials, int64_t per_group,
                           const __grid_constant__ FinishArgs f) {
  __shared__ double scratch[32];
  const int64_t j = blockIdx.x;
  CompensatedSum acc;
  for (int64_t q = threadIdx.x; q < per_group; q += blockDim.x) acc.add(partials[j * per_group + q]);
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) finish(f, j, total);
}

template <typename V>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_general_kernel(const V* src, const __grid_constant__ ReduceMap map,
                          const __grid_constant__ FinishArgs f) {
  __shared__ double scratch[32];
  const int64_t j = blockIdx.x;
  const int64_t base = map_offset(map.kept, j);
  CompensatedSum acc;
  for (int64_t m = threadIdx.x; m < map.free_count; m += blockDim.x) {
    acc.add(static_cast<double>(src[base + map_offset(map.free, m)]));
  }
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) finish(f, j, total);
}

struct GateTerms {
  double da, dg;
};

// d(effective alpha) at W element i, through clamp01(round(clamp01(a) * clamp01(g))): the
// outer clamp passes on the rounded product, each inner clamp on its own input.
KK_DEV GateTerms gate_terms(const GateWeightsParams& p, int64_t i) {
  const double de = read_weight(p.grad, i);
  const double a = read_weight(p.alpha, i);
  const double g = read_weight(p.gate, i);
  const double ca = kk::clamp01(a), cg = kk::clamp01(g);
  const double prod = round_to(p.promoted, ca * cg);
  const double dp = kk::clamp01_passes_grad(prod) ? de : 0.0;
  return {kk::clamp01_passes_grad(a) ? dp * cg : 0.0, kk::clamp01_passes_grad(g) ? dp * ca : 0.0};
}

// Blocks [0, alpha.numel) produce dalpha, the rest dgate; each sums its preimage over W.
__global__ void __launch_bounds__(kReduceThreads)
    gate_weights_backward_kernel(const __grid_constant__ GateWeightsParams p) {
  __shared__ double scratch[32];
  const int64_t block = blockIdx.x;
  const bool for_alpha = block < p.dalpha.numel;
  const WeightGrad& out = for_alpha ? p.dalpha : p.dgate;
  const int64_t t = for_alpha ? block : block - p.dalpha.numel;
  const int64_t base = map_offset(out.from_w.kept, t);
  CompensatedSum acc;
  for (int64_t m = threadIdx.x; m < out.from_w.free_count; m += blockDim.x) {
    const GateTerms terms = gate_terms(p, base + map_offset(out.from_w.free, m));
    acc.add(for_alpha ? terms.da : terms.dg);
  }
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) store_from_double(out.ptr, out.dtype, t, total);
}

__global__ void __launch_bounds__(kReduceThreads)
    gate_effective_forward_kernel(const __grid_constant__ GateWeightsParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < p.weight_numel;
       j += stride) {
    const double a = read_weight(p.alpha, j);
    const double g = read_weight(p.gate, j);
    const double e = kk::clamp01(round_to(p.promoted, kk::clamp01(a) * kk::clamp01(g)));
    store_from_double(p.out, p.promoted, j, e);
  }
}

}  // namespace

cudaError_t launch_reduce_partials(const double* partials, int64_t targets, int64_t per_group,
                                   const FinishArgs& f, cudaStream_t stream) {
  if (targets <= 0) return cudaSuccess;
  if (targets > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  reduce_partials_kernel<<<static_cast<unsigned>(targets), kReduceThreads, 0, stream>>>(
      partials, per_group, f);
  return cudaGetLastError();
}

cudaError_t launch_reduce_general(const void* src, DType src_dtype, const ReduceMap& map,
                                  int64_t targets, const FinishArgs& f, cudaStream_t stream) {
  if (targets <= 0) return cudaSuccess;
  if (targets > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(targets);
  if (src_dtype == DType::kDouble) {
    reduce_general_kernel<double><<<grid, kReduceThreads, 0, stream>>>(
        static_cast<const double*>(src), map, f);
  } else if (src_dtype == DType::kFloat) {
    reduce_general_kernel<float><<<grid, kReduceThreads, 0, stream>>>(
        static_cast<const float*>(src), map, f);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_gate_weights_backward(const GateWeightsParams& p) {
  const int64_t blocks = p.dalpha.numel + p.dgate.numel;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  gate_weights_backward_kernel<<<static_cast<unsigned>(blocks), kReduceThreads, 0, p.stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail

cudaError_t launch_gate_effective_forward(const GateWeightsParams& p) {
  if (p.weight_numel <= 0) return cudaSuccess;
  const int64_t blocks = (p.weight_numel + detail::kReduceThreads - 1) / detail::kReduceThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  detail::gate_effective_forward_kernel<<<grid, detail::kReduceThreads, 0, p.stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_gate_effective_backward(const GateWeightsParams& p) {
  return detail::launch_gate_weights_backward(p);
}

}  // namespace kk::cuda
