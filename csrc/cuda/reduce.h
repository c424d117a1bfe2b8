// Internal (CUDA-only, torch-free): the deterministic reductions that finish a blend
// backward, shared by blend_kernels.cu and weight_kernels.cu.
#pragma once

#include "kk_cuda.h"

namespace kk::cuda::detail {

// What happens to the finished sum v_j of weight element j.
enum class Finish : int32_t {
  kAdd = 0,          // dalpha_j = passes(alpha_j) ? v_j : 0, in alpha's dtype
  kMultiply = 1,     // dalpha_j = passes(alpha_j rounded to the host dtype) ? v_j : 0
  kValve = 2,        // dalpha_j = passes(alpha_j) ? v_j : 0
  kStoreDouble = 3,  // out_double[j] = v_j (GATE: d(effective alpha), finished by
                     // gate_weights_backward)
};

struct FinishArgs {
  Finish kind = Finish::kAdd;
  DType host = DType::kFloat;
  WeightSource alpha;  // mapped over the targets (W)
  WeightGrad out;      // kAdd / kMultiply / kValve
  double* out_double = nullptr;
};

// Target j sums partials[j * per_group + q] for q in [0, per_group) (zero when per_group is 0).
cudaError_t launch_reduce_partials(const double* partials, int64_t targets, int64_t per_group,
                                   const FinishArgs& f, cudaStream_t stream);

// Target j sums src over map (src is float or double, indexed linearly).
cudaError_t launch_reduce_general(const void* src, DType src_dtype, const ReduceMap& map,
                                  int64_t targets, const FinishArgs& f, cudaStream_t stream);

// d(effective alpha) over W (p.grad) through the clamps to p.dalpha and p.dgate.
cudaError_t launch_gate_weights_backward(const GateWeightsParams& p);

}  // namespace kk::cuda::detail
