// CPU implementations of the blend family: ADD, GATE, MULTIPLY, STE, the valve multiplier
// and the gate's effective alpha, forward and backward. Each forward is one TensorIterator
// pass; each backward is one pass writing every feature gradient plus per-sample partial
// sums for alpha/gate, finished on the host by a fixed-order reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/native/cpu/Loops.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

#include "cpu/blend_kernels.h"
#include "cpu/cpu_ops.h"
#include "cpu/weights.h"
#include "ops/checks.h"
#include "ops/operands.h"

namespace kk::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Calls f.template operator()<T, S>() for the supported (host, seed) dtype pairs.
template <typename F>
void dispatch_pair(at::ScalarType host, at::ScalarType seed, const char* name, F&& f) {
  const bool float_seed = seed == at::kFloat;
  switch (host) {
    case at::kDouble:
      return f.template operator()<double, double>();
    case at::kFloat:
      return f.template operator()<float, float>();
    case at::kBFloat16:
      if (float_seed) return f.template operator()<c10::BFloat16, float>();
      return f.template operator()<c10::BFloat16, c10::BFloat16>();
    case at::kHalf:
      if (float_seed) return f.template operator()<c10::Half, float>();
      return f.template operator()<c10::Half, c10::Half>();
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", host,
                  " (expected float32, float64, bfloat16 or float16)");
  }
}

// Calls f.template operator()<a, b>().
template <typename F>
void with_flags(bool a, bool b, F&& f) {
  if (a) {
    b ? f.template operator()<true, true>() : f.template operator()<true, false>();
  } else {
    b ? f.template operator()<false, true>() : f.template operator()<false, false>();
  }
}

// The reference's weight math on one value (exact in double) or on a whole weight tensor (the
// reference's own ATen ops), so that each weight recipe below is written once for both.
double clamped01(double v) { return clamp01(v); }
at::Tensor clamped01(const at::Tensor& t) { return t.clamp(0, 1); }
double cast_to(at::ScalarType dtype, double v) { return round_to(dtype, v); }
at::Tensor cast_to(at::ScalarType dtype, const at::Tensor& t) { return t.to(dtype); }
// d where torch.clamp(x, 0, 1) passes x's gradient, 0 elsewhere
template <typename D>
D clamp01_grad(double x, D d) {
  return clamp01_passes_grad(x) ? d : D(0);
}

// A blend weight after the reference's casts and clamps, broadcastable to the features. One
// value, or one per sample, is `values`, which the kernels' raw loops read; a weight of any
// other shape is `tensor`, made by ATen in vectorized passes (value by value on the host, a
// weight as large as the features would cost several times the blend).
struct Weights {
  std::vector<int64_t> shape;
  std::vector<double> values;
  at::Tensor tensor;  // the other shapes, instead of values
};

// Whether a weight of `shape` is one value, or one per sample of features of `features` sizes.
bool small_weight(at::IntArrayRef shape, at::IntArrayRef features) {
  const int64_t n = c10::multiply_integers(shape);
  return n == 1 || (shape.size() == features.size() && !shape.empty() && shape[0] == features[0] &&
                    n == shape[0]);
}

// f (the reference's clamps and casts) of every element of w
template <typename F>
Weights map_weights(Weights w, F&& f) {
  if (w.tensor.defined()) {
    w.tensor = f(w.tensor);
  } else {
    for (double& v : w.values) v = f(v);
  }
  return w;
}

// alpha as a weight over `features`, through the op's recipe
template <typename Recipe>
Weights make_weights(const at::Tensor& alpha, const at::Tensor& features, Recipe&& recipe) {
  Weights w{alpha.sizes().vec(), {}, {}};
  if (small_weight(alpha.sizes(), features.sizes())) {
    w.values = read_values(alpha);
  } else {
    w.tensor = alpha;
  }
  return map_weights(std::move(w), recipe);
}

// A weight's gradient summed over its shape: per value for `values` weights, a float64 tensor
// of the weight's shape for `tensor` ones.
struct WeightGrad {
  std::vector<double> values;
  at::Tensor tensor;
};

// d(alpha) for a weight f(clamp01(cast(alpha))): the weight's gradient where the clamp passes
// it, in alpha's dtype and shape (a zero placeholder where it is not `needed`).
template <typename Cast>
at::Tensor clamped_weight_grad(bool needed, const WeightGrad& dw, const at::Tensor& alpha,
                               Cast&& cast) {
  if (!needed) return at::zeros(alpha.sizes(), alpha.options());
  if (dw.tensor.defined()) {  // one pass in alpha's dtype: no float64 copies of alpha or of d(alpha)
    at::Tensor da = at::empty(alpha.sizes(), alpha.options());
    at::TensorIterator iter = at::TensorIteratorConfig()
                                  .check_all_same_dtype(false)
                                  .add_output(da)
                                  .add_const_input(alpha)
                                  .add_const_input(dw.tensor)
                                  .build();
    AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, alpha.scalar_type(), "clamped_weight_grad", [&] {
      at::native::cpu_kernel(iter, [&cast](scalar_t a, double d) -> scalar_t {
        return static_cast<scalar_t>(clamp01_grad(cast(static_cast<double>(a)), d));
      });
    });
    return da;
  }
  const std::vector<double> a = read_values(alpha);
  std::vector<double> da(a.size());
  for (size_t i = 0; i < a.size(); ++i) da[i] = static_cast<double>(clamp01_grad(cast(a[i]), dw.values[i]));
  return tensor_from_values(da, alpha.sizes(), alpha.scalar_type());
}

const auto kNoCast = [](const auto& a) { return a; };

bool same_dense_layout(const std::vector<at::Tensor>& ts) {
  const at::Tensor& first = ts.front();
  if (!first.is_non_overlapping_and_dense()) return false;
  for (const at::Tensor& t : ts) {
    if (t.sizes() != first.sizes() || t.strides() != first.strides()) return false;
  }
  return true;
}

// Output bytes from which a pass streams its outputs past the cache (non-temporal stores,
// which skip reading each line before writing it): a quarter of the last-level cache, as
// glibc sets its memcpy's non-temporal threshold; at most 4 MiB, since sysconf may report a
// whole socket's (or a VM host's) L3 while one core reaches a slice of it, and outputs that
// size next to their inputs leave that slice before the next op reads them
// (docs/benchmarks.md#cpu-memory-notes). KASMINA_KERNELS_STREAM_BYTES overrides it (0 streams
// every aligned output: the tests' way onto the streaming path).
int64_t stream_threshold_bytes() {
  static const int64_t threshold = [] {
    if (const char* env = std::getenv("KASMINA_KERNELS_STREAM_BYTES")) {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end != env && v >= 0) return static_cast<int64_t>(v);
    }
    long l3 = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    const int64_t llc = l3 > 0 ? static_cast<int64_t>(l3) : (int64_t(32) << 20);
    return std::clamp<int64_t>(llc / 4, int64_t(1) << 20, int64_t(4) << 20);
  }();
  return threshold;
}

// Runs one pass of a kernel over `outputs` then `inputs` then the weight (always the last
// operand), and returns the sums of the kernel's per-element weight-gradient terms over the
// weight's shape (none when `need_sums` is false).
//
// Fast path: every operand shares one dense layout and the weight is a scalar or per-sample:
// the kernel loops run on raw pointers, sample by sample, with no TensorIterator and no
// weight tensor. Otherwise TensorIterator handles layouts and broadcasting; a weight that is
// neither scalar nor per-sample then gets per-element terms in double, summed by at::sum_to.
template <typename OpT, typename LoopFor>
WeightGrad run_pass(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& inputs,
                    const Weights& w, const at::Tensor& features, bool need_sums,
                    LoopFor&& loop_for) {
  const int64_t numel = features.numel();
  const int64_t B = features.size(0);
  const int64_t wnumel = c10::multiply_integers(w.shape);
  const bool scalar = !w.tensor.defined() && wnumel == 1;
  const bool per_sample = !scalar && !w.tensor.defined();  // (small_weight)
  const bool batch_ok = batch_outermost(outputs.front());
  const int64_t groups = scalar ? 1 : B;
  const int64_t group_size = groups == 0 ? 0 : numel / groups;
  if (numel == 0) {  // zero sums
    std::vector<double> zeros(need_sums ? wnumel : 0, 0.0);
    if (!w.tensor.defined() || zeros.empty()) return {std::move(zeros), {}};
    return {{}, at::zeros(w.shape, at::dtype(at::kDouble))};
  }

  std::vector<at::Tensor> all(outputs);
  all.insert(all.end(), inputs.begin(), inputs.end());
  int64_t out_bytes = 0;
  for (const at::Tensor& t : outputs) out_bytes += t.numel() * t.element_size();
  const bool stream = out_bytes >= stream_threshold_bytes();
  std::vector<OpT> wv(w.values.begin(), w.values.end());  // the raw loops' weight operand
  const auto weight_at = [&](int64_t b) { return reinterpret_cast<char*>(wv.data() + (scalar ? 0 : b)); };
  if ((scalar || (per_sample && batch_ok)) && same_dense_layout(all)) {
    const size_t n = all.size();  // the weight is operand n
    char* base[16];
    int64_t strides[32] = {};
    for (size_t i = 0; i < n; ++i) {
      base[i] = static_cast<char*>(all[i].data_ptr());
      strides[i] = all[i].element_size();
      strides[n + 1 + i] = group_size * strides[i];
    }
    strides[2 * n + 1] = scalar ? 0 : sizeof(OpT);
    // `rows` rows of `len` elements from `begin`, a row per sample: the weight is read with
    // stride 0 along a row and one value further per row
    const auto run_rows_from = [&](Accumulator& acc, int64_t group, int64_t begin, int64_t len,
                                   int64_t rows) {
      auto loop = loop_for(std::false_type{}, acc, stream ? kStreamAll : StreamMask{0});
      char* data[16];
      for (size_t i = 0; i < n; ++i) data[i] = base[i] + begin * strides[i];
      data[n] = weight_at(group);
      loop(data, strides, len, rows);
      if (stream) stream_fence();  // this thread's streamed stores, before the join
    };
    if (per_sample && !need_sums && group_size <= kBlock) {
      // short samples with nothing to sum, grouped as grouped_sums would group them: one loop
      // call for a task's samples
      at::parallel_for(0, groups, kBlock / group_size, [&](int64_t g0, int64_t g1) {
        Accumulator unused;
        run_rows_from(unused, g0, g0 * group_size, group_size, g1 - g0);
      });
      return {};
    }
    return {grouped_sums(groups, group_size, [&](int64_t group, int64_t begin, int64_t end) {
      Accumulator acc;
      run_rows_from(acc, group, begin, end - begin, 1);
      return acc.value();
    })};
  }

  if (scalar || per_sample) {
    // Esper's call: a channels_last host beside an NCHW seed (and seed input)
    bool converted = false;
    if (features.dim() == 4 && order_of(all.front()) != Order::kNone) {
      const auto format = order_of(all.front()) == Order::kNhwc ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous;
      for (size_t k = outputs.size(); k < all.size(); ++k) {
        if (all[k].sizes() == features.sizes() && order_of(all[k]) == Order::kNone) {
          all[k] = all[k].contiguous(format);  // e.g. an expanded gradient: one copy, then tiles
          converted = true;
        }
      }
    }
    if (converted && same_dense_layout(all)) {
      const std::vector<at::Tensor> ins(all.begin() + outputs.size(), all.end());
      return run_pass<OpT>(outputs, ins, w, features, need_sums, loop_for);
    }
    if (mixed_orders(all)) {
      auto sums = run_mixed_orders(
          all, static_cast<int>(outputs.size()), weight_at, stream,
          [&](Accumulator& acc, StreamMask mask) { return loop_for(std::false_type{}, acc, mask); });
      if (!need_sums) return {};
      if (!scalar) return {std::move(sums)};
      double total = 0.0;
      for (double v : sums) total += v;
      return {{total}};
    }
  }

  constexpr auto kOpDtype = c10::CppTypeToScalarType<OpT>::value;
  const at::Tensor wt = (w.tensor.defined() ? w.tensor.to(kOpDtype)
                                            : tensor_from_values(w.values, w.shape, kOpDtype))
                            .expand(features.sizes());
  at::TensorIteratorConfig config;
  config.check_all_same_dtype(false).resize_outputs(false).set_check_mem_overlap(true);
  for (const at::Tensor& t : outputs) config.add_output(t);
  const bool element = need_sums && !scalar && !(per_sample && batch_ok);
  at::Tensor terms;  // the per-element terms, where `element`
  if (element) {
    terms = at::empty(features.sizes(), features.options().dtype(at::kDouble));
    config.add_output(terms);
  }
  for (const at::Tensor& t : inputs) config.add_const_input(t);
  config.add_const_input(wt);
  at::TensorIterator iter = config.build();
  auto run_blocks = [&](auto element_tag, int64_t g, int64_t gs) {
    return grouped_sums(g, gs, [&](int64_t, int64_t begin, int64_t end) {
      Accumulator acc;
      auto loop = loop_for(element_tag, acc, StreamMask{0});
      iter.serial_for_each(loop, {begin, end});
      return acc.value();
    });
  };
  if (element) {
    run_blocks(std::true_type{}, 1, numel);
    if (w.tensor.defined()) return {{}, at::sum_to(terms, w.shape)};
    return {read_values(at::sum_to(terms, w.shape)), {}};
  }
  if (!need_sums) {
    run_blocks(std::false_type{}, 1, numel);
    return {};
  }
  return {run_blocks(std::false_type{}, groups, group_size)};
}

at::Tensor lerp_forward_pass(const at::Tensor& h, const at::Tensor& s_in, const Weights& w) {
  const auto host = h.scalar_type();
  const at::Tensor s = kernel_operand(s_in, host);
  at::Tensor out = at::empty_like(h);
  dispatch_pair(host, s.scalar_type(), "blend", [&]<typename T, typename S>() {
    run_pass<opmath_t<T>>({out}, {h, s}, w, h, false,
                          [](auto, Accumulator&, StreamMask st) { return lerp_forward_loop<T, S>(st); });
  });
  return out;
}

// One blend gradient pass (ADD or GATE): dh, ds and, when `need_weight_grad`, the weight
// gradient summed over the weight's shape (without it the pass reads only the gradient).
std::tuple<at::Tensor, at::Tensor, WeightGrad> lerp_backward_pass(
    const at::Tensor& grad_in, const at::Tensor& h, const at::Tensor& s_in, const Weights& w,
    bool need_weight_grad) {
  const auto host = h.scalar_type();
  const at::Tensor g = grad_in.to(host);
  const at::Tensor s = kernel_operand(s_in, host);
  at::Tensor dh = at::empty_like(h);
  at::Tensor ds = at::empty_like(s);
  WeightGrad dw;
  dispatch_pair(host, s.scalar_type(), "blend backward", [&]<typename T, typename S>() {
    if (!need_weight_grad) {
      run_pass<opmath_t<T>>({dh, ds}, {g}, w, h, false, [](auto, Accumulator& acc, StreamMask st) {
        return lerp_backward_loop<T, S, false, false>(acc, st);
      });
      return;
    }
    dw = run_pass<opmath_t<T>>({dh, ds}, {g, h, s}, w, h, true,
                                 [](auto element, Accumulator& acc, StreamMask st) {
                                   return lerp_backward_loop<T, S, decltype(element)::value>(acc, st);
                                 });
  });
  if (ds.scalar_type() != s_in.scalar_type()) ds = ds.to(s_in.scalar_type());
  return {dh, ds, std::move(dw)};
}

// GATE's effective alpha clamp01(clamp01(alpha) * clamp01(gate)) in the promoted dtype (V:
// double, one element, or at::Tensor), and its chain back to alpha and gate: through the outer
// clamp (on the rounded product), the product, and each inner clamp.
template <typename V>
V effective_alpha(const V& a, const V& g, at::ScalarType promoted) {
  return clamped01(cast_to(promoted, clamped01(a) * clamped01(g)));
}

template <typename D>
std::pair<D, D> effective_alpha_grad(double a, double g, D de, at::ScalarType promoted) {
  const double ca = clamped01(a), cg = clamped01(g);
  const D dp = clamp01_grad(cast_to(promoted, ca * cg), de);
  return {clamp01_grad(a, dp * cg), clamp01_grad(g, dp * ca)};
}

// GATE's weights over the broadcast (alpha, gate) shape
struct GateWeights {
  std::vector<int64_t> shape;
  at::ScalarType promoted;
  std::vector<double> a, g;  // a small e's: alpha's and gate's values broadcast to `shape`
  Weights e;                 // the effective alpha
};

// Over features of `features` sizes; by default (the effective alpha op) the broadcast shape
// stands for the features (one value per sample of it is small).
GateWeights gate_weights(const at::Tensor& alpha, const at::Tensor& gate,
                         at::IntArrayRef features = {}) {
  GateWeights gw;
  gw.shape = at::infer_size(alpha.sizes(), gate.sizes());
  gw.promoted = at::result_type(alpha, gate);
  gw.e.shape = gw.shape;
  if (small_weight(gw.shape, features.empty() ? at::IntArrayRef(gw.shape) : features)) {
    gw.a = read_values(alpha, gw.shape);
    gw.g = read_values(gate, gw.shape);
    for (size_t i = 0; i < gw.a.size(); ++i) {
      gw.e.values.push_back(effective_alpha(gw.a[i], gw.g[i], gw.promoted));
    }
  } else {
    gw.e.tensor = effective_alpha(alpha, gate, gw.promoted);
  }
  return gw;
}

// d(alpha) and d(gate) from d(effective alpha), each summed to its input's shape in double
// and rounded once to its dtype (a zero placeholder where no gradient is needed).
std::pair<at::Tensor, at::Tensor> gate_weights_backward(const GateWeights& gw, const WeightGrad& de,
                                                        const at::Tensor& alpha,
                                                        const at::Tensor& gate, bool need_alpha_grad,
                                                        bool need_gate_grad) {
  const auto summed = [&](const auto& d, const at::Tensor& t, bool needed) -> at::Tensor {
    if (!needed) return at::zeros(t.sizes(), t.options());
    if constexpr (std::is_same_v<std::decay_t<decltype(d)>, at::Tensor>) {
      return at::sum_to(d, t.sizes()).to(t.scalar_type());
    } else {
      if (t.sizes() == at::IntArrayRef(gw.shape)) return tensor_from_values(d, t.sizes(), t.scalar_type());
      return at::sum_to(tensor_from_values(d, gw.shape, at::kDouble), t.sizes()).to(t.scalar_type());
    }
  };
  if (de.tensor.defined()) {
    // alpha, gate and d(effective alpha) as float64, broadcast together, through the same
    // scalar code as the per-value form
    at::TensorIteratorConfig config;
    config.add_owned_output(at::Tensor()).add_owned_output(at::Tensor());
    for (const at::Tensor& t : {alpha, gate, de.tensor}) {
      // 16-bit dtypes through float32 (exact): ATen's direct conversion is several times slower
      const bool half = t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
      config.add_owned_const_input((half ? t.to(at::kFloat) : t).to(at::kDouble));
    }
    at::TensorIterator iter = config.build();
    at::native::cpu_kernel_multiple_outputs(iter, [promoted = gw.promoted](double a, double g, double d) {
      const auto [da, dg] = effective_alpha_grad(a, g, d, promoted);
      return std::make_tuple(da, dg);
    });
    return {summed(iter.output(0), alpha, need_alpha_grad), summed(iter.output(1), gate, need_gate_grad)};
  }
  std::vector<double> da(de.values.size()), dg(de.values.size());
  for (size_t i = 0; i < de.values.size(); ++i) {
    const auto [a_term, g_term] =
        effective_alpha_grad(gw.a[i], gw.g[i], de.values[i], gw.promoted);
    da[i] = static_cast<double>(a_term);
    dg[i] = static_cast<double>(g_term);
  }
  return {summed(da, alpha, need_alpha_grad), summed(dg, gate, need_gate_grad)};
}

}  // namespace

// ---------------------------------------------------------------- ADD
namespace {
// w = clamp01(alpha) cast to h's dtype
auto add_weight(at::ScalarType host) {
  return [host](const auto& a) { return cast_to(host, clamped01(a)); };
}
}  // namespace

at::Tensor blend_add(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha) {
  check_blend("blend_add", h, s, alpha);
  return lerp_forward_pass(h, s, make_weights(alpha, h, add_weight(h.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_add_backward(const at::Tensor& grad,
                                                                 const at::Tensor& h,
                                                                 const at::Tensor& s,
                                                                 const at::Tensor& alpha,
                                                                 bool need_alpha_grad) {
  check_blend("blend_add_backward", h, s, alpha);
  auto [dh, ds, dw] = lerp_backward_pass(grad, h, s, make_weights(alpha, h, add_weight(h.scalar_type())),
                                         need_alpha_grad);
  return {dh, ds, clamped_weight_grad(need_alpha_grad, dw, alpha, kNoCast)};
}

// ---------------------------------------------------------------- GATE
namespace {
Weights gate_lerp_weights(const GateWeights& gw, at::ScalarType host) {
  return map_weights(gw.e, [host](const auto& e) { return cast_to(host, e); });
}
}  // namespace

at::Tensor blend_gate(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                      const at::Tensor& gate) {
  check_blend("blend_gate", h, s, alpha);
  check_weight("blend_gate", "gate", gate, h);
  return lerp_forward_pass(h, s, gate_lerp_weights(gate_weights(alpha, gate, h.sizes()), h.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_gate_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const at::Tensor& gate, bool need_alpha_grad, bool need_gate_grad) {
  check_blend("blend_gate_backward", h, s, alpha);
  check_weight("blend_gate_backward", "gate", gate, h);
  const GateWeights gw = gate_weights(alpha, gate, h.sizes());
  auto [dh, ds, de] = lerp_backward_pass(grad, h, s, gate_lerp_weights(gw, h.scalar_type()),
                                         need_alpha_grad || need_gate_grad);
  auto [dalpha, dgate] = gate_weights_backward(gw, de, alpha, gate, need_alpha_grad, need_gate_grad);
  return {dh, ds, dalpha, dgate};
}

// ---------------------------------------------------------------- MULTIPLY
namespace {
// c = clamp01(alpha.to(h.dtype))
auto multiply_weight(at::ScalarType host) {
  return [host](const auto& a) { return clamped01(cast_to(host, a)); };
}

void check_multiply(const char* op, const at::Tensor& h, const at::Tensor& s,
                    const at::Tensor& alpha, const std::optional<at::Tensor>& seed_input) {
  check_blend(op, h, s, alpha);
  if (seed_input.has_value()) {
    check_features(op, "seed_input", *seed_input);
    check_same_shape(op, h, "seed_input", *seed_input);
  }
}

// The value, and with `keep_tanh` on a float32 host the complement of the tanh of s - r
// (tanh_with_grad's) in the value's layout (otherwise undefined).
std::tuple<at::Tensor, at::Tensor> multiply_forward(const char* op, const at::Tensor& h,
                                                    const at::Tensor& s_in, const at::Tensor& alpha,
                                                    const std::optional<at::Tensor>& seed_input,
                                                    bool keep_tanh) {
  check_multiply(op, h, s_in, alpha, seed_input);
  const auto host = h.scalar_type();
  const at::Tensor s = kernel_operand(s_in, host);
  const Weights c = make_weights(alpha, h, multiply_weight(host));
  at::Tensor out = at::empty_like(h);
  keep_tanh = keep_tanh && host == at::kFloat;
  at::Tensor t;  // undefined where none is kept
  std::vector<at::Tensor> outputs{out}, inputs{h, s};  // without r, h is read as r
  if (keep_tanh) outputs.push_back(t = at::empty_like(h));
  if (seed_input.has_value()) inputs.push_back(seed_input->to(s.scalar_type()));
  dispatch_pair(host, s.scalar_type(), op, [&]<typename T, typename S>() {
    with_flags(!seed_input.has_value(), keep_tanh, [&]<bool kRIsH, bool kKeepFlag>() {
      constexpr bool kKeep = kKeepFlag && std::is_same_v<T, float>;
      run_pass<opmath_t<T>>(outputs, inputs, c, h, false, [](auto, Accumulator&, StreamMask st) {
        return multiply_forward_loop<T, S, kRIsH, kKeep>(st);
      });
    });
  });
  return {out, t};
}
}  // namespace

at::Tensor blend_multiply(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                          const std::optional<at::Tensor>& seed_input) {
  return std::get<0>(multiply_forward("blend_multiply", h, s, alpha, seed_input, false));
}

std::tuple<at::Tensor, at::Tensor> blend_multiply_for_backward(
    const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const std::optional<at::Tensor>& seed_input) {
  auto [out, t] = multiply_forward("blend_multiply_for_backward", h, s, alpha, seed_input, true);
  return {out, t.defined() ? t : at::empty({0}, h.options())};  // the schema's placeholder
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_multiply_backward(
    const at::Tensor& grad_in, const at::Tensor& h, const at::Tensor& s_in,
    const at::Tensor& alpha, const std::optional<at::Tensor>& seed_input, bool need_alpha_grad,
    bool need_seed_input_grad, const std::optional<at::Tensor>& tanh_complement) {
  check_multiply("blend_multiply_backward", h, s_in, alpha, seed_input);
  const auto host = h.scalar_type();
  const at::Tensor g = grad_in.to(host);
  const at::Tensor s = kernel_operand(s_in, host);
  const Weights c = make_weights(alpha, h, multiply_weight(host));
  const bool r_is_h = !seed_input.has_value();
  const at::Tensor r = r_is_h ? at::Tensor() : seed_input->to(s.scalar_type());
  at::Tensor dh = at::empty_like(h);
  at::Tensor ds = at::empty_like(s);
  const bool write_dr = !r_is_h && need_seed_input_grad;
  at::Tensor dr = write_dr ? at::empty_like(r) : at::empty({0}, h.options());
  WeightGrad dc;
  const bool kept = tanh_complement.has_value() && tanh_complement->numel() > 0;
  TORCH_CHECK(!kept || (tanh_complement->sizes() == h.sizes() &&
                        tanh_complement->scalar_type() == at::kFloat && host == at::kFloat),
              "blend_multiply_backward: tanh_complement must be blend_multiply_for_backward's (a "
              "float32 tensor of h's shape, for a float32 h; h is ", host, " of shape ", h.sizes(),
              "), got ", tanh_complement->scalar_type(), " of shape ", tanh_complement->sizes());
  // the forward's tanh, where it kept it and alpha's gradient is not wanted: s and r are not
  // read
  std::vector<at::Tensor> outputs{dh, ds};
  if (write_dr) outputs.push_back(dr);
  if (kept && !need_alpha_grad) {
    with_flags(r_is_h, write_dr, [&]<bool kRIsH, bool kDrFlag>() {
      constexpr bool kDr = kDrFlag && !kRIsH;  // (r is h: no dr)
      run_pass<float>(outputs, {g, h, *tanh_complement}, c, h, false,
                      [](auto, Accumulator&, StreamMask st) {
                        return multiply_backward_from_tanh_loop<kRIsH, kDr>(st);
                      });
    });
  } else {
    std::vector<at::Tensor> inputs{g, h, s};
    if (!r_is_h) inputs.push_back(r);
    const Terms terms = alpha_terms(need_alpha_grad, h.numel(), alpha);
    dispatch_pair(host, s.scalar_type(), "blend_multiply backward", [&]<typename T, typename S>() {
      with_flags(r_is_h, write_dr, [&]<bool kRIsH, bool kDrFlag>() {
        constexpr bool kDr = kDrFlag && !kRIsH;
        dc = run_pass<opmath_t<T>>(
            outputs, inputs, c, h, need_alpha_grad,
            [terms](auto element, Accumulator& acc, StreamMask st) {
              return multiply_backward_loop<T, S, kRIsH, decltype(element)::value, kDr>(acc, st, terms);
            });
      });
    });
  }
  if (ds.scalar_type() != s_in.scalar_type()) ds = ds.to(s_in.scalar_type());
  if (write_dr && dr.scalar_type() != seed_input->scalar_type()) {
    dr = dr.to(seed_input->scalar_type());
  }
  const at::Tensor dalpha =
      clamped_weight_grad(need_alpha_grad, dc, alpha,
                          [host](const auto& a) { return cast_to(host, a); });
  return {dh, ds, dalpha, dr};
}

// ---------------------------------------------------------------- STE
at::Tensor ste_forward(const at::Tensor& h, const at::Tensor& s_in) {
  check_features("ste_forward", "host", h);
  check_features("ste_forward", "seed", s_in);
  check_same_shape("ste_forward", h, "seed", s_in);
  const auto host = h.scalar_type();
  const at::Tensor s = kernel_operand(s_in, host);
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  dispatch_pair(host, s.scalar_type(), "ste_forward", [&]<typename T, typename S>() {
    if (mixed_orders({out, h, s})) {
      // Where s is finite the value is h + 0, so h and s can be read each in its own order;
      // tiles that transpose s into h's order only run where some s is not finite.
      if constexpr (kVectorizable<T>) {
        if (ste_forward_if_finite<T, S>(h.const_data_ptr<T>(), s.const_data_ptr<S>(),
                                        out.mutable_data_ptr<T>(), h.numel(),
                                        static_cast<int64_t>(out.nbytes()) >= stream_threshold_bytes())) {
          return;
        }
      }
      // out is in h's order, the majority: never moved, nothing to stream
      run_mixed_orders({out, h, s}, 1, nullptr, false,
                       [](Accumulator&, StreamMask) { return ste_forward_loop<T, S>(); });
      return;
    }
    // no weight operand: the TensorIterator handles every other layout in one pass
    auto iter = make_iter({out}, {h, s});
    iter.for_each(ste_forward_loop<T, S>(), kGrain);
  });
  return out;
}

// ---------------------------------------------------------------- valve multiplier
namespace {
template <typename F>
void dispatch_valve(at::ScalarType result, at::ScalarType m, F&& f) {
  switch (result) {
    case at::kDouble:
      return f.template operator()<double, double>();
    case at::kFloat:
      if (m == at::kBFloat16) return f.template operator()<float, c10::BFloat16>();
      if (m == at::kHalf) return f.template operator()<float, c10::Half>();
      return f.template operator()<float, float>();
    case at::kBFloat16:
      return f.template operator()<c10::BFloat16, c10::BFloat16>();
    case at::kHalf:
      return f.template operator()<c10::Half, c10::Half>();
    default:
      TORCH_CHECK(false, "multiply_valve_multiplier: unsupported dtype ", result);
  }
}

// c = clamp01(alpha) promoted to the result dtype
auto valve_weight(at::ScalarType result) {
  return [result](const auto& a) { return cast_to(result, clamped01(a)); };
}

void check_valve(const char* op, const at::Tensor& alpha, const at::Tensor& m) {
  check_features(op, "m", m);
  check_weight(op, "alpha", alpha, m);
}
}  // namespace

at::Tensor multiply_valve_multiplier(const at::Tensor& alpha, const at::Tensor& m_in) {
  check_valve("multiply_valve_multiplier", alpha, m_in);
  const auto result = at::result_type(alpha, m_in);
  const at::Tensor m = valve_operand(m_in, result);
  at::Tensor out = at::empty_like(m_in, m_in.options().dtype(result));
  const Weights c = make_weights(alpha, m, valve_weight(result));
  dispatch_valve(result, m.scalar_type(), [&]<typename U, typename M>() {
    run_pass<opmath_t<U>>({out}, {m}, c, m, false,
                          [](auto, Accumulator&, StreamMask st) { return valve_forward_loop<U, M>(st); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> multiply_valve_multiplier_backward(const at::Tensor& grad_in,
                                                                      const at::Tensor& alpha,
                                                                      const at::Tensor& m_in,
                                                                      bool need_alpha_grad) {
  check_valve("multiply_valve_multiplier_backward", alpha, m_in);
  const auto result = at::result_type(alpha, m_in);
  const at::Tensor g = grad_in.to(result);
  const at::Tensor m = valve_operand(m_in, result);
  const Weights c = make_weights(alpha, m, valve_weight(result));
  at::Tensor dm = at::empty_like(m);
  WeightGrad dc;
  const Terms terms = alpha_terms(need_alpha_grad, m.numel(), alpha);
  dispatch_valve(result, m.scalar_type(), [&]<typename U, typename M>() {
    dc = run_pass<opmath_t<U>>({dm}, {g, m}, c, m, need_alpha_grad,
                                 [terms](auto element, Accumulator& acc, StreamMask st) {
                                   return valve_backward_loop<U, M, decltype(element)::value>(acc, st, terms);
                                 });
  });
  if (dm.scalar_type() != m_in.scalar_type()) dm = dm.to(m_in.scalar_type());
  return {clamped_weight_grad(need_alpha_grad, dc, alpha, kNoCast), dm};
}

std::tuple<at::Tensor, at::Tensor> tanh_f32(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "tanh_f32: takes a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  const at::Tensor in = x.contiguous();
  at::Tensor t = at::empty_like(in), one_minus_t2 = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* tp = t.data_ptr<float>();
  float* gp = one_minus_t2.data_ptr<float>();
  const int64_t n = in.numel();
  for (int64_t i = 0; i < n; i += FVec::size()) {  // the tail through the same lanes
    const int64_t k = std::min<int64_t>(FVec::size(), n - i);
    FVec tv, gv;
    tanh_with_grad(FVec::loadu(src + i, k), tv, gv);
    tv.store(tp + i, k);
    gv.store(gp + i, k);
  }
  return {t, one_minus_t2};
}

// ---------------------------------------------------------------- gate effective alpha

at::Tensor gate_effective_alpha(const at::Tensor& alpha, const at::Tensor& gate) {
  TORCH_CHECK(alpha.is_floating_point() || gate.is_floating_point(),
              "gate_effective_alpha: alpha or gate must be a floating-point tensor");
  const GateWeights gw = gate_weights(alpha, gate);
  if (gw.e.tensor.defined()) return gw.e.tensor;
  return tensor_from_values(gw.e.values, gw.shape, gw.promoted);
}

std::tuple<at::Tensor, at::Tensor> gate_effective_alpha_backward(const at::Tensor& grad,
                                                                 const at::Tensor& alpha,
                                                                 const at::Tensor& gate,
                                                                 bool need_alpha_grad,
                                                                 bool need_gate_grad) {
  const GateWeights gw = gate_weights(alpha, gate);
  WeightGrad de;
  if (gw.e.tensor.defined()) {
    de.tensor = grad.to(at::kDouble);
  } else {
    de.values = read_values(grad, gw.shape);
  }
  return gate_weights_backward(gw, de, alpha, gate, need_alpha_grad, need_gate_grad);
}

}  // namespace CPU_CAPABILITY
}  // namespace kk::cpu
