// Host test of the CUDA kernels' index arithmetic, torch-free and GPU-free: the same
// functions the kernels and the glue use (csrc/cuda/kk_cuda.h), checked
// against naive coordinate arithmetic over random shapes and layouts. Built and run by
// tools/check_cuda_compile.sh.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/kk_cuda.h"

using namespace kk::cuda;
using plan::Shape;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                       \
  do {                                                          \
    if (!(cond) && ++failures <= 20) {                          \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                 \
      std::printf("\n");                                        \
    }                                                           \
  } while (0)

std::mt19937_64 rng(12345);

int64_t rand_int(int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

void test_fast_div() {
  std::vector<uint64_t> ds = {1, 2, 3, 5, 7, 10, 255, 256, 257, 1000003, (1ull << 31) - 1,
                              1ull << 31, (1ull << 31) + 1, (1ull << 32) + 7, (1ull << 62) - 1,
                              1ull << 62, (1ull << 62) + 1, (1ull << 63) - 1};
  for (int k = 0; k < 200; ++k) ds.push_back(static_cast<uint64_t>(rand_int(1, (1ll << 62))));
  for (int k = 0; k < 200; ++k) ds.push_back(static_cast<uint64_t>(rand_int(1, 1 << 20)));
  for (uint64_t d : ds) {
    const FastDiv f = FastDiv::make(d);
    std::vector<uint64_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, (1ull << 63) - 1,
                                (1ull << 63) - 2, (1ull << 32) - 1, 1ull << 32};
    for (int k = 0; k < 200; ++k) ns.push_back(static_cast<uint64_t>(rand_int(0, INT64_MAX)));
    for (int k = 0; k < 50; ++k) ns.push_back(static_cast<uint64_t>(rand_int(0, 1 << 24)));
    for (uint64_t n : ns) {
      if (n >= (1ull << 63)) continue;
      EXPECT(f.div(n) == n / d, "n=%llu d=%llu got %llu", (unsigned long long)n,
             (unsigned long long)d, (unsigned long long)f.div(n));
    }
  }
}

// Dense strides of `sizes` laid out in `perm` order (perm[0] outermost).
Shape dense_strides(const Shape& sizes, const std::vector<int>& perm) {
  Shape st(sizes.size(), 0);
  int64_t running = 1;
  for (int k = static_cast<int>(perm.size()) - 1; k >= 0; --k) {
    st[perm[k]] = running;
    running *= sizes[perm[k]];
  }
  return st;
}

std::vector<int> random_perm(size_t n) {
  std::vector<int> p(n);
  std::iota(p.begin(), p.end(), 0);
  std::shuffle(p.begin(), p.end(), rng);
  return p;
}

Shape random_shape(int rank) {
  static const int64_t choices[] = {1, 1, 2, 3, 4, 5, 7, 8};
  Shape s(rank);
  for (auto& v : s) v = choices[rand_int(0, 7)];
  return s;
}

// Logical coordinates of iteration index i (row-major over sizes in `order`).
Shape coords_of(int64_t i, const Shape& sizes, const std::vector<int>& order) {
  Shape c(sizes.size(), 0);
  for (int k = static_cast<int>(order.size()) - 1; k >= 0; --k) {
    const int d = order[k];
    c[d] = i % sizes[d];
    i /= sizes[d];
  }
  return c;
}

int64_t dot(const Shape& a, const Shape& b) {
  int64_t r = 0;
  for (size_t d = 0; d < a.size(); ++d) r += a[d] * b[d];
  return r;
}

int64_t w_index(const Shape& coords, const Shape& w_aligned) {
  const Shape st = plan::contiguous_strides(w_aligned);
  int64_t j = 0;
  for (size_t d = 0; d < coords.size(); ++d) j += (w_aligned[d] == 1 ? 0 : coords[d]) * st[d];
  return j;
}

// Operand layouts: the output dense in a random order; inputs dense, padded or broadcast.
Shape random_input_strides(const Shape& sizes) {
  const int kind = static_cast<int>(rand_int(0, 3));
  Shape st = dense_strides(sizes, random_perm(sizes.size()));
  if (kind == 1) {
    for (auto& v : st) v *= 2;  // every other element
  } else if (kind == 2 && !sizes.empty()) {
    st[rand_int(0, static_cast<int64_t>(sizes.size()) - 1)] = 0;  // expanded along one dim
  }
  return st;
}

void check_iteration(const Shape& sizes, const std::vector<Shape>& strides, const plan::Iteration& it) {
  const int64_t n = plan::numel(sizes);
  TensorMap iter;
  const bool ok = plan::fill_map(it.dims.sizes, Shape(it.dims.sizes.size(), 0), iter);
  if (!ok) return;  // more than kMaxDims: the glue falls back to contiguous copies
  int64_t st[kMaxOperands][kMaxDims] = {};
  for (size_t k = 0; k < strides.size(); ++k) {
    for (size_t d = 0; d < it.dims.sizes.size(); ++d) st[k][d] = it.dims.strides[k][d];
  }
  for (int64_t i = 0; i < n; ++i) {
    const Shape c = coords_of(i, sizes, it.order);
    int64_t off[4];
    operand_offsets<4>(iter, st, i, off);
    for (size_t k = 0; k < strides.size(); ++k) {
      const int64_t want = dot(c, strides[k]);
      EXPECT(off[k] == want, "operand %zu at %lld: %lld != %lld", k, (long long)i,
             (long long)off[k], (long long)want);
      if (it.linear) EXPECT(want == i, "linear but operand %zu at %lld is %lld", k, (long long)i, (long long)want);
    }
    EXPECT(off[0] == i, "the first output is not walked in memory order at %lld", (long long)i);
  }
}

void check_weight(const Shape& sizes, const std::vector<int>& order, const Shape& w_aligned) {
  const int64_t n = plan::numel(sizes);
  WeightIndex wi;
  if (!plan::make_weight_index(sizes, order, w_aligned, wi)) return;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t want = w_index(coords_of(i, sizes, order), w_aligned);
    int64_t got = 0;
    if (wi.form == WeightForm::kOuter) got = i / wi.group_size;
    if (wi.form == WeightForm::kGeneral) got = map_offset(wi.general, i);
    EXPECT(got == want, "weight index at %lld: %lld != %lld (form %d)", (long long)i,
           (long long)got, (long long)want, static_cast<int>(wi.form));
  }
  if (wi.form == WeightForm::kOuter) {
    EXPECT(wi.groups == plan::numel(w_aligned) && wi.groups * wi.group_size == n, "outer groups");
  }
  // Every source index reaches exactly one target, the right one.
  ReduceMap rm;
  if (!plan::make_reduce_map(sizes, order, w_aligned, rm)) return;
  std::vector<int> seen(static_cast<size_t>(n), 0);
  const int64_t wn = plan::numel(w_aligned);
  for (int64_t j = 0; j < wn; ++j) {
    const int64_t base = map_offset(rm.kept, j);
    for (int64_t m = 0; m < rm.free_count; ++m) {
      const int64_t i = base + map_offset(rm.free, m);
      EXPECT(i >= 0 && i < n, "reduce index %lld out of range", (long long)i);
      if (i < 0 || i >= n) continue;
      ++seen[i];
      EXPECT(w_index(coords_of(i, sizes, order), w_aligned) == j, "reduce target of %lld", (long long)i);
    }
  }
  for (int64_t i = 0; i < n; ++i) EXPECT(seen[i] == 1, "index %lld summed %d times", (long long)i, seen[i]);
}

void test_layouts() {
  for (int trial = 0; trial < 3000; ++trial) {
    const int rank = static_cast<int>(rand_int(1, 5));
    const Shape sizes = random_shape(rank);
    std::vector<Shape> strides;
    strides.push_back(dense_strides(sizes, random_perm(sizes.size())));
    const int nin = static_cast<int>(rand_int(1, 3));
    for (int k = 0; k < nin; ++k) strides.push_back(random_input_strides(sizes));
    const plan::Iteration it = plan::plan_iteration(sizes, strides);
    check_iteration(sizes, strides, it);
    // A weight: some dims kept, the rest 1, maybe fewer leading dims.
    Shape w = sizes;
    for (auto& v : w) {
      if (rand_int(0, 1)) v = 1;
    }
    const size_t drop = static_cast<size_t>(rand_int(0, rank));
    Shape w_short(w.begin() + static_cast<int64_t>(drop), w.end());
    check_weight(sizes, it.order, plan::align_shape(w_short, sizes.size()));
  }
}

// Esper's layouts: per-sample weights stay on the fast path with NCHW and channels_last.
void test_per_sample() {
  const Shape sizes = {6, 5, 3, 4};
  const Shape nchw = dense_strides(sizes, {0, 1, 2, 3});
  const Shape cl = dense_strides(sizes, {0, 2, 3, 1});
  for (const Shape& out : {nchw, cl}) {
    for (const Shape& in : {nchw, cl}) {
      const plan::Iteration it = plan::plan_iteration(sizes, {out, out, in});
      WeightIndex wi;
      EXPECT(plan::make_weight_index(sizes, it.order, {6, 1, 1, 1}, wi), "per-sample");
      EXPECT(wi.form == WeightForm::kOuter && wi.groups == 6 && wi.group_size == 60, "per-sample is outer");
      EXPECT(plan::make_weight_index(sizes, it.order, {1, 1, 1, 1}, wi), "scalar");
      EXPECT(wi.form == WeightForm::kScalar, "0-dim is scalar");
      EXPECT(it.linear == (in == out), "linear iff same layout");
      check_iteration(sizes, {out, out, in}, it);
    }
  }
  // (B,T,C) with (B,1,1)
  const Shape seq = {4, 7, 9};
  const plan::Iteration it = plan::plan_iteration(seq, {plan::contiguous_strides(seq)});
  WeightIndex wi;
  plan::make_weight_index(seq, it.order, {4, 1, 1}, wi);
  EXPECT(wi.form == WeightForm::kOuter && wi.group_size == 63, "(B,T,C) per-sample");
  EXPECT(it.linear, "contiguous is linear");
}

void test_block_split() {
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t groups = rand_int(1, 40);
    const int64_t group_size = trial % 3 == 0 ? rand_int(0, 70000) : rand_int(0, 3000);
    const int vec = 1 << rand_int(1, 3);
    WeightIndex wi;
    wi.form = groups > 1 ? WeightForm::kOuter : WeightForm::kScalar;
    wi.groups = groups > 1 ? groups : 1;
    wi.group_size = group_size;
    const int64_t n = (groups > 1 ? groups : 1) * group_size;
    const plan::BlendPlan p = plan::make_blend_plan(n, wi, vec);
    EXPECT(p.chunk % vec == 0 && p.chunk > 0, "chunk");
    EXPECT(p.threads >= 64 && p.threads <= 256 && p.threads % 32 == 0, "threads");
    int64_t next = 0;
    for (int64_t b = 0; b < p.blocks; ++b) {
      const BlockRange r = block_range(b, p.blocks_per_group, p.group_size, p.chunk);
      EXPECT(r.start == next, "block %lld starts at %lld, expected %lld", (long long)b,
             (long long)r.start, (long long)next);
      EXPECT(r.end > r.start, "empty block");
      EXPECT(r.start >= r.group * group_size && r.end <= (r.group + 1) * group_size, "block straddles a group");
      const VecSplit v = vector_split(r.start, r.end, vec);
      EXPECT(r.start <= v.a0 && v.a0 <= v.a1 && v.a1 <= r.end, "split order");
      EXPECT(v.a0 % vec == 0 || v.a0 == r.end, "a0 aligned");
      EXPECT((v.a1 - v.a0) % vec == 0, "whole packs");
      EXPECT(v.a0 - r.start < vec && r.end - v.a1 < vec, "short head/tail");
      next = r.end;
    }
    EXPECT(next == n, "blocks cover %lld of %lld", (long long)next, (long long)n);
  }
}

// The mixed-layout tiles: layout classification, when the tiled path is taken, and that the
// blocks' (thread, j) slots of blend_tile_kernel cover every element of every operand exactly
// once at the offset its strides give, a warp's 32 lanes moving consecutive elements.

void test_tiles() {
  int tiled = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const Shape z = {rand_int(1, 4), rand_int(1, 70), rand_int(1, 12), rand_int(1, 12)};
    const int64_t B = z[0], C = z[1], HW = z[2] * z[3];
    const int nops = static_cast<int>(rand_int(2, 7));
    std::vector<Shape> st;
    std::vector<int> want;
    for (int k = 0; k < nops; ++k) {
      const bool cl = rand_int(0, 1) == 1;
      st.push_back(dense_strides(z, cl ? std::vector<int>{0, 2, 3, 1} : std::vector<int>{0, 1, 2, 3}));
      want.push_back(cl && C > 1 && HW > 1 ? plan::kLayoutChannelsLast : plan::kLayoutNchw);
      EXPECT(plan::layout_4d(z, st.back()) == want.back(), "layout of operand %d", k);
    }
    bool mixed = false;
    for (int k = 1; k < nops; ++k) mixed = mixed || want[k] != want[0];
    WeightIndex wi;
    wi.form = WeightForm::kScalar;
    TileShape t;
    const bool big = C >= 2 && HW >= 2 && C * HW >= int64_t{kTileSide} * kTileRows;
    EXPECT(plan::make_tile(z, st, wi, t) == (mixed && big), "tile on/off, C=%lld HW=%lld", (long long)C,
           (long long)HW);
    wi.form = WeightForm::kOuter;
    wi.groups = B;
    EXPECT(plan::make_tile(z, st, wi, t) == (mixed && big), "per-sample weight");
    wi.form = WeightForm::kGeneral;
    EXPECT(!plan::make_tile(z, st, wi, t), "a general weight never tiles");
    Shape other = st[0];
    std::swap(other[2], other[3]);  // a transposed view: neither format
    if (z[2] > 1 && z[3] > 1) EXPECT(plan::layout_4d(z, other) == plan::kLayoutOther, "transposed");
    wi.form = WeightForm::kOuter;
    if (!plan::make_tile(z, st, wi, t)) continue;
    ++tiled;
    for (int k = 0; k < nops; ++k) {
      EXPECT((((t.cl >> k) & 1u) != 0u) == (want[k] == plan::kLayoutChannelsLast), "cl bit %d", k);
    }
    // walk the kernel's slots for one operand of each format
    for (int cl = 0; cl < 2; ++cl) {
      const Shape ss = dense_strides(z, cl ? std::vector<int>{0, 2, 3, 1} : std::vector<int>{0, 1, 2, 3});
      std::vector<int> seen(static_cast<size_t>(B * C * HW), 0);
      int64_t prev_sample = -1, prev_block_tile = -1;
      for (int64_t block = 0; block < plan::tile_blocks(t); ++block) {
        const TileCoords tc = tile_coords(block, t);
        EXPECT(tc.b >= prev_sample, "blocks run sample-major");
        if (tc.b != prev_sample) prev_block_tile = -1;
        prev_sample = tc.b;
        const int64_t tile_index = (tc.p0 / kTileSide) * t.tiles_c + tc.c0 / kTileSide;
        EXPECT(tile_index == prev_block_tile + 1, "tiles of a sample are consecutive blocks");
        prev_block_tile = tile_index;
        for (int ty = 0; ty < kTileRows; ++ty) {
          for (int j = 0; j < kTileSide / kTileRows; ++j) {
            const int row = ty + kTileRows * j;
            int64_t first = -1;
            for (int tx = 0; tx < kTileSide; ++tx) {
              const int64_t c = tc.c0 + (cl ? tx : row), p = tc.p0 + (cl ? row : tx);
              if (c >= C || p >= HW) continue;
              const int64_t off = tile_offset(tc.b, p, c, C, HW, cl != 0);
              const int64_t naive = tc.b * ss[0] + c * ss[1] + (p / z[3]) * ss[2] + (p % z[3]) * ss[3];
              EXPECT(off == naive, "offset (b=%lld p=%lld c=%lld cl=%d)", (long long)tc.b, (long long)p,
                     (long long)c, cl);
              if (off >= 0 && off < static_cast<int64_t>(seen.size())) ++seen[static_cast<size_t>(off)];
              if (first < 0) first = off - tx;
              EXPECT(off == first + tx, "lanes move consecutive elements");
            }
          }
        }
      }
      for (size_t i = 0; i < seen.size(); ++i) EXPECT(seen[i] == 1, "element %zu seen %d times", i, seen[i]);
    }
  }
  EXPECT(tiled >= 50, "only %d of 300 random cases took the tiled path", tiled);
}

}  // namespace

int main() {
  test_fast_div();
  test_layouts();
  test_per_sample();
  test_block_split();
  test_tiles();
  if (failures > 0) {
    std::printf("cuda_index_test: %d failures\n", failures);
    return 1;
  }
  std::printf("cuda_index_test: all index checks passed\n");
  return 0;
}
