// Register-tiled small GEMM for the gate MLP, at the capability's vector width.
#include "cpu/small_gemm.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

namespace kk::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using DVec = at::vec::Vectorized<double>;
constexpr int64_t V = DVec::size();

// a's element as M: exact (every A here widens exactly into double, and double into long double)
template <typename M, typename A>
M widen(A v) {
  if constexpr (std::is_same_v<A, M>) {
    return v;
  } else {
    return static_cast<M>(static_cast<double>(v));
  }
}

// Rows [i0, i0 + RI) by columns [k0, k0 + NV * V) of the output: an RI x NV tile of vector
// accumulators held in registers while m runs, so each loaded vector of bm feeds RI products
// and each broadcast of a feeds NV. `packed` holds the tile's rows of a interleaved
// (packed[m * RI + r] = a(i0 + r, m)), one sequential stream.
template <int RI, int NV>
void gemm_tile(int64_t i0, int64_t k0, int64_t Mdim, int64_t K, const double* packed,
               const double* bm, const double* row_bias, const double* col_bias, double* out) {
  DVec acc[RI][NV];
  for (int q = 0; q < NV; ++q) {
    for (int r = 0; r < RI; ++r) {
      acc[r][q] = col_bias ? DVec::loadu(col_bias + k0 + q * V)
                           : DVec(row_bias ? row_bias[i0 + r] : 0.0);
    }
  }
  for (int64_t m = 0; m < Mdim; ++m) {
    DVec bv[NV];
    for (int q = 0; q < NV; ++q) bv[q] = DVec::loadu(bm + m * K + k0 + q * V);
    for (int r = 0; r < RI; ++r) {
      const DVec s(packed[m * RI + r]);
      for (int q = 0; q < NV; ++q) acc[r][q] = at::vec::fmadd(s, bv[q], acc[r][q]);
    }
  }
  for (int r = 0; r < RI; ++r) {
    for (int q = 0; q < NV; ++q) acc[r][q].store(out + (i0 + r) * K + k0 + q * V);
  }
}

// Rows [i0, i0 + RI), every column that fills a vector: a's rows packed once (in L1 for the
// whole row), then the columns two vectors at a time.
template <int RI, typename A>
void gemm_rows(int64_t i0, int64_t Mdim, int64_t K, const A* a, int64_t a_si, int64_t a_sm,
               const double* bm, const double* row_bias, const double* col_bias, double* out,
               double* packed) {
  for (int64_t m = 0; m < Mdim; ++m) {
    for (int r = 0; r < RI; ++r) packed[m * RI + r] = widen<double>(a[(i0 + r) * a_si + m * a_sm]);
  }
  int64_t k0 = 0;
  for (; k0 + 2 * V <= K; k0 += 2 * V) {
    gemm_tile<RI, 2>(i0, k0, Mdim, K, packed, bm, row_bias, col_bias, out);
  }
  if (k0 + V <= K) gemm_tile<RI, 1>(i0, k0, Mdim, K, packed, bm, row_bias, col_bias, out);
}

}  // namespace

// Double: register tiles of 6 rows (6 x 2 accumulators, 2 loaded vectors and a broadcast: 15
// registers, which AVX2's 16 hold) over packed rows of a; long double and the last K % V
// columns: plain loops (double ones with std::fma, as the tiles round).
template <typename M, typename A>
void small_gemm(int64_t I, int64_t Mdim, int64_t K, const A* a, int64_t a_si, int64_t a_sm,
                const M* bm, const M* row_bias, const M* col_bias, M* out) {
  int64_t k0 = 0;
  if constexpr (std::is_same_v<M, double>) {
    constexpr int kRows = 6;
    std::vector<double> packed(kRows * Mdim);
    double* p = packed.data();
    int64_t i = 0;
    for (; i + kRows <= I; i += kRows) {
      gemm_rows<kRows>(i, Mdim, K, a, a_si, a_sm, bm, row_bias, col_bias, out, p);
    }
    [&]<int... R>(std::integer_sequence<int, R...>) {  // the last I % kRows rows, once
      ((I - i == R + 1 ? gemm_rows<R + 1>(i, Mdim, K, a, a_si, a_sm, bm, row_bias, col_bias, out, p)
                       : void()), ...);
    }(std::make_integer_sequence<int, kRows - 1>{});
    k0 = K - K % V;  // the columns gemm_rows covered
  }
  if (k0 == K) return;
  for (int64_t i = 0; i < I; ++i) {
    M* o = out + i * K;
    for (int64_t k = k0; k < K; ++k) o[k] = col_bias ? col_bias[k] : row_bias ? row_bias[i] : M(0);
    for (int64_t m = 0; m < Mdim; ++m) {
      const M s = widen<M>(a[i * a_si + m * a_sm]);
      const M* row = bm + m * K;
      for (int64_t k = k0; k < K; ++k) {
        if constexpr (std::is_same_v<M, double>) {
          o[k] = std::fma(s, row[k], o[k]);
        } else {
          o[k] += s * row[k];
        }
      }
    }
  }
}

#define KK_SMALL_GEMM(M, A)                                                                     \
  template void small_gemm<M, A>(int64_t, int64_t, int64_t, const A*, int64_t, int64_t, const M*, \
                                 const M*, const M*, M*);
KK_SMALL_GEMM(double, double)
KK_SMALL_GEMM(double, float)
KK_SMALL_GEMM(double, c10::BFloat16)
KK_SMALL_GEMM(double, c10::Half)
KK_SMALL_GEMM(long double, long double)
KK_SMALL_GEMM(long double, double)
KK_SMALL_GEMM(long double, float)
KK_SMALL_GEMM(long double, c10::BFloat16)
KK_SMALL_GEMM(long double, c10::Half)
#undef KK_SMALL_GEMM

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu

