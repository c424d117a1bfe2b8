// CUDA kernels of the blend family (ADD, GATE, MULTIPLY, STE, the valve multiplier) and of
// gate_effective_alpha, forward and backward, and their launchers (csrc/cuda/README.md). The
// weight gradients are summed by fixed-order reductions, not atomics, so they are bit-stable.
#include "device_utils.cuh"

namespace kk::cuda {
namespace {

constexpr int kMaxThreads = plan::kBlendMaxThreads;
using Plan = plan::BlendPlan;

// ---------------------------------------------------------------- kernel arguments
enum class RedMode : int32_t { kNone = 0, kPartials = 1, kElement = 2 };

struct ElemArgs {
  BlendOp op;
  DType host;
  DType promoted;
  bool linear;
  bool vec;
  RedMode red;
  int64_t group_size;        // elements of one weight group (numel when not kOuter)
  int64_t chunk;             // elements per block, a multiple of the vector width
  int64_t blocks_per_group;  // ceil(group_size / chunk)
  TensorMap iter;
  TileShape tile;  // on: blend_tile_kernel's launch
  void* data[kMaxOperands];
  int64_t stride[kMaxOperands][kMaxDims];
  WeightIndex widx;
  WeightSource alpha;
  WeightSource gate;
  double* partials;  // kPartials: one per block
  void* dw;          // kElement: one opmath value per iteration index
};

// s (or r) as the reference reads it: cast to the host dtype, computed in opmath.
template <typename T, typename S, typename V>
KK_DEV V as_host(V v) {
  if constexpr (std::is_same_v<T, S>) {
    return v;
  } else {
    return round_through<T>(v);
  }
}

// ---------------------------------------------------------------- the ops
// Each op has kOut outputs and kIn inputs and its per-element math on opmath values (apply).
// A and B are its storage types (host and seed, or result and m): bit k of kInB (kOutB)
// makes input (output) k a B. W: reads a weight; R: forms a weight-gradient term. Bit k of
// kRedOnly: input k feeds only that term, so it is not loaded when none is wanted.
template <typename A, typename B, unsigned kOutB, unsigned kInB, bool W, bool R, unsigned kRedOnly = 0u>
struct OpBase {
  using op_t = opmath_t<A>;
  // vector width in elements: one 16-byte word of the narrowest operand
  static constexpr int kVec = 16 / (sizeof(A) < sizeof(B) ? sizeof(A) : sizeof(B));
  static constexpr bool kWeighted = W, kReduces = R;
  static constexpr unsigned kReductionOnlyInputs = kRedOnly;
  template <int k>
  using Out = std::conditional_t<((kOutB >> k) & 1u) != 0u, B, A>;
  template <int k>
  using In = std::conditional_t<((kInB >> k) & 1u) != 0u, B, A>;
};

template <typename T, typename S>
struct LerpForward : OpBase<T, S, 0b0, 0b10, true, false> {
  using op_t = opmath_t<T>;
  static constexpr int kOut = 1, kIn = 2;
  KK_DEV static void apply(const op_t (&in)[kIn], op_t w, op_t (&out)[kOut], double&) {
    out[0] = kk::lerp(in[0], as_host<T, S>(in[1]), w);
  }
};

// dh, ds <- g, h, s. dh = g*(1-w) and ds = g*w need only g: h and s feed the weight-gradient
// term alone.
template <typename T, typename S>
struct LerpBackward : OpBase<T, S, 0b10, 0b100, true, true, 0b110u> {
  using op_t = opmath_t<T>;
  static constexpr int kOut = 2, kIn = 3;
  KK_DEV static void apply(const op_t (&in)[kIn], op_t w, op_t (&out)[kOut], double& red) {
    const op_t s = as_host<T, S>(in[2]);
    op_t dh, ds, dw;
    kk::lerp_backward(in[0], in[1], s, w, dh, ds, dw);
    out[0] = dh;
    out[1] = round_through<T>(ds);  // the gradient of s.to(T) is rounded to T first
    // the weight-gradient term is formed in double (summed in double too), as the CPU does
    red = static_cast<double>(in[0]) * (static_cast<double>(s) - static_cast<double>(in[1]));
  }
};

// out <- h, s[, r]
template <typename T, typename S, bool kRIsH>
struct MultiplyForward : OpBase<T, S, 0b0, 0b110, true, false> {
  using op_t = opmath_t<T>;
  static constexpr int kOut = 1, kIn = kRIsH ? 2 : 3;
  KK_DEV static void apply(const op_t (&in)[kIn], op_t c, op_t (&out)[kOut], double&) {
    const op_t h = in[0];
    const op_t s = as_host<T, S>(in[1]);
    op_t r = h;
    if constexpr (!kRIsH) r = as_host<T, S>(in[kIn - 1]);
    if constexpr (std::is_same_v<T, op_t>) {
      out[0] = kk::multiply(h, s, r, c);
    } else {  // a 16-bit host: tanh exactly +-1 where the reference's is (blend_math.h)
      const op_t d = s - r;
      const float k = std::is_same_v<T, bf16_t> ? kk::kBFloat16TanhSaturates : kk::kFloat16TanhSaturates;
      const op_t t = fabsf(d) >= k ? copysignf(1.0f, d) : kk::Prims<op_t>::tanh(d);
      out[0] = h * kk::valve(c, t);
    }
  }
};

// Rounds an opmath value to X's precision at the reference's rounding points.
template <typename X>
struct RoundTo {
  static constexpr bool kIdentity = sizeof(X) >= 4;  // float and double round nothing here
  template <typename V>
  KK_DEV V operator()(V v) const {
    return round_through<X>(v);
  }
};

// dh, ds[, dr] <- g, h, s[, r]
template <typename T, typename S, bool kRIsH>
struct MultiplyBackward : OpBase<T, S, 0b110, 0b1100, true, true> {
  using op_t = opmath_t<T>;
  static constexpr int kOut = kRIsH ? 2 : 3, kIn = kRIsH ? 3 : 4;
  KK_DEV static void apply(const op_t (&in)[kIn], op_t c, op_t (&out)[kOut], double& red) {
    const op_t g = in[0];
    const op_t h = in[1];
    const op_t s = as_host<T, S>(in[2]);
    op_t r = h;
    if constexpr (!kRIsH) r = as_host<T, S>(in[3]);
    // s - r and its tanh as the reference's autograd sees them in T (identity for float and
    // double; for a half host a tanh saturated to +-1 gives exactly zero), as the CPU does
    const op_t diff = s - r;
    const op_t d = round_through<T>(diff);
    const op_t t = kk::Prims<op_t>::tanh(d);
    op_t dh, ds, dc;
    kk::multiply_backward_t<kRIsH>(g, h, round_through<T>(t), t, c, dh, ds, dc, RoundTo<T>{},
                                   kk::StorageTanhGrad{});  // as ATen's CUDA tanh_backward
    out[0] = dh;
    out[1] = ds;  // a T value: multiply_backward_t rounded it
    if constexpr (!kRIsH) out[kOut - 1] = -ds;
    // The alpha term g*h*tanh(s - r) in double, with the tanh of the unrounded difference:
    // tanh(d + e) ~ t + (1 - t^2) e to first order, e = (s - r) - d (zero unless T is a half
    // type; |e| is at most half an ulp of d there). A non-finite e (infinite d) counts as 0.
    const double e = static_cast<double>(diff) - static_cast<double>(d);
    const double td = static_cast<double>(t);
    const double t_alpha = e == e ? td + (1.0 - td * td) * e : td;
    red = static_cast<double>(g) * static_cast<double>(h) * t_alpha;
    (void)dc;
  }
};

template <typename T, typename S>
struct SteForward : OpBase<T, S, 0b0, 0b10, false, false> {
  using op_t = opmath_t<T>;
  static constexpr int kOut = 1, kIn = 2;
  KK_DEV static void apply(const op_t (&in)[kIn], op_t, op_t (&out)[kOut], double&) {
    out[0] = kk::ste(in[0], as_host<T, S>(in[1]));
  }
};

// The valve: U is the result dtype, M m's dtype (U itself, or a 16-bit float beside a float
// U). tanh is computed in M's compute type and rounded to M, as the reference computes
// torch.tanh(m) in m's dtype before promoting.
template <typename U, typename M>
KK_DEV opmath_t<U> valve_tanh(opmath_t<U> m) {
  return round_through<M>(kk::Prims<opmath_t<U>>::tanh(m));
}

template <typename U, typename M>
struct ValveForward : OpBase<U, M, 0b0, 0b1, true, false> {
  using op_t = opmath_t<U>;
  static constexpr int kOut = 1, kIn = 1;
  static_assert(std::is_same_v<opmath_t<U>, opmath_t<M>>, "m is read in the result's opmath");
  KK_DEV static void apply(const op_t (&in)[kIn], op_t c, op_t (&out)[kOut], double&) {
    out[0] = kk::valve(c, valve_tanh<U, M>(in[0]));
  }
};

// dm <- g, m
template <typename U, typename M>
struct ValveBackward : OpBase<U, M, 0b1, 0b10, true, true> {
  using op_t = opmath_t<U>;
  static constexpr int kOut = 1, kIn = 2;
  KK_DEV static void apply(const op_t (&in)[kIn], op_t c, op_t (&out)[kOut], double& red) {
    // dm sees tanh rounded to m's dtype (the reference's tanh backward); dc the unrounded one
    const op_t t = kk::Prims<op_t>::tanh(in[1]);
    op_t dm, dc;
    kk::valve_backward(in[0], c, round_through<M>(t), t, dm, dc, RoundTo<M>{}, kk::StorageTanhGrad{});
    out[0] = dm;
    red = static_cast<double>(in[0]) * static_cast<double>(t);  // g*t in double
    (void)dc;
  }
};

// ---------------------------------------------------------------- the driver
// The weight at W index j. Kept out of line: it is the same for every op and dtype, and
// the general-broadcast path calls it per element.
__device__ __noinline__ double weight_at(const ElemArgs& a, int64_t j) {
  const double av = read_weight(a.alpha, j);
  const double gv = a.op == BlendOp::kGate ? read_weight(a.gate, j) : 0.0;
  return blend_weight(a.op, a.host, a.promoted, av, gv);
}

__device__ __noinline__ double general_weight_at(const ElemArgs& a, int64_t i) {
  return weight_at(a, map_offset(a.widx.general, i));
}

// The block's weight-gradient partial sum, in a fixed order.
KK_DEV void write_partial(const ElemArgs& a, const CompensatedSum& acc, double* scratch, int64_t block) {
  if (a.red == RedMode::kPartials) {
    const double total = block_sum(acc, scratch);
    if (threadIdx.x == 0) a.partials[block] = total;
  }
}

template <class Op>
__global__ void __launch_bounds__(kMaxThreads)
    blend_elementwise_kernel(const __grid_constant__ ElemArgs a) {
  using op_t = typename Op::op_t;
  constexpr int NO = Op::kOut;
  constexpr int NI = Op::kIn;
  constexpr int N = NO + NI;
  constexpr int VEC = Op::kVec;
  __shared__ double scratch[32];

  const int64_t block = blockIdx.x;
  const BlockRange range = block_range(block, a.blocks_per_group, a.group_size, a.chunk);
  const int64_t group = range.group;
  const int64_t start = range.start;
  const int64_t end = range.end;
  const bool general_weight = a.widx.form == WeightForm::kGeneral;

  op_t w_block = op_t(0);
  if constexpr (Op::kWeighted) {
    if (!general_weight) {
      w_block = static_cast<op_t>(weight_at(a, a.widx.form == WeightForm::kOuter ? group : 0));
    }
  }
  auto weight_of = [&](int64_t i) -> op_t {
    if constexpr (Op::kWeighted) {
      if (general_weight) return static_cast<op_t>(general_weight_at(a, i));
    }
    return w_block;
  };

  // weight-gradient terms are summed in compensated double whatever the host dtype, so a
  // block's partial is as exact as a double can hold it
  CompensatedSum acc;
  auto consume = [&](int64_t i, double red) {
    if constexpr (Op::kReduces) {
      if (a.red == RedMode::kPartials) {
        acc.add(red);
      } else if (a.red == RedMode::kElement) {
        static_cast<op_t*>(a.dw)[i] = static_cast<op_t>(red);
      }
    }
  };

  // block-uniform: inputs only the weight-gradient term reads, when none is wanted
  auto skip_input = [&](int k) {
    return a.red == RedMode::kNone && ((Op::kReductionOnlyInputs >> k) & 1u) != 0u;
  };

  auto one = [&](int64_t i) {
    int64_t off[N];
    if (a.linear) {
#pragma unroll
      for (int k = 0; k < N; ++k) off[k] = i;
    } else {
      operand_offsets<N>(a.iter, a.stride, i, off);
    }
    op_t in[NI];
    static_for<NI>([&](auto kc) {
      constexpr int k = decltype(kc)::value;
      if (skip_input(k)) {
        in[k] = op_t(0);
      } else {
        in[k] = load_one<typename Op::template In<k>, op_t>(a.data[NO + k], off[NO + k]);
      }
    });
    op_t out[NO];
    double red = 0.0;
    Op::apply(in, weight_of(i), out, red);
    static_for<NO>([&](auto kc) {
      constexpr int k = decltype(kc)::value;
      store_one<typename Op::template Out<k>>(a.data[k], off[k], out[k]);
    });
    consume(i, red);
  };

  const int64_t t = threadIdx.x;
  const int64_t nt = blockDim.x;
  // [a0, a1) runs in packs; [start, a0) and [a1, end) element by element (all of it when
  // the operands are not dense and aligned).
  int64_t a0 = end, a1 = end;
  if (a.vec) {
    const VecSplit split = vector_split(start, end, VEC);
    a0 = split.a0;
    a1 = split.a1;
  }
  const int64_t head = a0 - start;
  const int64_t scalar_count = head + (end - a1);
  for (int64_t k = t; k < scalar_count; k += nt) one(k < head ? start + k : a1 + (k - head));
  if (a.vec) {
    for (int64_t v = a0 + t * VEC; v < a1; v += nt * VEC) {
      op_t in[NI][VEC];
      static_for<NI>([&](auto kc) {
        constexpr int k = decltype(kc)::value;
        if (skip_input(k)) {
#pragma unroll
          for (int l = 0; l < VEC; ++l) in[k][l] = op_t(0);
        } else {
          load_pack<typename Op::template In<k>, VEC>(a.data[NO + k], v, in[k]);
        }
      });
      op_t out[NO][VEC];
      // each lane's weight-gradient term goes straight into the sum (or the per-element
      // buffer): an array of VEC doubles here was kept in local memory, which cost the
      // backward a third of its bandwidth
      op_t red_op[VEC];
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        op_t lane_in[NI];
        op_t lane_out[NO];
#pragma unroll
        for (int k = 0; k < NI; ++k) lane_in[k] = in[k][l];
        double red = 0.0;
        Op::apply(lane_in, weight_of(v + l), lane_out, red);
#pragma unroll
        for (int k = 0; k < NO; ++k) out[k][l] = lane_out[k];
        if constexpr (Op::kReduces) {
          if (a.red == RedMode::kPartials) acc.add(red);
          red_op[l] = static_cast<op_t>(red);
        }
      }
      static_for<NO>([&](auto kc) {
        constexpr int k = decltype(kc)::value;
        store_pack<typename Op::template Out<k>, VEC>(a.data[k], v, out[k]);
      });
      if constexpr (Op::kReduces) {
        if (a.red == RedMode::kElement) store_pack<op_t, VEC>(a.dw, v, red_op);
      }
    }
  }

  if constexpr (Op::kReduces) write_partial(a, acc, scratch, block);
}

// Mixed memory formats (TileShape): a block owns kTileSide positions x kTileSide channels of
// one sample. Each input is read along its own contiguous dim into a shared tile
// [channel][position] (padded against bank conflicts); each thread runs the op on elements
// (channel ty + kTileRows*j, position tx), its outputs replacing its inputs in the tile; each
// output is written along its own contiguous dim. One weight value per block (one sample).
template <class Op>
__global__ void __launch_bounds__(kTileSide * kTileRows)
    blend_tile_kernel(const __grid_constant__ ElemArgs a) {
  using op_t = typename Op::op_t;
  constexpr int NO = Op::kOut;
  constexpr int NI = Op::kIn;
  static_assert(NO <= NI, "outputs reuse the input tiles");
  constexpr int kPer = kTileSide / kTileRows;
  __shared__ op_t tile[NI][kTileSide][kTileSide + 1];
  __shared__ double scratch[32];

  const TileShape& ts = a.tile;
  const int64_t block = blockIdx.x;
  const TileCoords tc = tile_coords(block, ts);
  const int64_t C = ts.channels, HW = ts.positions;
  const int tx = static_cast<int>(threadIdx.x) % kTileSide;
  const int ty = static_cast<int>(threadIdx.x) / kTileSide;

  op_t w = op_t(0);
  if constexpr (Op::kWeighted) {
    w = static_cast<op_t>(weight_at(a, a.widx.form == WeightForm::kOuter ? tc.b : 0));
  }

  // (channel slot, position slot, offset) of the j-th element thread (tx, ty) moves for an
  // operand in channels_last (lanes along channels) or NCHW (lanes along positions)
  auto slot = [&](bool cl, int j, int& cs, int& ps) {
    const int row = ty + kTileRows * j;
    cs = cl ? tx : row;
    ps = cl ? row : tx;
  };
  const bool skip_loads = a.red == RedMode::kNone;

  static_for<NI>([&](auto kc) {
    constexpr int k = decltype(kc)::value;
    if (skip_loads && ((Op::kReductionOnlyInputs >> k) & 1u) != 0u) return;
    const bool cl = ((ts.cl >> (NO + k)) & 1u) != 0u;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      int cs, ps;
      slot(cl, j, cs, ps);
      const int64_t c = tc.c0 + cs, p = tc.p0 + ps;
      if (c < C && p < HW) {
        tile[k][cs][ps] = load_one<typename Op::template In<k>, op_t>(
            a.data[NO + k], tile_offset(tc.b, p, c, C, HW, cl));
      }
    }
  });
  __syncthreads();

  CompensatedSum acc;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int cs = ty + kTileRows * j, ps = tx;
    if (tc.c0 + cs < C && tc.p0 + ps < HW) {
      op_t in[NI];
#pragma unroll
      for (int k = 0; k < NI; ++k) {
        const bool skipped = skip_loads && ((Op::kReductionOnlyInputs >> k) & 1u) != 0u;
        in[k] = skipped ? op_t(0) : tile[k][cs][ps];
      }
      op_t out[NO];
      double red = 0.0;
      Op::apply(in, w, out, red);
#pragma unroll
      for (int k = 0; k < NO; ++k) tile[k][cs][ps] = out[k];
      if constexpr (Op::kReduces) {
        if (a.red == RedMode::kPartials) acc.add(red);
      }
    }
  }
  __syncthreads();

  static_for<NO>([&](auto kc) {
    constexpr int k = decltype(kc)::value;
    const bool cl = ((ts.cl >> k) & 1u) != 0u;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      int cs, ps;
      slot(cl, j, cs, ps);
      const int64_t c = tc.c0 + cs, p = tc.p0 + ps;
      if (c < C && p < HW) {
        store_one<typename Op::template Out<k>>(a.data[k], tile_offset(tc.b, p, c, C, HW, cl),
                                                tile[k][cs][ps]);
      }
    }
  });

  if constexpr (Op::kReduces) write_partial(a, acc, scratch, block);
}

// ---------------------------------------------------------------- weight gradients
// One block per weight element: threads stride in a fixed order, then a fixed tree.

// What happens to the finished sum v_j of weight element j: with out_double (GATE) it is
// stored as d(effective alpha) for gate_weights_backward_kernel; else dalpha_j = v_j where the
// clamp passes on alpha_j (MULTIPLY: alpha_j rounded to the host dtype), 0 elsewhere, in
// alpha's dtype.
struct FinishArgs {
  bool round_alpha = false;
  DType host = DType::kFloat;
  WeightSource alpha;  // mapped over the targets (W)
  WeightGrad out;
  double* out_double = nullptr;
};

constexpr int kReduceThreads = 256;

KK_DEV void finish(const FinishArgs& f, int64_t j, double v) {
  if (f.out_double != nullptr) {
    f.out_double[j] = v;
    return;
  }
  double mask_on = read_weight(f.alpha, j);
  if (f.round_alpha) mask_on = round_to(f.host, mask_on);
  const double d = kk::clamp01_passes_grad(mask_on) ? v : 0.0;
  store_from_double(f.out.ptr, f.out.dtype, j, d);
}

// Target j sums src[map.kept.offset(j) + map.free.offset(m)] over m.
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

// ---------------------------------------------------------------- planning and dispatch
bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

ElemArgs make_args(const BlendParams& p, const Plan& plan, int vec_width) {
  ElemArgs a{};
  a.op = p.op;
  a.host = p.host;
  a.promoted = p.promoted;
  a.linear = p.linear;
  a.group_size = plan.group_size;
  a.chunk = plan.chunk;
  a.blocks_per_group = plan.blocks_per_group > 0 ? plan.blocks_per_group : 1;
  a.iter = p.iter;
  a.tile = p.tile;
  bool aligned = true;
  for (int k = 0; k < kMaxOperands; ++k) {
    a.data[k] = p.data[k];
    for (int d = 0; d < kMaxDims; ++d) a.stride[k][d] = p.stride[k][d];
    if (k < p.noperands) aligned = aligned && aligned16(p.data[k]);
  }
  a.vec = p.linear && aligned && vec_width > 1;
  a.widx = p.widx;
  a.alpha = p.alpha;
  a.gate = p.gate;
  return a;
}

template <class Op>
cudaError_t launch_elementwise(const ElemArgs& a, const Plan& plan, cudaStream_t stream) {
  const int64_t blocks = a.tile.on ? plan::tile_blocks(a.tile) : plan.blocks;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (a.tile.on) {
    blend_tile_kernel<Op><<<static_cast<unsigned>(blocks), kTileSide * kTileRows, 0, stream>>>(a);
  } else {
    blend_elementwise_kernel<Op><<<static_cast<unsigned>(blocks), static_cast<unsigned>(plan.threads), 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// Calls f(Op{}) with the kernel op of p. The blends' seed dtype S is T, or float beside a
// 16-bit T; the valve's m dtype M is the result dtype U, or a 16-bit float beside a float U.
template <typename F>
cudaError_t dispatch_op(const BlendParams& p, bool backward, F&& f) {
  return dispatch_float(p.host, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (p.op == BlendOp::kValve) {
      auto valve = [&](auto m) {
        using M = decltype(m);
        return backward ? f(ValveBackward<T, M>{}) : f(ValveForward<T, M>{});
      };
      if (p.seed == p.host) return valve(t);
      if constexpr (std::is_same_v<T, float>) {
        if (p.seed == DType::kBFloat16) return valve(bf16_t{});
        if (p.seed == DType::kHalf) return valve(f16_t{});
      }
      return cudaErrorInvalidValue;
    }
    auto blend = [&](auto st) -> cudaError_t {
      using S = decltype(st);
      switch (p.op) {
        case BlendOp::kAdd:
        case BlendOp::kGate:
          return backward ? f(LerpBackward<T, S>{}) : f(LerpForward<T, S>{});
        case BlendOp::kMultiply:
          if (p.r_is_h) {
            return backward ? f(MultiplyBackward<T, S, true>{}) : f(MultiplyForward<T, S, true>{});
          }
          return backward ? f(MultiplyBackward<T, S, false>{}) : f(MultiplyForward<T, S, false>{});
        case BlendOp::kSte:
          return f(SteForward<T, S>{});
        default:
          return cudaErrorInvalidValue;
      }
    };
    if (p.seed == p.host) return blend(t);
    if constexpr (kIsHalf<T>) {
      if (p.seed == DType::kFloat) return blend(float{});
    }
    return cudaErrorInvalidValue;
  });
}

int vec_width_of(const BlendParams& p) {
  const int a = dtype_size(p.host), b = dtype_size(p.seed);
  return 16 / (a < b ? a : b);
}

int opmath_size(DType host) { return host == DType::kDouble ? 8 : 4; }

// Workspace layout of a backward launch (byte offsets, 256-aligned).
struct Workspace {
  RedMode mode = RedMode::kNone;
  size_t partials = 0, dw = 0, de = 0, total = 0;
};

Workspace workspace_layout(const BlendParams& p) {
  Workspace w;
  if (!p.need_weight_grad || p.op == BlendOp::kSte) return w;
  const Plan plan = plan::make_blend_plan(p.numel, p.widx, vec_width_of(p));
  size_t off = 0;
  if (p.numel > 0 && p.widx.form == WeightForm::kGeneral) {
    w.mode = RedMode::kElement;
    w.dw = plan::carve(off, static_cast<size_t>(p.numel) * opmath_size(p.host));
  } else {
    w.mode = RedMode::kPartials;
    const int64_t blocks = p.tile.on ? plan::tile_blocks(p.tile) : plan.blocks;
    w.partials = plan::carve(off, static_cast<size_t>(blocks > 0 ? blocks : 1) * sizeof(double));
  }
  if (p.op == BlendOp::kGate) {
    w.de = plan::carve(off, static_cast<size_t>(p.weight_numel > 0 ? p.weight_numel : 1) * sizeof(double));
  }
  w.total = off;
  return w;
}

}  // namespace

// ---------------------------------------------------------------- launchers
size_t blend_workspace_bytes(const BlendParams& p, bool backward) {
  return backward ? workspace_layout(p).total : 0;
}

cudaError_t launch_blend(const BlendParams& p, bool backward, void* workspace) {
  if (!backward && p.numel <= 0) return cudaSuccess;
  if (backward && p.op == BlendOp::kSte) return cudaErrorInvalidValue;  // STE's gradient needs no kernel
  const int vec = vec_width_of(p);
  const Plan plan = plan::make_blend_plan(p.numel, p.widx, vec);
  ElemArgs a = make_args(p, plan, vec);
  if (!backward) {
    return dispatch_op(p, false, [&](auto op) { return launch_elementwise<decltype(op)>(a, plan, p.stream); });
  }
  const Workspace ws = workspace_layout(p);
  char* base = static_cast<char*>(workspace);
  if (ws.total > 0 && base == nullptr) return cudaErrorInvalidValue;
  a.red = ws.mode;
  if (ws.mode == RedMode::kPartials) a.partials = reinterpret_cast<double*>(base + ws.partials);
  if (ws.mode == RedMode::kElement) {
    a.dw = base + ws.dw;
    a.vec = a.vec && aligned16(a.dw);
  }
  if (p.numel > 0) {
    const cudaError_t err =
        dispatch_op(p, true, [&](auto op) { return launch_elementwise<decltype(op)>(a, plan, p.stream); });
    if (err != cudaSuccess) return err;
  }
  if (!p.need_weight_grad) return cudaSuccess;

  // Finish the weight gradient: fixed-order sums per weight element, then the clamp masks
  // and the cast to the weight's dtype (GATE: through both clamps to alpha and gate).
  FinishArgs f;
  f.round_alpha = p.op == BlendOp::kMultiply;
  f.host = p.host;
  f.alpha = p.alpha;
  f.out = p.dalpha;
  if (p.op == BlendOp::kGate) f.out_double = reinterpret_cast<double*>(base + ws.de);
  if (p.weight_numel > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (p.weight_numel > 0) {
    const unsigned targets = static_cast<unsigned>(p.weight_numel);
    if (ws.mode == RedMode::kElement && p.host == DType::kDouble) {
      reduce_general_kernel<double><<<targets, kReduceThreads, 0, p.stream>>>(
          static_cast<const double*>(a.dw), p.general_reduce, f);
    } else if (ws.mode == RedMode::kElement) {
      reduce_general_kernel<float><<<targets, kReduceThreads, 0, p.stream>>>(
          static_cast<const float*>(a.dw), p.general_reduce, f);
    } else {
      // Weight element j sums the partials of its group, partials[j * per_group + q]; with no
      // elements (numel == 0) every sum is zero. Tiles run sample-major: a per-sample weight's
      // group is its sample's tiles, a scalar's all.
      int64_t per_group = p.numel > 0 ? plan.blocks_per_group : 0;
      if (p.tile.on) {
        per_group = p.widx.form == WeightForm::kOuter ? p.tile.tiles_p * p.tile.tiles_c
                                                      : plan::tile_blocks(p.tile);
      }
      ReduceMap groups;
      plan::fill_map({p.weight_numel}, {per_group}, groups.kept);
      plan::fill_map({per_group}, {1}, groups.free);
      groups.free_count = per_group;
      reduce_general_kernel<double><<<targets, kReduceThreads, 0, p.stream>>>(a.partials, groups, f);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.op != BlendOp::kGate) return cudaSuccess;

  GateWeightsParams g;
  g.weight_numel = p.weight_numel;
  g.alpha = p.alpha;
  g.gate = p.gate;
  g.promoted = p.promoted;
  g.grad.ptr = f.out_double;
  g.grad.dtype = DType::kDouble;
  plan::fill_map({p.weight_numel}, {1}, g.grad.map);
  g.dalpha = p.dalpha;
  g.dgate = p.dgate;
  g.stream = p.stream;
  return launch_gate_effective(g, true);
}

cudaError_t launch_gate_effective(const GateWeightsParams& p, bool backward) {
  if (!backward) {
    if (p.weight_numel <= 0) return cudaSuccess;
    const int64_t blocks = (p.weight_numel + kReduceThreads - 1) / kReduceThreads;
    gate_effective_forward_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kReduceThreads, 0,
                                    p.stream>>>(p);
    return cudaGetLastError();
  }
  const int64_t blocks = p.dalpha.numel + p.dgate.numel;  // [0, alpha.numel) produce dalpha
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  gate_weights_backward_kernel<<<static_cast<unsigned>(blocks), kReduceThreads, 0, p.stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kk::cuda
