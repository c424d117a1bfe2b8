// CUDA gated pooling (mean over the spatial or sequence axis) and the fused gate network
// (pool -> Linear -> ReLU -> Linear -> Sigmoid), forward and backward.
// Pooling reads x once: one warp per (b, c) plane segment when the channel stride is not 1,
// else a block per (b, channel tile) reducing positions in a fixed tree. Large planes with
// few samples are split; a finishing kernel adds the splits in a fixed order. Sums are float
// per thread and double across threads; the mean is sum * (1 / count) in double, rounded once
// to float (double for double) and to x's dtype, as on the CPU.
#include "device_utils.cuh"

namespace kk::cuda {
namespace {

constexpr int kThreads = 256;

using plan::align256;
using plan::ceil_div;

struct PoolArgs {
  const void* x;
  int64_t B, C, P;  // P = H * W positions
  int64_t sb, sc, sh, sw;
  FastDiv W;        // positions -> (h, w)
  bool merged;      // sh == W * sw: position p sits at p * sw
  int64_t splits;   // position segments per plane
  int64_t seg;      // positions per segment
  double inv_count;
  void* out;         // x's dtype, (B, C) contiguous, or null
  void* out_opmath;  // opmath, (B, C) contiguous, or null
  double* partials;  // splits > 1: [split][b * C + c]
};

template <typename T>
KK_DEV void write_mean(const PoolArgs& a, int64_t q, double sum) {
  using op_t = opmath_t<T>;
  const op_t mean = static_cast<op_t>(sum * a.inv_count);
  if (a.out != nullptr) store_one<T>(a.out, q, mean);
  if (a.out_opmath != nullptr) static_cast<op_t*>(a.out_opmath)[q] = mean;
}

// The sum of (b, c) = q over position segment `split`: the mean, or a partial to finish.
template <typename T>
KK_DEV void write_sum(const PoolArgs& a, int64_t split, int64_t q, double sum) {
  if (a.splits == 1) {
    write_mean<T>(a, q, sum);
  } else {
    a.partials[split * a.B * a.C + q] = sum;
  }
}

KK_DEV int64_t position_offset(const PoolArgs& a, int64_t p) {
  if (a.merged) return p * a.sw;
  const uint64_t h = a.W.div(static_cast<uint64_t>(p));
  return static_cast<int64_t>(h) * a.sh + (p - static_cast<int64_t>(h * a.W.d)) * a.sw;
}

// One warp per (plane, segment).
template <typename T>
__global__ void __launch_bounds__(kThreads) pool_planes_kernel(const __grid_constant__ PoolArgs a) {
  using op_t = opmath_t<T>;
  constexpr int VEC = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  const int64_t items = a.B * a.C * a.splits;
  const bool contiguous = a.merged && a.sw == 1;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       it < items; it += warps) {
    const int64_t q = it / a.splits;
    const int64_t split = it - q * a.splits;
    const int64_t b = q / a.C, c = q - (q / a.C) * a.C;
    const int64_t p0 = split * a.seg;
    const int64_t p1 = min(p0 + a.seg, a.P);
    const T* plane = static_cast<const T*>(a.x) + b * a.sb + c * a.sc;
    op_t acc = op_t(0);
    if (contiguous) {
      // Scalar head up to a 16-byte boundary, packs, scalar tail.
      const T* seg = plane + p0;
      const int64_t n = p1 > p0 ? p1 - p0 : 0;
      const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(seg) & 15u) / sizeof(T));
      const int64_t head = min(n, mis == 0 ? int64_t(0) : int64_t(VEC) - mis);
      const int64_t packs = (n - head) / VEC;
      const int64_t tail0 = head + packs * VEC;
      for (int64_t k = lane; k < head; k += 32) acc += load_one<T, op_t>(seg, k);
      for (int64_t k = lane; k < packs; k += 32) {
        op_t v[VEC];
        load_pack<T, VEC>(seg + head, k * VEC, v);
#pragma unroll
        for (int l = 0; l < VEC; ++l) acc += v[l];
      }
      for (int64_t k = tail0 + lane; k < n; k += 32) acc += load_one<T, op_t>(seg, k);
    } else {
      for (int64_t p = p0 + lane; p < p1; p += 32) acc += load_one<T, op_t>(plane, position_offset(a, p));
    }
    const double sum = warp_sum(static_cast<double>(acc));
    if (lane == 0) write_sum<T>(a, split, q, sum);
  }
}

// Channels contiguous (stride 1): a block covers TX channel packs of one sample and one
// position segment; threads with the same channel pack sum positions ty, ty + TY, ...
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    pool_channels_kernel(const __grid_constant__ PoolArgs a, int tx_count, int64_t tiles) {
  using op_t = opmath_t<T>;
  __shared__ double red[kThreads * VEC];
  const int tx = threadIdx.x % tx_count;
  const int ty = threadIdx.x / tx_count;
  const int ty_count = blockDim.x / tx_count;
  const int64_t b = blockIdx.x / tiles;
  const int64_t tile = blockIdx.x - b * tiles;
  const int64_t split = blockIdx.y;
  const int64_t c0 = (tile * tx_count + tx) * VEC;
  const bool active = c0 < a.C;
  const int64_t p0 = split * a.seg;
  const int64_t p1 = min(p0 + a.seg, a.P);
  op_t acc[VEC];
#pragma unroll
  for (int l = 0; l < VEC; ++l) acc[l] = op_t(0);
  if (active) {
    const T* base = static_cast<const T*>(a.x) + b * a.sb + c0;
    for (int64_t p = p0 + ty; p < p1; p += ty_count) {
      const int64_t off = position_offset(a, p);
      if constexpr (VEC == 1) {
        acc[0] += load_one<T, op_t>(base, off);
      } else {
        op_t v[VEC];
        load_pack<T, VEC>(base, off, v);
#pragma unroll
        for (int l = 0; l < VEC; ++l) acc[l] += v[l];
      }
    }
  }
#pragma unroll
  for (int l = 0; l < VEC; ++l) red[threadIdx.x * VEC + l] = static_cast<double>(acc[l]);
  __syncthreads();
  // Fixed tree over ty (ty_count is a power of two).
  for (int half = ty_count / 2; half > 0; half /= 2) {
    if (ty < half) {
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        red[threadIdx.x * VEC + l] += red[(threadIdx.x + half * tx_count) * VEC + l];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const int64_t c = c0 + l;
      if (VEC == 1 || c < a.C) {
        write_sum<T>(a, split, b * a.C + c, red[threadIdx.x * VEC + l]);
      }
    }
  }
}

// Adds the splits of each (b, c) in order and writes the means (splits == 0: count is zero,
// and 0 * inf gives the NaN mean torch gives for a mean over nothing).
template <typename T>
__global__ void __launch_bounds__(kThreads) pool_finish_kernel(const __grid_constant__ PoolArgs a) {
  const int64_t n = a.B * a.C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n; q += stride) {
    double sum = 0.0;
    for (int64_t s = 0; s < a.splits; ++s) sum += a.partials[s * n + q];
    write_mean<T>(a, q, sum);
  }
}

unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}

// How a pooling launch splits its work; depends on the sizes only.
struct PoolPlan {
  bool channels = false;  // the channels kernel, else planes
  int vec = 1;            // channels kernel: channel pack width
  int tx = 32;            // channels kernel: threads across channel packs
  int64_t tiles = 1;      // channels kernel: channel tiles per sample
  int64_t splits = 1;
  int64_t seg = 0;
};

PoolPlan make_pool_plan(const PoolParams& p) {
  PoolPlan plan;
  const PoolShape& s = p.shape;
  const int64_t P = s.H * s.W;
  const int64_t planes = s.B * s.C;
  if (P == 0 || planes == 0) {
    plan.splits = 0;
    return plan;
  }
  const int esize = dtype_size(p.dtype);
  plan.channels = s.sc == 1 && s.C > 1;
  int64_t splits;
  if (plan.channels) {
    const int full = 16 / esize;
    // Strides that actually move between positions (a size-1 axis never does).
    const bool rows_ok = s.H <= 1 || s.sh % full == 0;
    const bool cols_ok = s.W <= 1 || s.sw % full == 0;
    const bool aligned = (reinterpret_cast<uintptr_t>(p.x) & 15u) == 0 && s.C % full == 0 &&
                         (s.B <= 1 || s.sb % full == 0) && rows_ok && cols_ok;
    plan.vec = aligned ? full : 1;
    const int64_t packs = s.C / plan.vec;
    plan.tx = 1;
    while (plan.tx < 32 && plan.tx < packs) plan.tx *= 2;
    plan.tiles = ceil_div(packs, plan.tx);
    const int64_t ty = kThreads / plan.tx;
    const int64_t blocks = plan.tiles * s.B;
    splits = std::min(ceil_div(512, blocks), ceil_div(P, ty * 4));
  } else {
    const int64_t warps_wanted = 4096;
    splits = std::min(ceil_div(warps_wanted, planes), ceil_div(P, 256));
  }
  plan.splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  plan.seg = ceil_div(P, plan.splits);
  plan.splits = ceil_div(P, plan.seg);  // no empty segments
  return plan;
}

PoolArgs make_pool_args(const PoolParams& p, const PoolPlan& plan) {
  PoolArgs a{};
  const PoolShape& s = p.shape;
  a.x = p.x;
  a.B = s.B;
  a.C = s.C;
  a.P = s.H * s.W;
  a.sb = s.sb;
  a.sc = s.sc;
  a.sh = s.sh;
  a.sw = s.sw;
  a.W = FastDiv::make(static_cast<uint64_t>(s.W > 0 ? s.W : 1));
  // Position p = (h, w) = (p / W, p % W) sits at h * sh + w * sw; "merged" when that is
  // p * sw (one row, or rows back to back) or p * sh (one column: p is h).
  a.merged = s.H <= 1 || s.sh == s.W * s.sw;
  if (s.W == 1) {
    a.merged = true;
    a.sw = s.sh;
  }
  a.splits = plan.splits;
  a.seg = plan.seg;
  a.inv_count = 1.0 / static_cast<double>(a.P);
  a.out = p.out;
  return a;
}

size_t pool_workspace(const PoolParams& p, const PoolPlan& plan) {
  if (plan.splits <= 1) return 0;
  return align256(static_cast<size_t>(plan.splits * p.shape.B * p.shape.C) * sizeof(double));
}

template <typename T>
cudaError_t run_pool(PoolArgs a, const PoolPlan& plan, void* workspace, cudaStream_t stream) {
  const int64_t planes = a.B * a.C;
  if (planes == 0) return cudaSuccess;
  if (plan.splits > 1) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    a.partials = static_cast<double*>(workspace);
  }
  if (plan.splits > 0) {
    if (plan.channels) {
      const dim3 grid(static_cast<unsigned>(plan.tiles * a.B), static_cast<unsigned>(plan.splits));
      if (plan.tiles * a.B > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
      if (plan.vec == 1) {
        pool_channels_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a, plan.tx, plan.tiles);
      } else {
        pool_channels_kernel<T, 16 / sizeof(T)><<<grid, kThreads, 0, stream>>>(a, plan.tx, plan.tiles);
      }
    } else {
      const int64_t warps_per_block = kThreads / 32;
      pool_planes_kernel<T>
          <<<grid_for(ceil_div(planes * plan.splits, warps_per_block)), kThreads, 0, stream>>>(a);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || plan.splits == 1) return err;
  }
  pool_finish_kernel<T><<<grid_for(ceil_div(planes, kThreads)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- pooling backward
struct PoolBackwardArgs {
  void* dx;
  const void* grad;
  DType grad_dtype;
  int64_t numel;
  TensorMap iter;
  int64_t stride[2][kMaxDims];  // dx, grad
  double count;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_backward_kernel(const __grid_constant__ PoolBackwardArgs a) {
  using op_t = opmath_t<T>;
  const op_t div = static_cast<op_t>(a.count);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.numel; i += stride) {
    int64_t off[2];
    operand_offsets<2>(a.iter, a.stride, i, off);
    const op_t g = static_cast<op_t>(load_as_double(a.grad, a.grad_dtype, off[1]));
    store_one<T>(a.dx, off[0], g / div);
  }
}

// The common case: dx dense in NCHW order (each (b, c) plane a run of P equal values) or in
// channels-last / (B, T, C) order (each position a row of C values). dx is walked linearly in
// 16-byte packs that never straddle a plane or a row: two divisions per pack.
struct PoolBackwardDenseArgs {
  void* dx;
  const void* grad;
  DType grad_dtype;
  int64_t numel;
  int64_t grad_sb, grad_sc;
  FastDiv inner;   // planes: P (elements per plane); channels: C
  FastDiv outer;   // planes: C (planes per sample); channels: P * C (elements per sample)
  bool channels;   // channels innermost
  double count;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    pool_backward_dense_kernel(const __grid_constant__ PoolBackwardDenseArgs a) {
  using op_t = opmath_t<T>;
  const op_t div = static_cast<op_t>(a.count);
  const int64_t packs = a.numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < packs; k += stride) {
    const uint64_t i = static_cast<uint64_t>(k) * VEC;
    op_t v[VEC];
    if (a.channels) {
      const uint64_t b = a.outer.div(i);
      const uint64_t c0 = i - a.inner.div(i) * a.inner.d;
      const int64_t base = static_cast<int64_t>(b) * a.grad_sb;
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        const int64_t c = static_cast<int64_t>(c0) + l;
        v[l] = static_cast<op_t>(load_as_double(a.grad, a.grad_dtype, base + c * a.grad_sc)) / div;
      }
    } else {
      const uint64_t plane = a.inner.div(i);
      const uint64_t b = a.outer.div(plane);
      const uint64_t c = plane - b * a.outer.d;
      const op_t g = static_cast<op_t>(load_as_double(
          a.grad, a.grad_dtype, static_cast<int64_t>(b) * a.grad_sb + static_cast<int64_t>(c) * a.grad_sc));
      const op_t val = g / div;
#pragma unroll
      for (int l = 0; l < VEC; ++l) v[l] = val;
    }
    store_pack<T, VEC>(a.dx, static_cast<int64_t>(i), v);
  }
}

// Launches the dense kernel when dx's layout allows it; false when it does not (then the
// general kernel runs).
bool try_pool_backward_dense(const PoolParams& p, int64_t n, double count, cudaError_t& err) {
  const PoolShape& s = p.dx_shape;
  const int layout = plan::layout_4d({s.B, s.C, s.H, s.W}, {s.sb, s.sc, s.sh, s.sw});
  const bool channels = layout == plan::kLayoutChannelsLast;  // channels last, (B, T, C)
  const int64_t P = s.H * s.W;
  const int64_t row = channels ? s.C : P;
  const int vec = 16 / dtype_size(p.dtype);
  if (layout == plan::kLayoutOther || row % vec != 0 || (reinterpret_cast<uintptr_t>(p.dx) & 15u) != 0) {
    return false;
  }
  // planes: inner = P (elements per plane), outer = C; channels: inner = C, outer = P * C
  const PoolBackwardDenseArgs a{p.dx, p.grad, p.grad_dtype, n, p.grad_sb, p.grad_sc,
                                FastDiv::make(static_cast<uint64_t>(row)),
                                FastDiv::make(static_cast<uint64_t>(channels ? P * s.C : s.C)), channels, count};
  const int64_t blocks = ceil_div(n / vec, kThreads);
  err = dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    pool_backward_dense_kernel<T, VEC><<<grid_for(blocks), kThreads, 0, p.stream>>>(a);
    return cudaGetLastError();
  });
  return true;
}

cudaError_t run_pool_backward(const PoolParams& p) {
  const PoolShape& s = p.dx_shape;
  const plan::Shape sizes = {s.B, s.C, s.H, s.W};
  const plan::Shape dx_strides = {s.sb, s.sc, s.sh, s.sw};
  const plan::Shape g_strides = {p.grad_sb, p.grad_sc, 0, 0};
  const int64_t n = plan::numel(sizes);
  if (n == 0) return cudaSuccess;
  const plan::Iteration it = plan::plan_iteration(sizes, {dx_strides, g_strides});
  const plan::Collapsed& c = it.dims;
  PoolBackwardArgs a{};
  a.dx = p.dx;
  a.grad = p.grad;
  a.grad_dtype = p.grad_dtype;
  a.numel = n;
  if (!plan::fill_map(c.sizes, c.strides[0], a.iter)) return cudaErrorInvalidValue;
  for (size_t d = 0; d < c.sizes.size(); ++d) {
    a.stride[0][d] = c.strides[0][d];
    a.stride[1][d] = c.strides[1][d];
  }
  a.count = static_cast<double>(s.H * s.W);
  cudaError_t dense_err = cudaSuccess;
  if (try_pool_backward_dense(p, n, a.count, dense_err)) return dense_err;
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    pool_backward_kernel<T><<<grid_for(ceil_div(n, kThreads)), kThreads, 0, p.stream>>>(a);
    return cudaGetLastError();
  });
}

// ---------------------------------------------------------------- gate network
using Dense = DenseParam;

// sum_k w[row, k] * v[k] in op_t, reading w in its own dtype.
template <typename op_t>
KK_DEV op_t dense_dot(const Dense& w, int64_t row, const op_t* v, int64_t n) {
  return visit_float(w.dtype, op_t(0), [&](auto x) {
    const auto* base = static_cast<const decltype(x)*>(w.ptr) + row * w.s0;
    op_t acc = op_t(0);
    for (int64_t k = 0; k < n; ++k) acc += widen<op_t>(base[k * w.s1]) * v[k];
    return acc;
  });
}

template <typename op_t>
KK_DEV op_t dense_at(const Dense& w, int64_t i, int64_t j) {
  return static_cast<op_t>(load_as_double(w.ptr, w.dtype, i * w.s0 + j * w.s1));
}

// torch.relu: NaN stays NaN.
template <typename op_t>
KK_DEV op_t relu(op_t x) {
  return x < op_t(0) ? op_t(0) : x;
}

struct MlpArgs {
  int64_t B, C, hidden;
  Dense w1, b1, w2, b2;
  const void* pooled;  // op_t (B, C)
  void* out;           // forward: x's dtype (B)
  // backward
  const void* grad;
  DType grad_dtype;
  int64_t grad_s;
  void* dz1;      // op_t (B, hidden)
  void* a1;       // op_t (B, hidden)
  void* dz2;      // op_t (B)
  void* dpooled;  // op_t (B, C)
};

// One block per sample: z1 = w1 . pooled + b1 (kept in shared memory), y = sigmoid(w2 .
// relu(z1) + b2). Backward also forms dz2 = g * (1 - y) * y, dz1 = relu(z1) <= 0 ? 0 : dz2 * w2 and
// dpooled = dz1 . w1 for the sample.
template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads) gate_mlp_kernel(const __grid_constant__ MlpArgs a) {
  using op_t = opmath_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  op_t* z1 = reinterpret_cast<op_t*>(smem_raw);
  __shared__ double scratch[32];
  __shared__ op_t y_shared;
  const int64_t b = blockIdx.x;
  const op_t* pooled = static_cast<const op_t*>(a.pooled) + b * a.C;
  for (int64_t j = threadIdx.x; j < a.hidden; j += blockDim.x) {
    z1[j] = dense_dot<op_t>(a.w1, j, pooled, a.C) + dense_at<op_t>(a.b1, j, 0);
  }
  __syncthreads();
  double part = 0.0;
  for (int64_t j = threadIdx.x; j < a.hidden; j += blockDim.x) {
    const op_t r = relu(z1[j]);
    part += static_cast<double>(dense_at<op_t>(a.w2, 0, j) * r);
  }
  const double z2 = block_sum(part, scratch);
  if (threadIdx.x == 0) {
    const op_t y = kk::sigmoid(static_cast<op_t>(z2) + dense_at<op_t>(a.b2, 0, 0));
    if constexpr (kBackward) {
      y_shared = y;
    } else {
      store_one<T>(a.out, b, y);
    }
  }
  if constexpr (kBackward) {
    __syncthreads();
    const op_t y = y_shared;
    const op_t g = static_cast<op_t>(load_as_double(a.grad, a.grad_dtype, b * a.grad_s));
    const op_t dz2 = g * (op_t(1) - y) * y;  // sigmoid_backward's order: a * (1 - b) * b
    op_t* dz1 = static_cast<op_t*>(a.dz1) + b * a.hidden;
    op_t* a1 = static_cast<op_t*>(a.a1) + b * a.hidden;
    if (threadIdx.x == 0) static_cast<op_t*>(a.dz2)[b] = dz2;
    for (int64_t j = threadIdx.x; j < a.hidden; j += blockDim.x) {
      const op_t zj = z1[j];
      a1[j] = relu(zj);
      // threshold_backward: zero where relu's output is <= 0; a NaN z1 passes the gradient
      // (a product with a 0/1 mask would turn an infinite or NaN gradient into NaN)
      dz1[j] = a1[j] <= op_t(0) ? op_t(0) : dz2 * dense_at<op_t>(a.w2, 0, j);
    }
    __syncthreads();  // dz1 of this sample is read back below (global memory, same block)
    op_t* dpooled = static_cast<op_t*>(a.dpooled) + b * a.C;
    for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x) {
      op_t acc = op_t(0);
      for (int64_t j = 0; j < a.hidden; ++j) acc += dz1[j] * dense_at<op_t>(a.w1, j, c);
      dpooled[c] = acc;
    }
  }
}

struct ParamGradArgs {
  int64_t B, C, hidden;
  const void* pooled;  // op_t (B, C)
  const void* dz1;     // op_t (B, hidden)
  const void* a1;      // op_t (B, hidden)
  const void* dz2;     // op_t (B)
  WeightGrad dw1, db1, dw2, db2;
};

// Thread per parameter element, summing over the batch in order (compensated double sums):
// dw1 = dz1^T . pooled, db1 = sum dz1, dw2 = dz2^T . a1, db2 = sum dz2.
template <typename op_t>
__global__ void __launch_bounds__(kThreads) gate_param_grad_kernel(const __grid_constant__ ParamGradArgs a) {
  const int64_t n_w1 = a.hidden * a.C;
  const int64_t total = n_w1 + 2 * a.hidden + 1;
  const op_t* pooled = static_cast<const op_t*>(a.pooled);
  const op_t* dz1 = static_cast<const op_t*>(a.dz1);
  const op_t* a1 = static_cast<const op_t*>(a.a1);
  const op_t* dz2 = static_cast<const op_t*>(a.dz2);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    CompensatedSum acc;
    if (e < n_w1) {
      const int64_t j = e / a.C, c = e - (e / a.C) * a.C;
      for (int64_t b = 0; b < a.B; ++b) {
        acc.add(static_cast<double>(dz1[b * a.hidden + j]) * static_cast<double>(pooled[b * a.C + c]));
      }
      store_from_double(a.dw1.ptr, a.dw1.dtype, e, acc.value());
    } else if (e < n_w1 + a.hidden) {
      const int64_t j = e - n_w1;
      for (int64_t b = 0; b < a.B; ++b) acc.add(static_cast<double>(dz1[b * a.hidden + j]));
      store_from_double(a.db1.ptr, a.db1.dtype, j, acc.value());
    } else if (e < n_w1 + 2 * a.hidden) {
      const int64_t j = e - n_w1 - a.hidden;
      for (int64_t b = 0; b < a.B; ++b) {
        acc.add(static_cast<double>(dz2[b]) * static_cast<double>(a1[b * a.hidden + j]));
      }
      store_from_double(a.dw2.ptr, a.dw2.dtype, j, acc.value());
    } else {
      for (int64_t b = 0; b < a.B; ++b) acc.add(static_cast<double>(dz2[b]));
      store_from_double(a.db2.ptr, a.db2.dtype, 0, acc.value());
    }
  }
}

// Workspace of the gate network: the pool's split partials, then opmath buffers.
struct NetLayout {
  PoolPlan plan;
  size_t pooled = 0, dz1 = 0, a1 = 0, dz2 = 0, dpooled = 0, total = 0;
};

NetLayout net_layout(const PoolParams& p, bool backward) {
  NetLayout l;
  l.plan = make_pool_plan(p);
  const size_t op = p.dtype == DType::kDouble ? 8 : 4;
  const size_t B = static_cast<size_t>(p.shape.B), C = static_cast<size_t>(p.shape.C);
  const size_t H = static_cast<size_t>(p.hidden);
  size_t off = align256(pool_workspace(p, l.plan));
  l.pooled = plan::carve(off, std::max<size_t>(B * C, 1) * op);
  if (backward) {
    l.dz1 = plan::carve(off, std::max<size_t>(B * H, 1) * op);
    l.a1 = plan::carve(off, std::max<size_t>(B * H, 1) * op);
    l.dz2 = plan::carve(off, std::max<size_t>(B, 1) * op);
    l.dpooled = plan::carve(off, std::max<size_t>(B * C, 1) * op);
  }
  l.total = off;
  return l;
}

template <typename T>
cudaError_t run_gate_network(const PoolParams& p, void* workspace, bool backward) {
  using op_t = opmath_t<T>;
  const NetLayout l = net_layout(p, backward);
  char* ws = static_cast<char*>(workspace);
  if (ws == nullptr) return cudaErrorInvalidValue;
  const int64_t B = p.shape.B;
  // 1. pooled means in opmath
  PoolArgs pa = make_pool_args(p, l.plan);
  pa.out = nullptr;
  pa.out_opmath = ws + l.pooled;
  cudaError_t err = run_pool<T>(pa, l.plan, ws, p.stream);
  if (err != cudaSuccess) return err;
  // 2. the per-sample MLP
  const size_t smem = static_cast<size_t>(std::max<int64_t>(p.hidden, 1)) * sizeof(op_t);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;
  if (B > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  // the buffers after `out` exist (and are read) in the backward only
  const MlpArgs m{B, p.shape.C, p.hidden, p.w1, p.b1, p.w2, p.b2, ws + l.pooled, p.out, p.grad,
                  p.grad_dtype, p.grad_sb, ws + l.dz1, ws + l.a1, ws + l.dz2, ws + l.dpooled};
  const unsigned grid = static_cast<unsigned>(B);
  if (!backward) {
    if (B == 0) return cudaSuccess;
    gate_mlp_kernel<T, false><<<grid, kThreads, smem, p.stream>>>(m);
    return cudaGetLastError();
  }
  if (B > 0) {
    gate_mlp_kernel<T, true><<<grid, kThreads, smem, p.stream>>>(m);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  // 3. parameter gradients, summed over the batch in order (zero for an empty batch)
  const ParamGradArgs g{B, p.shape.C, p.hidden, ws + l.pooled, ws + l.dz1, ws + l.a1, ws + l.dz2,
                        p.dw1, p.db1, p.dw2, p.db2};
  const int64_t total = p.hidden * p.shape.C + 2 * p.hidden + 1;
  gate_param_grad_kernel<op_t><<<grid_for(ceil_div(total, kThreads)), kThreads, 0, p.stream>>>(g);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  // 4. dx = dpooled / count over x's layout
  PoolParams bp = p;
  bp.grad = ws + l.dpooled;
  bp.grad_dtype = p.dtype == DType::kDouble ? DType::kDouble : DType::kFloat;
  bp.grad_sb = p.shape.C;
  bp.grad_sc = 1;
  return run_pool_backward(bp);
}

}  // namespace

// ---------------------------------------------------------------- launchers
size_t pool_workspace_bytes(const PoolParams& p, PoolOp op) {
  if (op == PoolOp::kPool) return pool_workspace(p, make_pool_plan(p));
  if (op == PoolOp::kPoolBackward) return 0;
  return net_layout(p, op == PoolOp::kNetworkBackward).total;
}

cudaError_t launch_pool(const PoolParams& p, PoolOp op, void* workspace) {
  if (op == PoolOp::kPoolBackward) return run_pool_backward(p);
  return dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (op != PoolOp::kPool) return run_gate_network<T>(p, workspace, op == PoolOp::kNetworkBackward);
    const PoolPlan plan = make_pool_plan(p);
    return run_pool<T>(make_pool_args(p, plan), plan, workspace, p.stream);
  });
}

}  // namespace kk::cuda
