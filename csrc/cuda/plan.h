// Host-side planning for the CUDA kernels, torch-free: ordering dimensions by a layout,
// dropping size-1 dimensions, collapsing dimensions that are contiguous for every operand,
// and building the index maps of kk_cuda.h (TensorMap, WeightIndex, ReduceMap). Used by the
// torch glue (which turns tensors into sizes and strides) and by the launchers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kk_cuda.h"

namespace kk::cuda::plan {

using Shape = std::vector<int64_t>;

// Indices of the dims with size > 1, outermost first, ordered by `strides` descending (ties
// keep the logical order, so a dense tensor's memory order comes out exactly).
inline std::vector<int> memory_order(const Shape& sizes, const Shape& strides) {
  std::vector<int> dims;
  for (int d = 0; d < static_cast<int>(sizes.size()); ++d) {
    if (sizes[d] != 1) dims.push_back(d);
  }
  std::stable_sort(dims.begin(), dims.end(), [&](int a, int b) { return strides[a] > strides[b]; });
  return dims;
}

// A list of dims (outermost first) with one stride per operand, collapsed: neighbours merge
// when every operand steps over the inner one exactly (stride[outer] == stride[inner] *
// size[inner]).
struct Collapsed {
  Shape sizes;
  std::vector<Shape> strides;  // [operand][dim]
};

inline Collapsed collapse(const Shape& sizes, const std::vector<Shape>& strides) {
  Collapsed c;
  c.strides.resize(strides.size());
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 1) continue;
    bool merge = !c.sizes.empty();
    for (size_t k = 0; merge && k < strides.size(); ++k) {
      merge = c.strides[k].back() == strides[k][d] * sizes[d];
    }
    if (merge) {
      c.sizes.back() *= sizes[d];
      for (size_t k = 0; k < strides.size(); ++k) c.strides[k].back() = strides[k][d];
    } else {
      c.sizes.push_back(sizes[d]);
      for (size_t k = 0; k < strides.size(); ++k) c.strides[k].push_back(strides[k][d]);
    }
  }
  return c;
}

// The iteration of an elementwise launch over operands of one shape: operand 0 (the first
// output, dense) sets the order; `dims` holds the collapsed sizes and each operand's strides;
// `linear` says every operand's offset is the iteration index itself.
struct Iteration {
  std::vector<int> order;
  Collapsed dims;
  bool linear = false;
};

inline Iteration plan_iteration(const Shape& sizes, const std::vector<Shape>& strides) {
  Iteration it;
  it.order = memory_order(sizes, strides.at(0));
  Shape psizes;
  std::vector<Shape> pstrides(strides.size());
  for (int d : it.order) {
    psizes.push_back(sizes[d]);
    for (size_t k = 0; k < strides.size(); ++k) pstrides[k].push_back(strides[k][d]);
  }
  it.dims = collapse(psizes, pstrides);
  it.linear = it.dims.sizes.size() <= 1;
  for (const Shape& st : it.dims.strides) {
    for (int64_t v : st) it.linear = it.linear && v == 1;
  }
  return it;
}

// Fills a TensorMap from collapsed sizes and one operand's strides; false when too many dims.
inline bool fill_map(const Shape& sizes, const Shape& strides, TensorMap& m) {
  if (sizes.size() > static_cast<size_t>(kMaxDims)) return false;
  m = TensorMap{};
  m.ndim = static_cast<int32_t>(sizes.size());
  for (size_t d = 0; d < sizes.size(); ++d) {
    m.size[d] = FastDiv::make(static_cast<uint64_t>(sizes[d]));
    m.stride[d] = strides[d];
  }
  return true;
}

// Row-major index over `sizes` -> element offset with `strides` (size-1 dims dropped, runs
// collapsed).
inline bool make_map(const Shape& sizes, const Shape& strides, TensorMap& m) {
  const Collapsed c = collapse(sizes, {strides});
  return fill_map(c.sizes, c.strides[0], m);
}

// Row-major (contiguous) strides of a shape.
inline Shape contiguous_strides(const Shape& sizes) {
  Shape st(sizes.size(), 1);
  int64_t running = 1;
  for (int d = static_cast<int>(sizes.size()) - 1; d >= 0; --d) {
    st[d] = running;
    running *= std::max<int64_t>(sizes[d], 1);
  }
  return st;
}

inline int64_t numel(const Shape& sizes) {
  return std::accumulate(sizes.begin(), sizes.end(), int64_t{1}, std::multiplies<int64_t>());
}

// `w` right-aligned against `full` (same rank or fewer dims): w's size per full dim.
inline Shape align_shape(const Shape& w, size_t rank) {
  Shape out(rank, 1);
  const size_t off = rank - w.size();
  for (size_t d = 0; d < w.size(); ++d) out[off + d] = w[d];
  return out;
}

// The weight index of an iteration: `order` is the iteration's dims (logical indices into
// the features' shape, outermost first, size-1 dims dropped), `wshape` W right-aligned to the
// features' rank. Classifies scalar / outer / general.
inline bool make_weight_index(const Shape& fsizes, const std::vector<int>& order,
                              const Shape& wshape_aligned, WeightIndex& wi) {
  const Shape wstr_logical = contiguous_strides(wshape_aligned);
  Shape sizes, wstr;
  for (int d : order) {
    sizes.push_back(fsizes[d]);
    wstr.push_back(wshape_aligned[d] == 1 ? 0 : wstr_logical[d]);
  }
  const int64_t n = numel(fsizes);
  const int64_t wn = numel(wshape_aligned);
  const Collapsed c = collapse(sizes, {wstr});
  const Shape& cs = c.sizes;
  const Shape& st = c.strides[0];
  wi = WeightIndex{};
  if (wn == 1 || n == 0) {
    wi.form = WeightForm::kScalar;
    wi.groups = 1;
    wi.group_size = n;
    return true;
  }
  // (K, stride 1) optionally followed by (G, stride 0): contiguous groups of G elements.
  const bool head = !cs.empty() && st[0] == 1 && cs[0] == wn;
  if (head && (cs.size() == 1 || (cs.size() == 2 && st[1] == 0))) {
    wi.form = WeightForm::kOuter;
    wi.groups = wn;
    wi.group_size = n / wn;
    return true;
  }
  wi.form = WeightForm::kGeneral;
  wi.groups = 1;
  wi.group_size = n;
  return fill_map(cs, st, wi.general);
}

// Sums a source indexed linearly over `src_sizes` (in `src_order`: the source's dims
// outermost first as logical dim indices, with row-major linear strides over that order)
// onto W (right-aligned to the source's rank): kept dims are W's non-1 dims in W's logical
// order, free dims the source dims W broadcasts over.
inline bool make_reduce_map(const Shape& src_sizes, const std::vector<int>& src_order,
                            const Shape& wshape_aligned, ReduceMap& rm) {
  // Linear stride of each logical dim in the source's iteration order.
  Shape lin(src_sizes.size(), 0);
  int64_t running = 1;
  for (int k = static_cast<int>(src_order.size()) - 1; k >= 0; --k) {
    lin[src_order[k]] = running;
    running *= src_sizes[src_order[k]];
  }
  Shape kept_sizes, kept_strides;
  for (size_t d = 0; d < src_sizes.size(); ++d) {
    if (wshape_aligned[d] != 1) {
      kept_sizes.push_back(wshape_aligned[d]);
      kept_strides.push_back(lin[d]);
    }
  }
  Shape free_sizes, free_strides;
  for (int d : src_order) {
    if (wshape_aligned[d] == 1) {
      free_sizes.push_back(src_sizes[d]);
      free_strides.push_back(lin[d]);
    }
  }
  rm = ReduceMap{};
  rm.free_count = numel(free_sizes);
  return make_map(kept_sizes, kept_strides, rm.kept) && make_map(free_sizes, free_strides, rm.free);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// A piece of `bytes` at the workspace offset `off`, which moves past it to the next 256-byte
// boundary; returns the piece's offset.
inline size_t carve(size_t& off, size_t bytes) {
  const size_t at = off;
  off = align256(off + bytes);
  return at;
}

// Memory format of a 4-D tensor: dense NCHW (0), dense channels_last (1), neither (-1).
// Size-1 dims carry no stride; where C or H*W is 1 the two coincide and NCHW is returned.
constexpr int kLayoutOther = -1, kLayoutNchw = 0, kLayoutChannelsLast = 1;

inline int layout_4d(const Shape& sizes, const Shape& strides) {
  if (sizes.size() != 4 || strides.size() != 4) return kLayoutOther;
  const int64_t C = sizes[1], H = sizes[2], W = sizes[3];
  const Shape nchw = {C * H * W, H * W, W, 1};
  const Shape cl = {H * W * C, 1, W * C, C};
  auto matches = [&](const Shape& canon) {
    for (int d = 0; d < 4; ++d) {
      if (sizes[d] != 1 && strides[d] != canon[d]) return false;
    }
    return true;
  };
  if (matches(nchw)) return kLayoutNchw;
  if (matches(cl)) return kLayoutChannelsLast;
  return kLayoutOther;
}

// The tiled path of a blend launch over operands of one 4-D shape (strides per operand,
// outputs first): on when every operand is dense NCHW or channels_last, both formats occur,
// the weight is one value or one per sample (kOuter over the batch), and a sample holds at
// least one block's worth of elements. Otherwise `t.on` is false.
inline bool make_tile(const Shape& sizes, const std::vector<Shape>& strides, const WeightIndex& widx,
                      TileShape& t) {
  t = TileShape{};
  if (sizes.size() != 4 || strides.empty() || strides.size() > 32) return false;
  const int64_t B = sizes[0], C = sizes[1], HW = sizes[2] * sizes[3];
  if (B < 1 || C < 2 || HW < 2 || C * HW < int64_t{kTileSide} * kTileRows) return false;
  const bool weight_ok = widx.form == WeightForm::kScalar ||
                         (widx.form == WeightForm::kOuter && widx.groups == B);
  if (!weight_ok) return false;
  uint32_t cl = 0;
  bool nchw = false;
  for (size_t k = 0; k < strides.size(); ++k) {
    const int layout = layout_4d(sizes, strides[k]);
    if (layout == kLayoutOther) return false;
    if (layout == kLayoutChannelsLast) cl |= uint32_t{1} << k;
    nchw = nchw || layout == kLayoutNchw;
  }
  if (cl == 0 || !nchw) return false;  // one format: the linear path is coalesced already
  t.on = true;
  t.batch = B;
  t.channels = C;
  t.positions = HW;
  t.tiles_p = ceil_div(HW, kTileSide);
  t.tiles_c = ceil_div(C, kTileSide);
  t.cl = cl;
  return true;
}

inline int64_t tile_blocks(const TileShape& t) { return t.batch * t.tiles_p * t.tiles_c; }

// The blend kernels' launch: blocks of `threads` threads, each owning `chunk` elements of one
// weight group (see block_range). Depends only on the sizes, never on the device, so the
// weight-gradient sums are bit-identical across runs and GPUs.
constexpr int kBlendMaxThreads = 256;

struct BlendPlan {
  int threads = kBlendMaxThreads;
  int64_t chunk = 0;
  int64_t group_size = 0;
  int64_t groups = 1;
  int64_t blocks_per_group = 0;
  int64_t blocks = 0;
};

inline BlendPlan make_blend_plan(int64_t numel, const WeightIndex& widx, int vec) {
  BlendPlan plan;
  const bool outer = widx.form == WeightForm::kOuter;
  plan.groups = outer ? widx.groups : 1;
  plan.group_size = outer ? widx.group_size : numel;
  const int64_t g = plan.group_size;
  // Fewer threads for small groups, so that a block's threads are not mostly idle.
  while (plan.threads > 64 && static_cast<int64_t>(plan.threads / 2) * vec >= g) plan.threads /= 2;
  const int64_t base = static_cast<int64_t>(plan.threads) * vec;
  // Up to 8 packs per thread while that still leaves >= 1024 blocks.
  int64_t iters = 1;
  while (iters < 8) {
    const int64_t next = base * iters * 2;
    if (next > g || plan.groups * ceil_div(g, next) < 1024) break;
    iters *= 2;
  }
  plan.chunk = base * iters;
  plan.blocks_per_group = g > 0 ? ceil_div(g, plan.chunk) : 0;
  plan.blocks = plan.groups * plan.blocks_per_group;
  return plan;
}

}  // namespace kk::cuda::plan
