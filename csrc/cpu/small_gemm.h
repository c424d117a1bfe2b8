// The gate network's small products ((B, C) x (C, hidden) and back), single-threaded.
#pragma once

#include <cstdint>

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

// out (I x K, row-major) = bias + sum over m of a(i, m) * bm[m * K + k], with a(i, m) read from
// a[i * a_si + m * a_sm] in its own type A and widened exactly to M as it is packed (so a
// weight is read through its strides, no converted copy). The bias is per output row
// (row_bias[i]), per output column (col_bias[k]) or none (both null); each sum starts from it.
// Each sum runs over m in order, one fused multiply-add per term (one fixed order whatever the
// thread count or vector width: it runs on the calling thread). Defined for M = double and
// long double, and A = M or any floating dtype a weight may have (double, float,
// c10::BFloat16, c10::Half).
template <typename M, typename A>
void small_gemm(int64_t I, int64_t Mdim, int64_t K, const A* a, int64_t a_si, int64_t a_sm,
                const M* bm, const M* row_bias, const M* col_bias, M* out);

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
