// The torch glue of the CUDA kernels: tensors -> the parameter structs of kk_cuda.h, and the
// CUDA registrations of every kasmina op, mirroring the CPU implementations (same checks,
// signatures, allocation and casts). Everything runs on the features' device's current stream
// and nothing waits for the device, except a weight gradient for a 0-dim CPU alpha (or gate),
// which comes back as a CPU tensor.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_ops.h"
#include "kk_cuda.h"
#include "ops/checks.h"
#include "ops/operands.h"

namespace kk::cuda {
namespace {

using plan::Shape;

Shape shape_of(at::IntArrayRef r) { return Shape(r.begin(), r.end()); }

DType to_dtype(at::ScalarType t) {
  static constexpr std::pair<at::ScalarType, DType> kTable[] = {
      {at::kFloat, DType::kFloat}, {at::kDouble, DType::kDouble}, {at::kBFloat16, DType::kBFloat16},
      {at::kHalf, DType::kHalf},   {at::kByte, DType::kUInt8},    {at::kChar, DType::kInt8},
      {at::kShort, DType::kInt16}, {at::kInt, DType::kInt32},     {at::kLong, DType::kInt64},
      {at::kBool, DType::kBool}};
  for (const auto& [from, to] : kTable) {
    if (from == t) return to;
  }
  TORCH_CHECK(false, "kasmina CUDA kernels: unsupported dtype ", t);
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// Scratch memory from the caching allocator (no sync; stream-ordered reuse after it dies);
// a null pointer for zero bytes.
template <typename Launch>
void launch_with_workspace(size_t bytes, const at::Tensor& like, Launch&& launch) {
  const at::Tensor ws =
      bytes > 0 ? at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte)) : at::Tensor();
  C10_CUDA_CHECK(launch(bytes > 0 ? ws.data_ptr() : nullptr));
}

void check_cuda_features(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// grad's device and dtype; its shape is checked by the caller.
void check_grad_tensor(const char* op, const at::Tensor& grad, const at::Tensor& like) {
  TORCH_CHECK(grad.device() == like.device(), op, ": grad is on ", grad.device(),
              " but the features are on ", like.device());
  TORCH_CHECK(is_supported_float(grad.scalar_type()), op, ": grad must be a float tensor, got ",
              grad.scalar_type());
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& like) {
  TORCH_CHECK(grad.sizes() == like.sizes(), op, ": grad shape ", grad.sizes(),
              " differs from the output shape ", like.sizes());
  check_grad_tensor(op, grad, like);
}

// ---------------------------------------------------------------- weights
// A weight read on the device in its own dtype and strides, mapped over W (it broadcasts to
// W); a 0-dim CPU tensor is read here, on the host (a CPU read, not a device sync).
WeightSource weight_source(const at::Tensor& w, const Shape& W) {
  WeightSource src;
  src.dtype = to_dtype(w.scalar_type());
  if (w.is_cpu()) {
    TORCH_CHECK(w.dim() == 0, "kasmina CUDA kernels: only a 0-dim weight may live on the CPU");
    src.host_value = w.item<double>();
    return src;
  }
  src.ptr = w.const_data_ptr();
  const at::Tensor e = w.sizes() == at::IntArrayRef(W) ? w : w.expand(W);
  TORCH_CHECK(plan::make_map(W, shape_of(e.strides()), src.map),
              "kasmina CUDA kernels: weight of shape ", w.sizes(), " has more than ", kMaxDims,
              " non-collapsible dims");
  return src;
}

Shape gate_w(const at::Tensor& alpha, const at::Tensor& gate) {
  return shape_of(at::infer_size(alpha.sizes(), gate.sizes()));
}

// alpha (and gate: both mapped over their broadcast W, with their promoted dtype) into p;
// returns W.
template <typename P>
Shape set_weights(P& p, const at::Tensor& alpha, const at::Tensor* gate) {
  const Shape W = gate != nullptr ? gate_w(alpha, *gate) : shape_of(alpha.sizes());
  p.alpha = weight_source(alpha, W);
  if (gate != nullptr) {
    p.gate = weight_source(*gate, W);
    p.promoted = to_dtype(at::result_type(alpha, *gate));
  }
  return W;
}

// A contiguous gradient of `w`'s shape and dtype on `like`'s device, and its kernel view;
// with `W`, summed from W onto `w`'s shape (GATE).
WeightGrad weight_grad(at::Tensor& buffer, const at::Tensor& w, const at::Tensor& like,
                       const Shape* W = nullptr) {
  buffer = at::empty(w.sizes(), like.options().dtype(w.scalar_type()));
  WeightGrad g;
  g.ptr = buffer.data_ptr();
  g.dtype = to_dtype(buffer.scalar_type());
  g.numel = buffer.numel();
  if (W != nullptr) {
    std::vector<int> order;
    for (int d = 0; d < static_cast<int>(W->size()); ++d) {
      if ((*W)[d] != 1) order.push_back(d);
    }
    TORCH_CHECK(plan::make_reduce_map(*W, order, plan::align_shape(shape_of(w.sizes()), W->size()),
                                      g.from_w),
                "kasmina CUDA kernels: weight shape ", at::IntArrayRef(*W), " has more than ",
                kMaxDims, " non-collapsible dims");
  }
  return g;
}

// The gradient returned for `w`: the buffer (moved to the CPU for a CPU `w`); zeros when no
// buffer was filled, or on `w`'s own device when nobody asked for it, so that a CPU `w` costs
// no device-to-host copy (no host sync).
at::Tensor finish_weight_grad(const at::Tensor& buffer, const at::Tensor& w, bool needed) {
  if (!buffer.defined()) return at::zeros(w.sizes(), w.options());
  if (!w.is_cpu()) return buffer;
  return needed ? buffer.to(at::kCPU) : at::zeros(w.sizes(), w.options());
}

// Wires the weight gradients of a blend backward into p: alpha's, and gate's (summed from W)
// when `gate` is given, all of them when any one is wanted.
void want_weight_grads(BlendParams& p, const Shape& W, const at::Tensor& alpha, const at::Tensor* gate,
                       bool needed, const at::Tensor& like, at::Tensor& da, at::Tensor& dg) {
  p.need_weight_grad = needed;
  if (!needed) return;
  p.dalpha = weight_grad(da, alpha, like, gate != nullptr ? &W : nullptr);
  if (gate != nullptr) p.dgate = weight_grad(dg, *gate, like, &W);
}

// ---------------------------------------------------------------- blend launches
// Fills the operand part of p (outputs first; the first output is dense) and returns the
// iteration order, or nothing when the operands need more than kMaxDims dims.
std::optional<std::vector<int>> set_operands(BlendParams& p, const std::vector<at::Tensor>& ops,
                                             size_t nouts) {
  TORCH_INTERNAL_ASSERT(!ops.empty() && ops.size() <= static_cast<size_t>(kMaxOperands));
  const Shape sizes = shape_of(ops[0].sizes());
  std::vector<Shape> strides;
  for (const at::Tensor& t : ops) strides.push_back(shape_of(t.strides()));
  const plan::Iteration it = plan::plan_iteration(sizes, strides);
  if (it.dims.sizes.size() > static_cast<size_t>(kMaxDims)) return std::nullopt;
  p.numel = plan::numel(sizes);
  p.noperands = static_cast<int32_t>(ops.size());
  TORCH_INTERNAL_ASSERT(plan::fill_map(it.dims.sizes, Shape(it.dims.sizes.size(), 0), p.iter));
  for (size_t k = 0; k < ops.size(); ++k) {
    p.data[k] = k < nouts ? ops[k].mutable_data_ptr() : const_cast<void*>(ops[k].const_data_ptr());
    for (size_t d = 0; d < it.dims.sizes.size(); ++d) p.stride[k][d] = it.dims.strides[k][d];
  }
  p.linear = it.linear;
  return it.order;
}

// Runs one blend launch: fills the iteration and the weight index over W (right-aligned to
// the features' rank), falls back to contiguous temporaries in the rare case of more than
// kMaxDims non-collapsible dims, allocates the backward's workspace.
void run_blend(BlendParams p, const std::vector<at::Tensor>& outs, std::vector<at::Tensor> ins,
               const Shape& W, bool backward) {
  std::vector<at::Tensor> all(outs);
  all.insert(all.end(), ins.begin(), ins.end());
  std::optional<std::vector<int>> order = set_operands(p, all, outs.size());
  std::vector<at::Tensor> tmp;
  if (!order) {
    for (const at::Tensor& o : outs) tmp.push_back(at::empty(o.sizes(), o.options()));
    for (at::Tensor& t : ins) t = t.contiguous();
    all = tmp;
    all.insert(all.end(), ins.begin(), ins.end());
    order = set_operands(p, all, outs.size());
    TORCH_INTERNAL_ASSERT(order.has_value());
  }
  const Shape fsizes = shape_of(outs[0].sizes());
  const Shape w_aligned = plan::align_shape(W, fsizes.size());
  TORCH_CHECK(plan::make_weight_index(fsizes, *order, w_aligned, p.widx),
              "kasmina CUDA kernels: a weight of shape ", at::IntArrayRef(W),
              " broadcasts over features of shape ", at::IntArrayRef(fsizes), " in more than ", kMaxDims, " separate runs");
  p.weight_numel = plan::numel(W);
  if (p.op != BlendOp::kValve) {
    std::vector<Shape> strides;
    for (const at::Tensor& t : all) strides.push_back(shape_of(t.strides()));
    plan::make_tile(fsizes, strides, p.widx, p.tile);
  }
  if (backward && p.need_weight_grad && p.widx.form == WeightForm::kGeneral && p.numel > 0) {
    TORCH_CHECK(plan::make_reduce_map(fsizes, *order, w_aligned, p.general_reduce),
                "kasmina CUDA kernels: weight of shape ", at::IntArrayRef(W), " needs more than ", kMaxDims,
                " dims to reduce");
  }
  p.stream = current_stream();
  launch_with_workspace(blend_workspace_bytes(p, backward), outs[0],
                        [&](void* ws) { return launch_blend(p, backward, ws); });
  for (size_t k = 0; k < tmp.size(); ++k) outs[k].copy_(tmp[k]);
}

BlendParams blend_params(BlendOp op, at::ScalarType host, at::ScalarType seed) {
  BlendParams p;
  p.op = op;
  p.host = to_dtype(host);
  p.seed = to_dtype(seed);
  return p;
}

// ADD, GATE, MULTIPLY and STE forward after the op's own checks: out = op(h, s[, r]) like h,
// s (and r) read in the kernel's seed dtype.
at::Tensor blend_forward(const char* name, BlendOp op, const at::Tensor& h, const at::Tensor& s,
                         const at::Tensor* alpha, const at::Tensor* gate = nullptr,
                         const at::Tensor* r = nullptr) {
  check_cuda_features(name, "host", h);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor s_k = kernel_operand(s, h.scalar_type());
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  BlendParams p = blend_params(op, h.scalar_type(), s_k.scalar_type());
  const Shape W = alpha != nullptr ? set_weights(p, *alpha, gate) : Shape{};
  p.r_is_h = r == nullptr;
  std::vector<at::Tensor> ins = {h, s_k};
  if (r != nullptr) ins.push_back(r->to(s_k.scalar_type()));  // exact: read as h's dtype
  run_blend(p, {out}, ins, W, false);
  return out;
}

// ADD, GATE and MULTIPLY backward after the op's own checks: dh, ds (in s's dtype), dr (in the
// kernel's seed dtype; written whenever r is given) and the weight gradients.
struct BlendGrads {
  at::Tensor dh, ds, dr, dalpha, dgate;
};

BlendGrads blend_backward(const char* name, BlendOp op, const at::Tensor& grad, const at::Tensor& h,
                          const at::Tensor& s, const at::Tensor& alpha, const at::Tensor* gate,
                          const at::Tensor* r, bool need_alpha_grad, bool need_gate_grad) {
  check_cuda_features(name, "host", h);
  check_grad(name, grad, h);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor g = grad.to(h.scalar_type());
  const at::Tensor s_k = kernel_operand(s, h.scalar_type());
  BlendGrads out;
  out.dh = at::empty_like(h);
  out.ds = at::empty_like(s_k);
  BlendParams p = blend_params(op, h.scalar_type(), s_k.scalar_type());
  const Shape W = set_weights(p, alpha, gate);
  at::Tensor da, dg;
  want_weight_grads(p, W, alpha, gate, need_alpha_grad || need_gate_grad, h, da, dg);
  p.r_is_h = r == nullptr;
  if (r != nullptr) {
    const at::Tensor r_k = r->to(s_k.scalar_type());
    out.dr = at::empty_like(r_k);
    run_blend(p, {out.dh, out.ds, out.dr}, {g, h, s_k, r_k}, W, true);
  } else {
    run_blend(p, {out.dh, out.ds}, {g, h, s_k}, W, true);
  }
  out.ds = out.ds.to(s.scalar_type());
  out.dalpha = finish_weight_grad(da, alpha, need_alpha_grad);
  if (gate != nullptr) out.dgate = finish_weight_grad(dg, *gate, need_gate_grad);
  return out;
}

// ---------------------------------------------------------------- pooling views
// x as (B, C, H, W); a transformer's (B, T, C) as (B, C, T, 1).
PoolShape pool_shape(const at::Tensor& x, c10::string_view topology) {
  if (topology == "cnn") {
    return {x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  }
  return {x.size(0), x.size(2), x.size(1), 1, x.stride(0), x.stride(2), x.stride(1), 1};
}

// x checked, in the kernels' view.
PoolParams pool_params(const char* op, const at::Tensor& x, c10::string_view topology) {
  check_topology(x, topology);
  check_cuda_features(op, "x", x);
  check_features(op, "x", x);
  PoolParams p;
  p.dtype = to_dtype(x.scalar_type());
  p.x = x.const_data_ptr();
  p.shape = pool_shape(x, topology);
  return p;
}

// On the current stream: call it under the device guard.
void run_pool(PoolParams p, PoolOp op, const at::Tensor& like) {
  p.stream = current_stream();
  launch_with_workspace(pool_workspace_bytes(p, op), like, [&](void* ws) { return launch_pool(p, op, ws); });
}

DenseParam dense_param(const at::Tensor& t) {
  return {t.const_data_ptr(), to_dtype(t.scalar_type()), t.dim() >= 1 ? t.stride(0) : 0,
          t.dim() >= 2 ? t.stride(1) : 0};
}

// The gate network's parameters, checked, and x, in the kernels' view.
PoolParams network_params(const char* name, const at::Tensor& x, const at::Tensor& w1,
                          const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                          c10::string_view topology) {
  PoolParams p = pool_params(name, x, topology);
  const char* op = "gate_network";
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == p.shape.C, op, ": w1 must be (hidden, ", p.shape.C,
              "), got ", w1.sizes());
  p.hidden = w1.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == p.hidden, op, ": b1 must be (", p.hidden, "), got ",
              b1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == 1 && w2.size(1) == p.hidden, op,
              ": w2 must be (1, ", p.hidden, "), got ", w2.sizes());
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == 1, op, ": b2 must be (1), got ", b2.sizes());
  for (const at::Tensor* t : {&w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->device() == x.device(), op, ": parameters must be on ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(is_supported_float(t->scalar_type()), op, ": parameters must be float tensors, got ",
                t->scalar_type());
  }
  p.w1 = dense_param(w1);
  p.b1 = dense_param(b1);
  p.w2 = dense_param(w2);
  p.b2 = dense_param(b2);
  return p;
}

// The CUDA device of an (alpha, gate) pair: a 0-dim CPU operand defers to the other.
at::Device pair_device(const char* op, const at::Tensor& alpha, const at::Tensor& gate) {
  const bool a_host = alpha.is_cpu() && alpha.dim() == 0;
  const bool g_host = gate.is_cpu() && gate.dim() == 0;
  const at::Device dev = a_host ? gate.device() : alpha.device();
  TORCH_CHECK(dev.is_cuda(), op, ": expected a CUDA tensor, got alpha on ", alpha.device(),
              " and gate on ", gate.device());
  TORCH_CHECK((a_host || alpha.device() == dev) && (g_host || gate.device() == dev), op,
              ": alpha is on ", alpha.device(), " but gate is on ", gate.device(),
              " (only a 0-dim CPU scalar may differ)");
  return dev;
}

}  // namespace

// ---------------------------------------------------------------- blend ops
at::Tensor blend_add(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha) {
  check_blend("blend_add", h, s, alpha);
  return blend_forward("blend_add", BlendOp::kAdd, h, s, &alpha);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_add_backward(const at::Tensor& grad,
                                                                 const at::Tensor& h,
                                                                 const at::Tensor& s,
                                                                 const at::Tensor& alpha,
                                                                 bool need_alpha_grad) {
  check_blend("blend_add_backward", h, s, alpha);
  BlendGrads r = blend_backward("blend_add_backward", BlendOp::kAdd, grad, h, s, alpha, nullptr,
                                nullptr, need_alpha_grad, false);
  return {r.dh, r.ds, r.dalpha};
}

at::Tensor blend_gate(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                      const at::Tensor& gate) {
  check_blend("blend_gate", h, s, alpha);
  check_weight("blend_gate", "gate", gate, h);
  return blend_forward("blend_gate", BlendOp::kGate, h, s, &alpha, &gate);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_gate_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const at::Tensor& gate, bool need_alpha_grad, bool need_gate_grad) {
  check_blend("blend_gate_backward", h, s, alpha);
  check_weight("blend_gate_backward", "gate", gate, h);
  BlendGrads r = blend_backward("blend_gate_backward", BlendOp::kGate, grad, h, s, alpha, &gate,
                                nullptr, need_alpha_grad, need_gate_grad);
  return {r.dh, r.ds, r.dalpha, r.dgate};
}

namespace {
// seed_input when given, checked against the host.
const at::Tensor* seed_input_of(const char* op, const at::Tensor& h,
                                const std::optional<at::Tensor>& seed_input) {
  if (!seed_input.has_value() || !seed_input->defined()) return nullptr;
  check_features(op, "seed_input", *seed_input);
  check_same_shape(op, h, "seed_input", *seed_input);
  return &*seed_input;
}
}  // namespace

at::Tensor blend_multiply(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                          const std::optional<at::Tensor>& seed_input) {
  check_blend("blend_multiply", h, s, alpha);
  const at::Tensor* r = seed_input_of("blend_multiply", h, seed_input);
  return blend_forward("blend_multiply", BlendOp::kMultiply, h, s, &alpha, nullptr, r);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_multiply_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const std::optional<at::Tensor>& seed_input, bool need_alpha_grad,
    bool need_seed_input_grad, const std::optional<at::Tensor>& /*tanh_complement*/) {
  // the tanh is recomputed: the CUDA kernels keep none (no blend_multiply_for_backward here)
  check_blend("blend_multiply_backward", h, s, alpha);
  const at::Tensor* r = seed_input_of("blend_multiply_backward", h, seed_input);
  BlendGrads g = blend_backward("blend_multiply_backward", BlendOp::kMultiply, grad, h, s, alpha,
                                nullptr, r, need_alpha_grad, false);
  // a seed input that wants no gradient (or none given) gets the CPU kernel's empty placeholder
  g.dr = r != nullptr && need_seed_input_grad ? g.dr.to(r->scalar_type())
                                              : at::empty({0}, h.options());
  return {g.dh, g.ds, g.dalpha, g.dr};
}

at::Tensor ste_forward(const at::Tensor& h, const at::Tensor& s) {
  check_features("ste_forward", "host", h);
  check_features("ste_forward", "seed", s);
  check_same_shape("ste_forward", h, "seed", s);
  return blend_forward("ste_forward", BlendOp::kSte, h, s, nullptr);
}

// ---------------------------------------------------------------- valve multiplier
at::Tensor multiply_valve_multiplier(const at::Tensor& alpha, const at::Tensor& m) {
  check_features("multiply_valve_multiplier", "m", m);
  check_weight("multiply_valve_multiplier", "alpha", alpha, m);
  check_cuda_features("multiply_valve_multiplier", "m", m);
  const c10::cuda::CUDAGuard guard(m.device());
  const auto result = at::result_type(alpha, m);
  const at::Tensor m_k = valve_operand(m, result);
  at::Tensor out = at::empty_like(m, m.options().dtype(result));
  if (m.numel() == 0) return out;
  BlendParams p = blend_params(BlendOp::kValve, result, m_k.scalar_type());
  const Shape W = set_weights(p, alpha, nullptr);
  run_blend(p, {out}, {m_k}, W, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> multiply_valve_multiplier_backward(const at::Tensor& grad,
                                                                      const at::Tensor& alpha,
                                                                      const at::Tensor& m,
                                                                      bool need_alpha_grad) {
  check_features("multiply_valve_multiplier_backward", "m", m);
  check_weight("multiply_valve_multiplier_backward", "alpha", alpha, m);
  check_cuda_features("multiply_valve_multiplier_backward", "m", m);
  check_grad("multiply_valve_multiplier_backward", grad, m);
  const c10::cuda::CUDAGuard guard(m.device());
  const auto result = at::result_type(alpha, m);
  const at::Tensor g = grad.to(result);
  const at::Tensor m_k = valve_operand(m, result);
  at::Tensor dm = at::empty_like(m_k);
  BlendParams p = blend_params(BlendOp::kValve, result, m_k.scalar_type());
  const Shape W = set_weights(p, alpha, nullptr);
  at::Tensor da, unused;
  want_weight_grads(p, W, alpha, nullptr, need_alpha_grad, m, da, unused);
  run_blend(p, {dm}, {g, m_k}, W, true);
  return {finish_weight_grad(da, alpha, need_alpha_grad), dm.to(m.scalar_type())};
}

// ---------------------------------------------------------------- gate effective alpha
at::Tensor gate_effective_alpha(const at::Tensor& alpha, const at::Tensor& gate) {
  TORCH_CHECK(is_supported_float(gate.scalar_type()) || is_supported_float(alpha.scalar_type()),
              "gate_effective_alpha: alpha or gate must be a float tensor");
  const at::Device dev = pair_device("gate_effective_alpha", alpha, gate);
  const c10::cuda::CUDAGuard guard(dev);
  const auto promoted = at::result_type(alpha, gate);
  at::Tensor out = at::empty(gate_w(alpha, gate), at::TensorOptions().dtype(promoted).device(dev));
  if (out.numel() == 0) return out;
  GateWeightsParams p;
  set_weights(p, alpha, &gate);
  p.weight_numel = out.numel();
  p.out = out.data_ptr();
  p.stream = current_stream();
  C10_CUDA_CHECK(launch_gate_effective(p, false));
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_effective_alpha_backward(const at::Tensor& grad,
                                                                 const at::Tensor& alpha,
                                                                 const at::Tensor& gate,
                                                                 bool need_alpha_grad,
                                                                 bool need_gate_grad) {
  const at::Device dev = pair_device("gate_effective_alpha_backward", alpha, gate);
  const c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK(grad.device() == dev || (grad.dim() == 0 && grad.is_cpu()),
              "gate_effective_alpha_backward: grad is on ", grad.device(), ", expected ", dev);
  const at::Tensor like = at::empty({0}, at::TensorOptions().device(dev));
  GateWeightsParams p;
  const Shape W = set_weights(p, alpha, &gate);
  p.weight_numel = plan::numel(W);
  p.grad = weight_source(grad, W);
  at::Tensor da, dg;
  p.dalpha = weight_grad(da, alpha, like, &W);
  p.dgate = weight_grad(dg, gate, like, &W);
  p.stream = current_stream();
  C10_CUDA_CHECK(launch_gate_effective(p, true));
  return {finish_weight_grad(da, alpha, need_alpha_grad), finish_weight_grad(dg, gate, need_gate_grad)};
}

// ---------------------------------------------------------------- pooling
at::Tensor gated_pool(const at::Tensor& x, c10::string_view topology) {
  PoolParams p = pool_params("gated_pool", x, topology);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({p.shape.B, p.shape.C}, x.options());
  p.out = out.data_ptr();
  run_pool(p, PoolOp::kPool, x);
  return out;
}

at::Tensor gated_pool_backward(const at::Tensor& grad, const at::Tensor& x,
                               c10::string_view topology) {
  PoolParams p = pool_params("gated_pool_backward", x, topology);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == p.shape.B && grad.size(1) == p.shape.C,
              "gated_pool_backward: grad must be (", p.shape.B, ", ", p.shape.C, "), got ", grad.sizes());
  check_grad_tensor("gated_pool_backward", grad, x);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  p.dx = dx.data_ptr();
  p.dx_shape = pool_shape(dx, topology);
  p.grad = grad.const_data_ptr();
  p.grad_dtype = to_dtype(grad.scalar_type());
  p.grad_sb = grad.stride(0);
  p.grad_sc = grad.stride(1);
  run_pool(p, PoolOp::kPoolBackward, x);
  return dx;
}

// ---------------------------------------------------------------- gate network
at::Tensor gate_network(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  PoolParams p = network_params("gate_network", x, w1, b1, w2, b2, topology);
  const c10::cuda::CUDAGuard guard(x.device());
  const std::vector<int64_t> out_shape =
      topology == "cnn" ? std::vector<int64_t>{x.size(0), 1, 1, 1} : std::vector<int64_t>{x.size(0), 1, 1};
  at::Tensor out = at::empty(out_shape, x.options());
  if (x.size(0) == 0) return out;
  p.out = out.data_ptr();
  run_pool(p, PoolOp::kNetwork, x);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_network_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  PoolParams p = network_params("gate_network_backward", x, w1, b1, w2, b2, topology);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(grad.numel() == x.size(0), "gate_network_backward: grad must hold one value per "
              "sample (", x.size(0), "), got shape ", grad.sizes());
  check_grad_tensor("gate_network_backward", grad, x);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw1, db1, dw2, db2;
  p.dw1 = weight_grad(dw1, w1, x);
  p.db1 = weight_grad(db1, b1, x);
  p.dw2 = weight_grad(dw2, w2, x);
  p.db2 = weight_grad(db2, b2, x);
  // One value per sample, at b * stride over the only non-1 dim (grad is (B,1,...,1)).
  const at::Tensor gflat = grad.reshape({x.size(0)});
  p.grad = gflat.const_data_ptr();
  p.grad_dtype = to_dtype(gflat.scalar_type());
  p.grad_sb = gflat.dim() == 1 ? gflat.stride(0) : 1;
  p.dx = dx.data_ptr();
  p.dx_shape = pool_shape(dx, topology);
  run_pool(p, PoolOp::kNetworkBackward, x);
  return {dx, dw1, db1, dw2, db2};
}

// The CUDA implementations take exactly the CPU implementations' signatures.
#define KK_CUDA_OPS(X)                                                                       \
  X(blend_add) X(blend_add_backward) X(blend_gate) X(blend_gate_backward) X(blend_multiply)  \
  X(blend_multiply_backward) X(ste_forward) X(multiply_valve_multiplier)                     \
  X(multiply_valve_multiplier_backward) X(gate_effective_alpha)                              \
  X(gate_effective_alpha_backward) X(gated_pool) X(gated_pool_backward) X(gate_network)      \
  X(gate_network_backward)
#define KK_SAME_SIGNATURE(op) static_assert(std::is_same_v<decltype(op), cpu::sig::op>);
KK_CUDA_OPS(KK_SAME_SIGNATURE)

}  // namespace kk::cuda

TORCH_LIBRARY_IMPL(kasmina, CUDA, m) {
#define KK_REGISTER(op) m.impl(#op, &kk::cuda::op);
  KK_CUDA_OPS(KK_REGISTER)
}
