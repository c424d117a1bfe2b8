// The CUDA kernels' interface, torch-free (FlashAttention style): parameter structs of raw
// pointers, sizes, strides and dtype codes, and the launchers that take them;
// csrc/cuda/glue.cpp turns tensors into these structs.
//  - Strides and offsets are 64-bit, in elements of the operand's dtype.
//  - The linear iteration index i of an element is its offset in the first output (dense),
//    walked in that output's memory order (csrc/cuda/README.md).
//  - "W" is the shape a blend weight lives on: alpha's, or broadcast(alpha, gate) for GATE.
//    A weight index j is row-major over W.
//  - Every launcher enqueues on `stream` and returns cudaGetLastError() (no synchronisation).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#if defined(__CUDACC__)
#define KK_CUDA_HD __host__ __device__ __forceinline__
#else
#define KK_CUDA_HD inline
#endif

namespace kk::cuda {

enum class DType : int32_t { kFloat, kDouble, kBFloat16, kHalf, kUInt8, kInt8, kInt16, kInt32, kInt64, kBool };

inline constexpr int dtype_size(DType t) {
  constexpr int kSize[] = {4, 8, 2, 2, 1, 1, 2, 4, 8, 1};  // in DType's order
  return kSize[static_cast<int>(t)];
}

constexpr int kMaxDims = 8;
constexpr int kMaxOperands = 8;

// n / d by a multiply-high and a shift (Granlund & Montgomery's round-up method), exact for
// 0 <= n < 2^63 and 1 <= d < 2^63: q = (umulhi(n, m) + n) >> s.
struct FastDiv {
  uint64_t d = 1;
  uint64_t m = 1;
  uint32_t s = 0;

  static FastDiv make(uint64_t divisor) {
    FastDiv f;
    f.d = divisor == 0 ? 1 : divisor;
    uint32_t s = 0;
    while (s < 63 && (uint64_t(1) << s) < f.d) ++s;
    f.s = s;
    const unsigned __int128 one = 1;
    f.m = static_cast<uint64_t>(((one << 64) * ((one << s) - f.d)) / f.d + 1);
    return f;
  }
  KK_CUDA_HD uint64_t div(uint64_t n) const {
#if defined(__CUDA_ARCH__)
    const uint64_t t = __umul64hi(n, m);
#else
    const uint64_t t = static_cast<uint64_t>((static_cast<unsigned __int128>(n) * m) >> 64);
#endif
    return (t + n) >> s;
  }
};

// A row-major index over a logical shape (outermost first) mapped to an element offset:
// offset(j) = sum_d coord_d(j) * stride[d]. ndim == 0 maps every index to offset 0.
struct TensorMap {
  int32_t ndim = 0;
  FastDiv size[kMaxDims];
  int64_t stride[kMaxDims] = {};
};

// Offsets of N operands at iteration index i, from their strides over the iteration dims.
template <int N>
KK_CUDA_HD void operand_offsets(const TensorMap& iter, const int64_t (*stride)[kMaxDims],
                                int64_t i, int64_t (&off)[N]) {
  for (int k = 0; k < N; ++k) off[k] = 0;
  uint64_t rest = static_cast<uint64_t>(i);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = kMaxDims - 1; d >= 1; --d) {
    if (d < iter.ndim) {
      const uint64_t q = iter.size[d].div(rest);
      const int64_t c = static_cast<int64_t>(rest - q * iter.size[d].d);
      for (int k = 0; k < N; ++k) off[k] += c * stride[k][d];
      rest = q;
    }
  }
  for (int k = 0; k < N; ++k) off[k] += static_cast<int64_t>(rest) * stride[k][0];
}

KK_CUDA_HD int64_t map_offset(const TensorMap& m, int64_t j) {
  if (m.ndim == 0) return 0;
  int64_t off[1];
  operand_offsets<1>(m, &m.stride, j, off);
  return off[0];
}

// The blend kernels' work split: block b owns [start, end) of the iteration range, inside
// weight group `group` (blocks_per_group blocks of `chunk` elements per group of group_size).
struct BlockRange {
  int64_t group, start, end;
};

KK_CUDA_HD BlockRange block_range(int64_t block, int64_t blocks_per_group, int64_t group_size,
                                  int64_t chunk) {
  BlockRange r;
  r.group = block / blocks_per_group;
  const int64_t piece = block - r.group * blocks_per_group;
  const int64_t group_start = r.group * group_size;
  r.start = group_start + piece * chunk;
  const int64_t group_end = group_start + group_size;
  r.end = r.start + chunk < group_end ? r.start + chunk : group_end;
  return r;
}

// [a0, a1) is the part of [start, end) that runs in whole packs of `vec` elements aligned to
// multiples of vec; [start, a0) and [a1, end) are the scalar head and tail.
struct VecSplit {
  int64_t a0, a1;
};

KK_CUDA_HD VecSplit vector_split(int64_t start, int64_t end, int64_t vec) {
  VecSplit v;
  const int64_t up = (start + vec - 1) / vec * vec;
  v.a0 = up < end ? up : end;
  v.a1 = v.a0 + (end - v.a0) / vec * vec;
  return v;
}

// Mixed memory formats (dense (B,C,H,W) operands, NCHW and channels_last both present) run in
// tiles of kTileSide positions x kTileSide channels of one sample, each operand read and
// written along its own contiguous dim through shared memory.
constexpr int kTileSide = 32;
constexpr int kTileRows = 8;  // a block is kTileSide x kTileRows threads

struct TileShape {
  bool on = false;
  int64_t batch = 0, channels = 0, positions = 0;  // B, C, H*W
  int64_t tiles_p = 0, tiles_c = 0;                // tiles per sample along each dim
  uint32_t cl = 0;                                 // bit k: operand k is channels_last
};

// Element offset of (sample b, position p = h*W + w, channel c) in a dense operand.
KK_CUDA_HD int64_t tile_offset(int64_t b, int64_t p, int64_t c, int64_t C, int64_t HW, bool cl) {
  return b * C * HW + (cl ? p * C + c : c * HW + p);
}

// The tile of block `block`: blocks run sample-major, so one sample's tiles are consecutive
// (its weight-gradient partials are one contiguous group).
struct TileCoords {
  int64_t b, p0, c0;
};

KK_CUDA_HD TileCoords tile_coords(int64_t block, const TileShape& t) {
  const int64_t per_sample = t.tiles_p * t.tiles_c;
  TileCoords r;
  r.b = block / per_sample;
  const int64_t k = block - r.b * per_sample;
  const int64_t pt = k / t.tiles_c;
  r.p0 = pt * kTileSide;
  r.c0 = (k - pt * t.tiles_c) * kTileSide;
  return r;
}

// A blend weight (alpha or gate) as the kernels read it: in its own dtype through `map` (W
// index -> element offset), or, when `ptr` is null, the value of a 0-dim CPU tensor read on
// the host.
struct WeightSource {
  const void* ptr = nullptr;
  DType dtype = DType::kFloat;
  double host_value = 0.0;
  TensorMap map;
};

// How the iteration index i selects the weight index j.
enum class WeightForm : int32_t {
  kScalar = 0,   // j = 0
  kOuter = 1,    // j = i / group_size (per-sample (B,1,...,1) with the batch outermost, ...)
  kGeneral = 2,  // j = general.offset(i)
};

struct WeightIndex {
  WeightForm form = WeightForm::kScalar;
  int64_t groups = 1;      // kScalar: 1; kOuter: number of weight elements
  int64_t group_size = 0;  // kScalar: numel; kOuter: numel / groups
  TensorMap general;       // kGeneral: iteration index -> weight index
};

// Sums a source laid out by a linear index onto a target shape: target element t sums the
// source at kept.offset(t) + free.offset(m) for m in [0, free_count), in a fixed order.
struct ReduceMap {
  TensorMap kept;
  TensorMap free;
  int64_t free_count = 1;
};

// Weight-gradient output: a contiguous tensor of the weight's own shape and dtype.
struct WeightGrad {
  void* ptr = nullptr;
  DType dtype = DType::kFloat;
  int64_t numel = 0;
  ReduceMap from_w;  // GATE only: W (row-major) -> this weight's shape
};

enum class BlendOp : int32_t {
  kAdd = 0,       // lerp(h, s, w), w = clamp01(alpha) rounded to h's dtype
  kGate = 1,      // lerp(h, s, e), e = clamp01(clamp01(alpha) * clamp01(gate)) rounded to
                  // promoted(alpha, gate), then to h's dtype
  kMultiply = 2,  // h * (1 + c * tanh(s - r)), c = clamp01(alpha rounded to h's dtype)
  kSte = 3,       // h + (s - s)
  kValve = 4,     // 1 + c * tanh(m), c = clamp01(alpha) rounded to the result dtype
};

// One blend launch. Operand order (outputs first, then inputs):
//   forward  ADD/GATE/STE: out, h, s          MULTIPLY: out, h, s[, r]      valve: out, m
//   backward ADD/GATE: dh, ds, g, h, s        MULTIPLY: dh, ds[, dr], g, h, s[, r]
//            valve: dm, g, m
// host = T (h, out, g, dh; valve: the result dtype U); seed = S (s, r, ds, dr: T, or float
// beside a 16-bit T; valve: m's dtype: U, or a 16-bit float beside a float U).
struct BlendParams {
  BlendOp op = BlendOp::kAdd;
  DType host = DType::kFloat;
  DType seed = DType::kFloat;
  bool r_is_h = true;  // MULTIPLY: seed_input absent, r is h

  int64_t numel = 0;
  TensorMap iter;  // the collapsed iteration shape (strides unused)
  int32_t noperands = 0;
  void* data[kMaxOperands] = {};
  int64_t stride[kMaxOperands][kMaxDims] = {};
  bool linear = false;  // every operand's offset equals the iteration index
  TileShape tile;       // on: the mixed-layout (tiled) path, operands numbered as data[]

  // Weights (unused by STE). For GATE, alpha and gate are mapped over W = broadcast shape.
  WeightIndex widx;
  WeightSource alpha;
  WeightSource gate;
  DType promoted = DType::kFloat;  // GATE: result_type(alpha, gate)
  int64_t weight_numel = 1;        // numel of W

  // Backward only: gradients of the weights. Not written when need_weight_grad is false.
  bool need_weight_grad = false;
  WeightGrad dalpha;
  WeightGrad dgate;            // GATE
  ReduceMap general_reduce;    // widx.form == kGeneral: W element -> iteration indices

  cudaStream_t stream = nullptr;
};

// Device scratch memory (16-byte aligned) a launch needs; 0 when none (every forward).
size_t blend_workspace_bytes(const BlendParams& p, bool backward);
cudaError_t launch_blend(const BlendParams& p, bool backward, void* workspace);

// gate_effective_alpha: e = clamp01(round_promoted(clamp01(a) * clamp01(g))) over W, written
// contiguous in the promoted dtype; its backward sums d(e) through the clamps to each input.
struct GateWeightsParams {
  int64_t weight_numel = 0;
  WeightSource alpha;  // mapped over W
  WeightSource gate;   // mapped over W
  DType promoted = DType::kFloat;
  void* out = nullptr;  // forward
  WeightSource grad;    // backward: d(e), mapped over W
  WeightGrad dalpha;    // backward
  WeightGrad dgate;     // backward
  cudaStream_t stream = nullptr;
};

cudaError_t launch_gate_effective(const GateWeightsParams& p, bool backward);

// Pooling over x viewed as (B, C, P) positions, P = H*W with position p = (h, w), or a
// transformer's (B,T,C) as (B, C, T, W=1). Strides in elements of x.
struct PoolShape {
  int64_t B = 0, C = 0, H = 0, W = 0;
  int64_t sb = 0, sc = 0, sh = 0, sw = 0;
};

// gated_pool (means over the positions, accumulated in float/double) and the gate network
// (sigmoid(w2 . relu(w1 . pooled + b1) + b2) per sample, in x's compute type: float, double
// for double), forward and backward.
enum class PoolOp : int32_t { kPool = 0, kPoolBackward = 1, kNetwork = 2, kNetworkBackward = 3 };

struct DenseParam {
  const void* ptr = nullptr;
  DType dtype = DType::kFloat;
  int64_t s0 = 0, s1 = 0;  // element strides (s1 unused for vectors)
};

struct PoolParams {
  DType dtype = DType::kFloat;  // x's (and dx's) dtype (floating)
  const void* x = nullptr;      // forward, kNetworkBackward
  PoolShape shape;
  void* out = nullptr;  // kPool: (B, C) contiguous; kNetwork: (B); in x's dtype
  // Backward: grad[b * grad_sb + c * grad_sc] in any float dtype ((B, C) for pooling, (B) for
  // the network), and dx of x's sizes, dense, in its own strides: dx[b, c, positions] =
  // d(pooled)[b, c] / count in x's compute type, rounded to x's dtype.
  const void* grad = nullptr;
  DType grad_dtype = DType::kFloat;
  int64_t grad_sb = 0, grad_sc = 0;
  void* dx = nullptr;
  PoolShape dx_shape;
  // The gate network: w1 (hidden, C), b1 (hidden), w2 (1, hidden), b2 (1), each in its own
  // float dtype and strides; their gradients contiguous in each one's dtype (from_w unused).
  int64_t hidden = 0;
  DenseParam w1, b1, w2, b2;
  WeightGrad dw1, db1, dw2, db2;
  cudaStream_t stream = nullptr;
};
size_t pool_workspace_bytes(const PoolParams& p, PoolOp op);
cudaError_t launch_pool(const PoolParams& p, PoolOp op, void* workspace);

// ---------------------------------------------------------------- host planning
// Ordering dims by a layout, dropping size-1 dims, collapsing dims that are contiguous for
// every operand, and building the index maps above; used by the glue and the launchers.
namespace plan {

using Shape = std::vector<int64_t>;

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

// The iteration of an elementwise launch over operands of one shape: `order` holds the dims
// of size > 1, outermost first, by operand 0's strides descending (operand 0 is the first
// output, dense; ties keep the logical order, so a dense tensor's memory order comes out
// exactly); `dims` holds the collapsed sizes and each operand's strides; `linear` says every
// operand's offset is the iteration index itself.
struct Iteration {
  std::vector<int> order;
  Collapsed dims;
  bool linear = false;
};

inline Iteration plan_iteration(const Shape& sizes, const std::vector<Shape>& strides) {
  Iteration it;
  const Shape& st0 = strides.at(0);
  for (int d = 0; d < static_cast<int>(sizes.size()); ++d) {
    if (sizes[d] != 1) it.order.push_back(d);
  }
  std::stable_sort(it.order.begin(), it.order.end(), [&](int a, int b) { return st0[a] > st0[b]; });
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

}  // namespace plan
}  // namespace kk::cuda
