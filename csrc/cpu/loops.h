// Loop drivers shared by the CPU kernels. TensorIterator does the broadcasting, the mixed
// strides and memory formats; these helpers run a kernel's row bodies over it, and split the
// backward pass into fixed blocks (independent of the thread count, so sums are bit-stable)
// that never straddle a sample, for the per-sample alpha/gate partial sums.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/cpu/utils.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "cpu/vec_io.h"

namespace kk::cpu {
inline namespace CPU_CAPABILITY {

// Compensated (Neumaier) sum: the error of a long row's sum stays near one rounding of the
// result, so a float64 sum is far inside its sqrt(n) slack (docs/semantics.md#equivalence).
// The blends sum in double (Accumulator); the float64 gate network, whose math is long double
// (pool_cpu.cpp), pools in long double.
template <typename V>
struct Compensated {
  V sum = 0;
  V comp = 0;
  void add(V x) {
    const V t = sum + x;
    if (std::fabs(sum) >= std::fabs(x)) {
      comp += (sum - t) + x;
    } else {
      comp += (x - t) + sum;
    }
    sum = t;
  }
  // an infinite or NaN sum makes the compensation NaN (inf - inf): the sum alone is the answer
  V value() const { return std::isfinite(sum) ? sum + comp : sum; }
};
using Accumulator = Compensated<double>;

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

// The next tile's moved operands (run_mixed_orders), prefetched one cache line at a time,
// evenly over the current tile's vector steps (each vector loop calls step() through
// tile_prefetch), as a hardware prefetcher would stream them: they lie in many short runs (one
// per channel), which the hardware prefetchers do not follow; issued as one burst per tile, the
// same prefetches gain nothing.
struct TilePrefetch {
  struct Runs {
    const char* first = nullptr;  // line-aligned start of run 0
    int64_t stride = 0;           // bytes between runs
    int64_t count = 0;            // runs
    int64_t lines = 0;            // lines per run
    int64_t credit = 0;           // lines due, in 1/steps units
    int64_t run = 0, line = 0;    // the next line to issue
    bool write = false;           // an output's lines (prefetched for writing)
  };
  Runs ops[8];
  int n = 0;
  int64_t steps = 1;  // vector steps of the tile

  void add(const char* start, int64_t stride, int64_t count, int64_t run_bytes, bool write) {
    if (n == 8 || count == 0 || run_bytes == 0) return;
    if (stride == run_bytes) {  // back to back: one run, each line once
      run_bytes *= count;
      count = 1;
    }
    const uintptr_t a = reinterpret_cast<uintptr_t>(start);
    Runs& r = ops[n++];
    r = Runs{};
    r.first = start - (a % 64);
    r.stride = stride;
    r.count = count;
    r.lines = (a % 64 + run_bytes + 63) / 64;
    r.write = write;
  }
  void step() {
    for (int k = 0; k < n; ++k) {
      Runs& r = ops[k];
      for (r.credit += r.count * r.lines; r.credit >= steps && r.run < r.count; r.credit -= steps) {
        const char* line = r.first + r.run * r.stride + r.line * 64;
        if (r.write) {
          __builtin_prefetch(line, 1, 3);
        } else {
          __builtin_prefetch(line, 0, 3);
        }
        if (++r.line == r.lines) {
          r.line = 0;
          ++r.run;
        }
      }
    }
  }
};
inline thread_local TilePrefetch* tile_prefetch = nullptr;

// Points tile_prefetch at one tile's plan (or at none) until the scope ends, however it ends.
struct TilePrefetchScope {
  explicit TilePrefetchScope(TilePrefetch* plan) { tile_prefetch = plan; }
  ~TilePrefetchScope() { tile_prefetch = nullptr; }
  TilePrefetchScope(const TilePrefetchScope&) = delete;
  TilePrefetchScope& operator=(const TilePrefetchScope&) = delete;
};

// Runs each row of a TensorIterator loop: `vec_body(p, n0, tile_prefetch)` when every operand
// is contiguous along the row (the operand at index `weight_arg`, if any, may also be broadcast
// with stride 0); it returns how many leading elements it handled, and
// `scalar_body(p, strides, i)` does the rest element by element. tile_prefetch is read once per
// call: a thread_local in a shared library costs a call to read.
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
  TilePrefetch* const prefetch = tile_prefetch;
  for (int64_t j = 0; j < n1; ++j) {
    for (int k = 0; k < N; ++k) p[k] = data[k] + j * strides[N + k];
    int64_t i = 0;
    if constexpr (kVec) {
      if (contiguous) i = vec_body(p, n0, prefetch);
    }
    for (; i < n0; ++i) scalar_body(p, strides, i);
  }
}

// Elements per block of grouped_sums, and the work per task of run_pass's short samples
constexpr int64_t kBlock = 16384;

// Sums `block_sum(group, begin, end)` over fixed blocks of [0, groups * group_size) that never
// straddle a group, in parallel, and returns one sum per group of `group_size` consecutive
// elements (one group per sample when the iteration order has the batch outermost; a single
// group for a scalar weight). The blocks and the summation order do not depend on the thread
// count: the same bits on every run.
template <typename BlockSum>
std::vector<double> grouped_sums(int64_t groups, int64_t group_size, BlockSum&& block_sum) {
  std::vector<double> sums(groups, 0.0);
  if (groups == 0 || group_size == 0) return sums;
  const int64_t blocks_per_group = (group_size + kBlock - 1) / kBlock;
  const int64_t block_len = std::min(kBlock, group_size);
  std::vector<double> partial(groups * blocks_per_group, 0.0);
  at::parallel_for(0, groups * blocks_per_group, std::max<int64_t>(1, kBlock / block_len),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t k = b0; k < b1; ++k) {
      const int64_t group = k / blocks_per_group;
      const int64_t begin = group * group_size + (k % blocks_per_group) * block_len;
      partial[k] = block_sum(group, begin, std::min(begin + block_len, (group + 1) * group_size));
    }
  });
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t j = 0; j < blocks_per_group; ++j) sums[g] += partial[g * blocks_per_group + j];
  }
  return sums;
}

// ---------------------------------------------------------------- mixed memory formats
// Per sample, a 4-D operand dense in NCHW order and one dense in NHWC (channels_last) order
// store the same C x HW matrix, one as the transpose of the other. Esper passes a
// channels_last host beside an NCHW seed and seed input on every call, so a pass over such
// operands walks the majority order ("primary") in tiles of whole rows and moves the other
// operands through small transposed buffers: every memory access stays sequential and the
// kernel's row loops run on contiguous rows, with no per-element index arithmetic.
enum class Order : uint8_t { kNchw, kNhwc, kEither, kNone };

inline Order order_of(const at::Tensor& t) {
  if (t.dim() != 4) return Order::kNone;
  const bool nchw = t.is_contiguous();
  const bool nhwc = t.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (nchw && nhwc) return Order::kEither;
  return nchw ? Order::kNchw : nhwc ? Order::kNhwc : Order::kNone;
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// 8 x 8 blocks of 32-bit elements in 256-bit rows. ATen's transpose_mxn<float, 8, 8> is this
// at AVX2, but at AVX512 it runs an 8 x 8 block through its masked 16 x 16 kernel, several
// times slower; the mixed-layout tiles are 8 wide wherever C is 8.
// `out[c]`: column c of the 8 x 8 block at src, as a row.
inline void transpose8x8_32_rows(const uint32_t* src, int64_t ld_src, __m256 (&out)[8]) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + i * ld_src));
  for (int i = 0; i < 8; i += 2) {  // (a0 b0 a1 b1 | a4 b4 a5 b5), (a2 b2 a3 b3 | a6 b6 a7 b7)
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // (a0 b0 c0 d0 | a4 b4 c4 d4), ...
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {  // the 128-bit halves of rows i and i + 4
    out[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    out[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
}

inline void transpose8x8_32(const uint32_t* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst) {
  __m256 rows[8];
  transpose8x8_32_rows(src, ld_src, rows);
  for (int c = 0; c < 8; ++c) _mm256_storeu_ps(reinterpret_cast<float*>(dst + c * ld_dst), rows[c]);
}

// dst (cols x rows) = transpose of src (rows x cols) for 32-bit elements, written past the cache
// (non-temporal stores) in whole 64-byte lines, for outputs too large to stay in cache: a
// plain store first reads the line it writes, and a line written in two halves, 8 x 8 block
// by block, can be evicted in between when the rows are a multiple of 4 KiB apart. Needs rows
// a multiple of 16, cols of 8 and 64-byte aligned dst rows; false (nothing written) otherwise.
// The caller ends its pass with stream_fence().
inline bool transpose_streaming_32(const uint32_t* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst,
                                   int64_t rows, int64_t cols) {
  if (rows % 16 != 0 || cols % 8 != 0 || reinterpret_cast<uintptr_t>(dst) % 64 != 0 ||
      ld_dst % 16 != 0) {
    return false;
  }
  // two 8 x 8 blocks give 8 output lines, each from two 256-bit halves joined in registers
  // (a 512-bit reload of two 256-bit stores would wait for both to reach the cache)
  for (int64_t i = 0; i < rows; i += 16) {
    for (int64_t j = 0; j < cols; j += 8) {
      __m256 left[8], right[8];
      transpose8x8_32_rows(src + i * ld_src + j, ld_src, left);
      transpose8x8_32_rows(src + (i + 8) * ld_src + j, ld_src, right);
      for (int c = 0; c < 8; ++c) {
        uint32_t* line = dst + (j + c) * ld_dst + i;
#if defined(CPU_CAPABILITY_AVX512)
        stream_store(line, _mm512_insertf32x8(_mm512_castps256_ps512(left[c]), right[c], 1));
#else
        stream_store(line, left[c]);
        stream_store(line + 8, right[c]);
#endif
      }
    }
  }
  return true;
}

// 8 x 8 blocks of 16-bit elements in 128-bit rows.
inline void transpose8x8_16(const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  __m128i r[8], a[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ld_src));
  for (int i = 0; i < 8; i += 2) {
    a[i] = _mm_unpacklo_epi16(r[i], r[i + 1]);
    a[i + 1] = _mm_unpackhi_epi16(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm_unpacklo_epi32(a[i], a[i + 2]);
    r[i + 1] = _mm_unpackhi_epi32(a[i], a[i + 2]);
    r[i + 2] = _mm_unpacklo_epi32(a[i + 1], a[i + 3]);
    r[i + 3] = _mm_unpackhi_epi32(a[i + 1], a[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i) * ld_dst), _mm_unpacklo_epi64(r[i], r[i + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i + 1) * ld_dst), _mm_unpackhi_epi64(r[i], r[i + 4]));
  }
}
#endif

// dst (cols x rows, leading dimension ld_dst) = transpose of src (rows x cols, ld_src): whole
// 8 x 8 blocks through registers where this build has AVX2 (or AVX512), the edges by ATen's
// plain loop.
template <typename U>
inline void transpose_blocks(const U* src, int64_t ld_src, U* dst, int64_t ld_dst, int64_t rows,
                             int64_t cols) {
  using at::native::utils::transpose;
  int64_t rows8 = 0, cols8 = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(U) == 4 || sizeof(U) == 2) {
    rows8 = rows / 8 * 8;
    cols8 = cols / 8 * 8;
    for (int64_t i = 0; i < rows8; i += 8) {
      for (int64_t j = 0; j < cols8; j += 8) {
        if constexpr (sizeof(U) == 4) {
          transpose8x8_32(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
        } else {
          transpose8x8_16(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
        }
      }
    }
  }
#endif
  // the right edge of the block rows, then the bottom rows
  if (cols8 < cols) transpose(rows8, cols - cols8, src + cols8, ld_src, dst + cols8 * ld_dst, ld_dst);
  if (rows8 < rows) transpose(rows - rows8, cols, src + rows8 * ld_src, ld_src, dst + rows8, ld_dst);
}

inline void transpose_elements(const char* src, int64_t ld_src, char* dst, int64_t ld_dst,
                               int64_t rows, int64_t cols, int64_t elem) {
  switch (elem) {
    case 2:
      return transpose_blocks(reinterpret_cast<const uint16_t*>(src), ld_src,
                              reinterpret_cast<uint16_t*>(dst), ld_dst, rows, cols);
    case 4:
      return transpose_blocks(reinterpret_cast<const uint32_t*>(src), ld_src,
                              reinterpret_cast<uint32_t*>(dst), ld_dst, rows, cols);
    case 8:
      return transpose_blocks(reinterpret_cast<const uint64_t*>(src), ld_src,
                              reinterpret_cast<uint64_t*>(dst), ld_dst, rows, cols);
    default:
      return transpose_blocks(reinterpret_cast<const uint8_t*>(src), ld_src,
                              reinterpret_cast<uint8_t*>(dst), ld_dst, rows, cols);
  }
}

// Whether run_mixed_orders can run these operands: same 4-D sizes, each dense in NCHW or
// NHWC order, not all in the same one.
inline bool mixed_orders(const std::vector<at::Tensor>& operands) {
  bool nchw = false, nhwc = false;
  for (const at::Tensor& t : operands) {
    if (t.sizes() != operands.front().sizes()) return false;
    switch (order_of(t)) {
      case Order::kNone:
        return false;
      case Order::kNchw:
        nchw = true;
        break;
      case Order::kNhwc:
        nhwc = true;
        break;
      case Order::kEither:
        break;
    }
  }
  return nchw && nhwc;
}

// The span of the address bits that 4K aliasing compares.
constexpr int64_t kPage = 4096;

// Where a moved operand's tile starts in its buffer, modulo kPage: the 64-byte offset farthest
// from the other streams of the tile (`taken`, their offsets modulo kPage). A load whose address
// matches a recent store's in its low 12 bits waits for that store (4K aliasing); the streams
// advance in step, so a buffer placed just behind another stream stalls every access of the
// tile, while where the allocator put it otherwise decides. Sorts `taken`.
inline int64_t far_offset(std::vector<uintptr_t>& taken) {
  if (taken.empty()) return 0;
  // the best multiple of 64 is, in one of the circular gaps between taken offsets, one of the
  // two multiples around its middle (inside a gap, the nearest streams are its two ends)
  std::sort(taken.begin(), taken.end());
  int64_t best = 0, best_gap = -1;
  for (size_t i = 0; i < taken.size(); ++i) {
    const int64_t lo = static_cast<int64_t>(taken[i]);
    const int64_t hi = static_cast<int64_t>(i + 1 < taken.size() ? taken[i + 1] : taken[0] + kPage);
    const int64_t below_middle = (lo + hi) / 2 / 64 * 64;
    for (const int64_t off : {below_middle, below_middle + 64}) {
      const int64_t gap = std::min(off - lo, hi - off);  // negative outside [lo, hi]
      if (gap > best_gap) {
        best_gap = gap;
        best = off % kPage;
      }
    }
  }
  return best;
}

// Runs a TensorIterator-style loop over `operands` (outputs first), plus a last weight
// operand when `weight` is given, over operands that pass mixed_orders: one tile of rows at a
// time, in parallel over fixed tiles. `stream`: the outputs are written past the cache where
// they can be, if no input is in the other order: those in the primary order by the loop,
// the float32 ones in the other order by their transposes (transpose_streaming_32).
// `weight(b)` points at sample b's weight value (read with stride 0). `make_loop(acc, mask)`
// builds the loop for one tile, streaming the outputs in `mask`; the per-sample sums of what
// it adds to `acc` come back, one per sample (fixed tiles and summation order: the same bits
// on any thread count).
template <typename MakeLoop>
std::vector<double> run_mixed_orders(const std::vector<at::Tensor>& operands, int n_outputs,
                                     const std::function<char*(int64_t)>& weight, bool stream,
                                     MakeLoop&& make_loop) {
  const at::Tensor& first = operands.front();
  const int64_t B = first.size(0), C = first.size(1), HW = first.size(2) * first.size(3);
  const int n_ops = static_cast<int>(operands.size());
  const int n_all = n_ops + (weight ? 1 : 0);  // the loop's operand count
  std::vector<double> sums(B, 0.0);
  if (B == 0 || C * HW == 0) return sums;
  int votes = 0;  // NHWC minus NCHW operands
  for (const at::Tensor& t : operands) {
    const Order o = order_of(t);
    votes += o == Order::kNhwc ? 1 : o == Order::kNchw ? -1 : 0;
  }
  const Order out_order = order_of(first);
  const bool nhwc_primary = votes > 0 || (votes == 0 && out_order == Order::kNhwc);
  const Order primary = nhwc_primary ? Order::kNhwc : Order::kNchw;
  // per sample: rows x cols in the primary order, cols x rows in the other
  const int64_t rows = nhwc_primary ? HW : C, cols = nhwc_primary ? C : HW;
  // about 8192 elements a tile: a whole sample up to that size (Esper's 4-D shapes), so each
  // moved operand's part of the tile is one block of its sample with runs of whole channels,
  // and the tile's operands together stay within L2 (tile-size-ab-threads-1.md in the AVX-512
  // record measures 2048 against 8192). At least 8 rows where there are 8, in multiples of 8,
  // so the transposes run in whole 8 x 8 register blocks (a tile of 4 channels would not).
  constexpr int64_t kTileElements = 8192;
  int64_t tile_rows = std::min(rows, std::max<int64_t>(8, kTileElements / cols));
  if (tile_rows > 8) tile_rows -= tile_rows % 8;
  const int64_t tile_cols = std::min(cols, std::max<int64_t>(8, kTileElements / tile_rows));
  const int64_t row_tiles = (rows + tile_rows - 1) / tile_rows;
  const int64_t col_tiles = (cols + tile_cols - 1) / tile_cols;
  const int64_t tiles = row_tiles * col_tiles;

  std::vector<char*> base(n_ops);
  std::vector<int64_t> elem(n_ops);
  std::vector<bool> moved(n_ops);
  for (int k = 0; k < n_ops; ++k) {
    base[k] = static_cast<char*>(operands[k].data_ptr());
    elem[k] = operands[k].element_size();
    const Order o = order_of(operands[k]);
    moved[k] = o != primary && o != Order::kEither;
  }
  // Streaming only where no input is gathered: a gather's loads from the other order share
  // their low address bits with the streamed rows of a same-shaped output, and such a load
  // waits for the write-combining buffers to drain.
  for (int k = n_outputs; k < n_ops; ++k) stream = stream && !moved[k];
  StreamMask direct_outputs = 0;  // streamed by the loop; a moved output's buffer never is
  for (int k = 0; k < n_outputs; ++k) {
    if (stream && !moved[k]) direct_outputs |= StreamMask{1} << k;
  }
  std::vector<double> partial(B * tiles, 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / (tile_rows * tile_cols));
  at::parallel_for(0, B * tiles, grain, [&](int64_t u0, int64_t u1) {
    // one buffer per moved operand, a tile_rows x tile_cols block in the primary order
    // (a page of slack each, to start a tile at any offset: far_offset)
    std::vector<std::unique_ptr<char[]>> buffers(n_ops);  // left uninitialised
    std::vector<char*> pages(n_ops);  // each buffer's first page boundary
    for (int k = 0; k < n_ops; ++k) {
      if (!moved[k]) continue;
      buffers[k].reset(new char[tile_rows * tile_cols * elem[k] + 2 * kPage]);
      const uintptr_t start = reinterpret_cast<uintptr_t>(buffers[k].get());
      pages[k] = buffers[k].get() + ((start + kPage - 1) / kPage * kPage - start);
    }
    // each buffer's offset for the direct streams' offsets of the last tile that placed them
    // (whole-row tiles advance by whole pages: one placement a call)
    std::vector<uintptr_t> direct, placed_for;
    std::vector<int64_t> offset(n_ops, 0);
    char* data[16];
    int64_t strides[32];
    const auto tile_at = [&](int64_t u, int64_t& sample, int64_t& r0, int64_t& c0, int64_t& nr,
                             int64_t& nc) {
      const int64_t tile = u % tiles;
      r0 = (tile / col_tiles) * tile_rows;
      c0 = (tile % col_tiles) * tile_cols;
      nr = std::min(tile_rows, rows - r0);
      nc = std::min(tile_cols, cols - c0);
      sample = (u / tiles) * C * HW;
    };
    TilePrefetch prefetch;  // the next tile's moved operands, while this one runs
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / tiles;
      int64_t sample, r0, c0, nr, nc;
      tile_at(u, sample, r0, c0, nr, nc);
      prefetch.n = 0;
      if (u + 1 < u1) {
        int64_t ps, pr0, pc0, pnr, pnc;
        tile_at(u + 1, ps, pr0, pc0, pnr, pnc);
        for (int k = 0; k < n_ops; ++k) {
          // streamed outputs bypass the cache: a prefetch would only pull their lines in
          if (!moved[k] || (k < n_outputs && stream)) continue;
          prefetch.add(base[k] + (ps + pc0 * rows + pr0) * elem[k], rows * elem[k], pnc, pnr * elem[k],
                       k < n_outputs);
        }
        prefetch.steps = std::max<int64_t>(1, nr * nc / kStep);
      }
      const TilePrefetchScope prefetching(prefetch.n ? &prefetch : nullptr);
      direct.clear();
      for (int k = 0; k < n_ops; ++k) {
        if (!moved[k]) {
          const char* tile_start = base[k] + (sample + r0 * cols + c0) * elem[k];
          direct.push_back(reinterpret_cast<uintptr_t>(tile_start) % kPage);
        }
      }
      if (direct != placed_for) {
        std::vector<uintptr_t> taken = direct;
        for (int k = 0; k < n_ops; ++k) {
          if (!moved[k]) continue;
          offset[k] = far_offset(taken);
          taken.push_back(offset[k]);
        }
        placed_for = direct;
      }
      for (int k = 0; k < n_ops; ++k) {
        strides[k] = elem[k];
        if (moved[k]) {
          data[k] = pages[k] + offset[k];
          strides[n_all + k] = nc * elem[k];
          if (k >= n_outputs) {  // gather: the tile's (nc x nr) block of the other order
            transpose_elements(base[k] + (sample + c0 * rows + r0) * elem[k], rows, data[k], nc,
                               nc, nr, elem[k]);
          }
        } else {
          data[k] = base[k] + (sample + r0 * cols + c0) * elem[k];
          strides[n_all + k] = cols * elem[k];
        }
      }
      if (weight) {
        data[n_ops] = weight(b);
        strides[n_ops] = 0;
        strides[n_all + n_ops] = 0;
      }
      Accumulator acc;
      auto loop = make_loop(acc, direct_outputs);
      if (nc == cols) {  // whole rows: one contiguous run
        loop(data, strides, nr * nc, 1);
      } else {
        loop(data, strides, nc, nr);
      }
      for (int k = 0; k < n_outputs; ++k) {
        if (!moved[k]) continue;
        // scatter the buffer back into the other order
        char* dst = base[k] + (sample + c0 * rows + r0) * elem[k];
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
        if (stream && elem[k] == 4 &&
            transpose_streaming_32(reinterpret_cast<const uint32_t*>(data[k]), nc,
                                   reinterpret_cast<uint32_t*>(dst), rows, nr, nc)) {
          continue;
        }
#endif
        transpose_elements(data[k], nc, dst, rows, nr, nc, elem[k]);
      }
      partial[u] = acc.value();
    }
    if (stream) stream_fence();  // this thread's streamed stores, before the join
  });
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0.0;
    for (int64_t t = 0; t < tiles; ++t) acc += partial[b * tiles + t];
    sums[b] = acc;
  }
  return sums;
}

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
