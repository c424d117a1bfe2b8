// Loop drivers shared by the CPU kernels. TensorIterator does the broadcasting, the mixed
// strides and memory formats; these helpers run a kernel's row bodies over it, and split the
// backward pass into fixed blocks (independent of the thread count, so sums are bit-stable)
// that never straddle a sample, for the per-sample alpha/gate partial sums.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace kk::cpu {

// Compensated (Neumaier) sum in long double (a 64-bit significand on x86-64), so float64
// inputs keep their last bits over long rows and into single-value gradients.
struct Accumulator {
  long double sum = 0.0L;
  long double comp = 0.0L;
  void add(long double x) {
    const long double t = sum + x;
    if (std::fabs(sum) >= std::fabs(x)) {
      comp += (sum - t) + x;
    } else {
      comp += (x - t) + sum;
    }
    sum = t;
  }
  // an infinite or NaN sum makes the compensation NaN (inf - inf): the sum alone is the answer
  long double value_ld() const { return std::isfinite(sum) ? sum + comp : sum; }
};

// An iterator over outputs then inputs, which may differ in dtype and layout.
inline at::TensorIterator make_iter(
    std::initializer_list<std::reference_wrapper<const at::Tensor>> outputs,
    std::initializer_list<std::reference_wrapper<const at::Tensor>> inputs) {
  at::TensorIteratorConfig config;
  config.check_all_same_dtype(false).resize_outputs(false).set_check_mem_overlap(true);
  for (const at::Tensor& t : outputs) config.add_output(t);
  for (const at::Tensor& t : inputs) config.add_const_input(t);
  return config.build();
}

// Runs each row of a TensorIterator loop: `vec_body(p, n0)` when every operand is contiguous
// along the row (the operand at index `weight_arg`, if any, may also be broadcast with stride
// 0); it returns how many leading elements it handled, and `scalar_body(p, strides, i)` does
// the rest element by element.
template <int N, bool kVec, typename VecBody, typename ScalarBody>
inline void run_rows(char** data, const int64_t* strides, int64_t n0, int64_t n1,
                     const std::array<int64_t, N>& elem_size, int weight_arg,
                     VecBody&& vec_body, ScalarBody&& scalar_body) {
  std::array<char*, N> p;
  bool contiguous = kVec;
  if constexpr (kVec) {
    for (int k = 0; k < N; ++k) {
      const bool dense = strides[k] == elem_size[k];
      const bool broadcast = (k == weight_arg) && strides[k] == 0;
      contiguous = contiguous && (dense || broadcast);
    }
  }
  for (int64_t j = 0; j < n1; ++j) {
    for (int k = 0; k < N; ++k) p[k] = data[k] + j * strides[N + k];
    int64_t i = 0;
    if constexpr (kVec) {
      if (contiguous) i = vec_body(p, n0);
    }
    for (; i < n0; ++i) scalar_body(p, strides, i);
  }
}

// Calls `block(group, begin, end)` over fixed blocks of [0, groups * group_size) that never
// straddle a group, in parallel. The blocks do not depend on the thread count.
template <typename Block>
void for_each_block(int64_t groups, int64_t group_size, Block&& block) {
  constexpr int64_t kBlock = 16384;
  if (groups == 0 || group_size == 0) return;
  const int64_t blocks_per_group = (group_size + kBlock - 1) / kBlock;
  const int64_t block_len = std::min(kBlock, group_size);
  const int64_t grain = std::max<int64_t>(1, kBlock / block_len);
  at::parallel_for(0, groups * blocks_per_group, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t k = b0; k < b1; ++k) {
      const int64_t group = k / blocks_per_group;
      const int64_t begin = group * group_size + (k % blocks_per_group) * block_len;
      const int64_t end = std::min(begin + block_len, (group + 1) * group_size);
      block(k, group, begin, end);
    }
  });
}

// Sums `block_sum(group, begin, end)` over those blocks and returns one double per group of
// `group_size` consecutive elements (one group per sample when the iteration order has the
// batch outermost; a single group for a scalar weight). Fixed blocks, fixed summation order:
// the same bits on every run and any thread count.
template <typename BlockSum>
std::vector<long double> grouped_sums(int64_t groups, int64_t group_size, BlockSum&& block_sum) {
  std::vector<long double> sums(groups, 0.0L);
  if (groups == 0 || group_size == 0) return sums;
  constexpr int64_t kBlock = 16384;
  const int64_t blocks_per_group = (group_size + kBlock - 1) / kBlock;
  std::vector<long double> partial(groups * blocks_per_group, 0.0L);
  for_each_block(groups, group_size, [&](int64_t k, int64_t group, int64_t begin, int64_t end) {
    partial[k] = block_sum(group, begin, end);
  });
  for (int64_t g = 0; g < groups; ++g) {
    long double acc = 0.0L;
    for (int64_t j = 0; j < blocks_per_group; ++j) acc += partial[g * blocks_per_group + j];
    sums[g] = acc;
  }
  return sums;
}

}  // namespace kk::cpu
