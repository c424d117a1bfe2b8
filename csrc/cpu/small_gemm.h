// The gate network's small products ((B, C) x (C, hidden) and back), single-threaded.
#pragma once

#include <cstdint>

namespace kk::cpu {

// out (I x K, row-major) = bias (per k, or none) + sum over m of a(i, m) * bm[m * K + k], with
// a(i, m) at a[i * a_si + m * a_sm]. Each sum runs over m in order, one fused multiply-add per
// term (one fixed order whatever the thread count or vector width: it runs on the calling
// thread, and the double results are the same bits in AVX2 and AVX-512 builds). Defined for
// M = double and long double.
template <typename M>
void small_gemm(int64_t I, int64_t Mdim, int64_t K, const M* a, int64_t a_si, int64_t a_sm,
                const M* bm, const M* bias, M* out);

}  // namespace kk::cpu
