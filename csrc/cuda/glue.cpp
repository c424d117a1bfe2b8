// The torch glue of the CUDA kernels: turns tensors into the parameter structs of
// kk_cuda.h and registers the CUDA implementations of every kasmina op. It mirrors the CPU
// implementations (csrc/cpu/*.cpp) call for call: the same checks (ops/checks.h), the same
// signatures (checked below against cpu/cpu_ops.h), the same output allocation (empty_like of
// the feature they follow, contiguous weight gradients), the same casts done outside the
// kernels for unusual dtype pairs. Everything runs on the current CUDA stream of the
// features' device; nothing waits for the device, except that a weight gradient for a 0-dim
// CPU alpha (or gate) must come back as a CPU tensor, which copies the finished value to the
// host.
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
#include "plan.h"

namespace kk::cuda {
namespace {

using plan::Shape;

Shape shape_of(at::IntArrayRef r) { return Shape(r.begin(), r.end()); }

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kHalf;
    case at::kByte:
      return DType::kUInt8;
    case at::kChar:
      return DType::kInt8;
    case at::kShort:
      return DType::kInt16;
    case at::kInt:
      return DType::kInt32;
    case at::kLong:
      return DType::kInt64;
    case at::kBool:
      return DType::kBool;
    default:
      TORCH_CHECK(false, "kasmina CUDA kernels: unsupported dtype ", t);
  }
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }

at::Tensor as_dtype(const at::Tensor& x, at::ScalarType t) {
  return x.scalar_type() == t ? x : x.to(t);
}

// Scratch memory on the current stream's device (the caching allocator: no sync; stream
// ordered reuse after the tensor dies).
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

void check_cuda_features(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& like) {
  TORCH_CHECK(grad.sizes() == like.sizes(), op, ": grad shape ", grad.sizes(),
              " differs from the output shape ", like.sizes());
  TORCH_CHECK(grad.device() == like.device(), op, ": grad is on ", grad.device(),
              " but the features are on ", like.device());
  TORCH_CHECK(is_supported_float(grad.scalar_type()), op, ": grad must be a float tensor, got ",
              grad.scalar_type());
}

// ---------------------------------------------------------------- weights
// A weight read on the device in its own dtype and strides, mapped over W (it broadcasts to
// W); a 0-dim CPU tensor is read here, on the host (a CPU read, not a device sync).
WeightSource weight_source(const at::Tensor& w, const Shape& W) {
  WeightSource src;
  src.dtype = to_dtype(w.scalar_type());
  if (w.is_cpu()) {
    TORCH_CHECK(w.dim() == 0, "kasmina CUDA kernels: only a 0-dim weight may live on the CPU");
    src.ptr = nullptr;
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

// A contiguous gradient of `w`'s shape and dtype on the features' device (moved to the CPU by
// finish_weight_grad when `w` lives there).
at::Tensor weight_grad_buffer(const at::Tensor& w, const at::Tensor& features) {
  return at::empty(w.sizes(), features.options().dtype(w.scalar_type()));
}

// A gradient nobody asked for (`needed` false) stays behind: zeros on `w`'s device, so a CPU
// `w` costs no device-to-host copy, i.e. no host sync.
at::Tensor finish_weight_grad(const at::Tensor& buffer, const at::Tensor& w, bool needed = true) {
  if (!w.is_cpu()) return buffer;
  return needed ? buffer.to(at::kCPU) : at::zeros(w.sizes(), w.options());
}

WeightGrad weight_grad(const at::Tensor& buffer) {
  WeightGrad g;
  g.ptr = buffer.data_ptr();
  g.dtype = to_dtype(buffer.scalar_type());
  g.numel = buffer.numel();
  return g;
}

// W (row-major, all of its dims) summed onto `w`'s shape.
ReduceMap reduce_from_w(const Shape& W, const at::Tensor& w) {
  std::vector<int> order;
  for (int d = 0; d < static_cast<int>(W.size()); ++d) {
    if (W[d] != 1) order.push_back(d);
  }
  ReduceMap rm;
  TORCH_CHECK(plan::make_reduce_map(W, order, plan::align_shape(shape_of(w.sizes()), W.size()), rm),
              "kasmina CUDA kernels: weight shape ", at::IntArrayRef(W), " has more than ", kMaxDims,
              " non-collapsible dims");
  return rm;
}

// ---------------------------------------------------------------- iteration
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
  if (backward) {
    const size_t bytes = blend_backward_workspace_bytes(p);
    const at::Tensor ws = bytes > 0 ? workspace(bytes, outs[0]) : at::Tensor();
    check_launch(launch_blend_backward(p, bytes > 0 ? ws.data_ptr() : nullptr));
  } else {
    check_launch(launch_blend_forward(p));
  }
  for (size_t k = 0; k < tmp.size(); ++k) outs[k].copy_(tmp[k]);
}

BlendParams blend_params(BlendOp op, const at::Tensor& h, const at::Tensor& s_k) {
  BlendParams p;
  p.op = op;
  p.host = to_dtype(h.scalar_type());
  p.seed = to_dtype(s_k.scalar_type());
  return p;
}

// ---------------------------------------------------------------- gate weights
struct GateShape {
  Shape W;
  at::ScalarType promoted;
};

GateShape gate_shape(const at::Tensor& alpha, const at::Tensor& gate) {
  return {shape_of(at::infer_size(alpha.sizes(), gate.sizes())), at::result_type(alpha, gate)};
}

// ---------------------------------------------------------------- pooling views

// x as (B, C, H, W); a transformer's (B, T, C) as (B, C, T, 1).
PoolShape pool_shape(const at::Tensor& x, c10::string_view topology) {
  PoolShape s;
  if (topology == "cnn") {
    s.B = x.size(0);
    s.C = x.size(1);
    s.H = x.size(2);
    s.W = x.size(3);
    s.sb = x.stride(0);
    s.sc = x.stride(1);
    s.sh = x.stride(2);
    s.sw = x.stride(3);
  } else {
    s.B = x.size(0);
    s.C = x.size(2);
    s.H = x.size(1);
    s.W = 1;
    s.sb = x.stride(0);
    s.sc = x.stride(2);
    s.sh = x.stride(1);
    s.sw = 1;
  }
  return s;
}

void check_pool_input(const char* op, const at::Tensor& x, c10::string_view topology) {
  check_topology(x, topology);
  check_cuda_features(op, "x", x);
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
}

DenseParam dense_param(const at::Tensor& t) {
  DenseParam d;
  d.ptr = t.const_data_ptr();
  d.dtype = to_dtype(t.scalar_type());
  d.s0 = t.dim() >= 1 ? t.stride(0) : 0;
  d.s1 = t.dim() >= 2 ? t.stride(1) : 0;
  return d;
}

int64_t check_gate_params(const at::Tensor& x, int64_t C, const at::Tensor& w1,
                          const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  const char* op = "gate_network";
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, op, ": w1 must be (hidden, ", C, "), got ",
              w1.sizes());
  const int64_t hidden = w1.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == hidden, op, ": b1 must be (", hidden, "), got ",
              b1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == 1 && w2.size(1) == hidden, op, ": w2 must be (1, ",
              hidden, "), got ", w2.sizes());
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == 1, op, ": b2 must be (1), got ", b2.sizes());
  for (const at::Tensor* t : {&w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->device() == x.device(), op, ": parameters must be on ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(is_supported_float(t->scalar_type()), op, ": parameters must be float tensors, got ",
                t->scalar_type());
  }
  return hidden;
}

}  // namespace

// ---------------------------------------------------------------- ADD
at::Tensor blend_add(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha) {
  check_blend("blend_add", h, s, alpha);
  check_cuda_features("blend_add", "host", h);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor s_k = kernel_operand(s, h.scalar_type());
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  const Shape W = shape_of(alpha.sizes());
  BlendParams p = blend_params(BlendOp::kAdd, h, s_k);
  p.alpha = weight_source(alpha, W);
  run_blend(p, {out}, {h, s_k}, W, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_add_backward(const at::Tensor& grad,
                                                                 const at::Tensor& h,
                                                                 const at::Tensor& s,
                                                                 const at::Tensor& alpha,
                                                                 bool need_alpha_grad) {
  check_blend("blend_add_backward", h, s, alpha);
  check_cuda_features("blend_add_backward", "host", h);
  check_grad("blend_add_backward", grad, h);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto host = h.scalar_type();
  const at::Tensor g = as_dtype(grad, host);
  const at::Tensor s_k = kernel_operand(s, host);
  at::Tensor dh = at::empty_like(h);
  at::Tensor ds = at::empty_like(s_k);
  const Shape W = shape_of(alpha.sizes());
  at::Tensor da = need_alpha_grad ? weight_grad_buffer(alpha, h) : at::Tensor();
  BlendParams p = blend_params(BlendOp::kAdd, h, s_k);
  p.alpha = weight_source(alpha, W);
  p.need_weight_grad = need_alpha_grad;
  if (need_alpha_grad) p.dalpha = weight_grad(da);
  run_blend(p, {dh, ds}, {g, h, s_k}, W, true);
  if (ds.scalar_type() != s.scalar_type()) ds = ds.to(s.scalar_type());
  at::Tensor dalpha = need_alpha_grad ? finish_weight_grad(da, alpha)
                                      : at::zeros(alpha.sizes(), alpha.options());
  return {dh, ds, dalpha};
}

// ---------------------------------------------------------------- GATE
at::Tensor blend_gate(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                      const at::Tensor& gate) {
  check_blend("blend_gate", h, s, alpha);
  check_weight("blend_gate", "gate", gate, h);
  check_cuda_features("blend_gate", "host", h);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor s_k = kernel_operand(s, h.scalar_type());
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  const GateShape gs = gate_shape(alpha, gate);
  BlendParams p = blend_params(BlendOp::kGate, h, s_k);
  p.alpha = weight_source(alpha, gs.W);
  p.gate = weight_source(gate, gs.W);
  p.promoted = to_dtype(gs.promoted);
  run_blend(p, {out}, {h, s_k}, gs.W, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_gate_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const at::Tensor& gate, bool need_alpha_grad, bool need_gate_grad) {
  const bool need_weight_grads = need_alpha_grad || need_gate_grad;
  check_blend("blend_gate_backward", h, s, alpha);
  check_weight("blend_gate_backward", "gate", gate, h);
  check_cuda_features("blend_gate_backward", "host", h);
  check_grad("blend_gate_backward", grad, h);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto host = h.scalar_type();
  const at::Tensor g = as_dtype(grad, host);
  const at::Tensor s_k = kernel_operand(s, host);
  at::Tensor dh = at::empty_like(h);
  at::Tensor ds = at::empty_like(s_k);
  const GateShape gs = gate_shape(alpha, gate);
  BlendParams p = blend_params(BlendOp::kGate, h, s_k);
  p.alpha = weight_source(alpha, gs.W);
  p.gate = weight_source(gate, gs.W);
  p.promoted = to_dtype(gs.promoted);
  p.need_weight_grad = need_weight_grads;
  at::Tensor da, dg;
  if (need_weight_grads) {
    da = weight_grad_buffer(alpha, h);
    dg = weight_grad_buffer(gate, h);
    p.dalpha = weight_grad(da);
    p.dalpha.from_w = reduce_from_w(gs.W, alpha);
    p.dgate = weight_grad(dg);
    p.dgate.from_w = reduce_from_w(gs.W, gate);
  }
  run_blend(p, {dh, ds}, {g, h, s_k}, gs.W, true);
  if (ds.scalar_type() != s.scalar_type()) ds = ds.to(s.scalar_type());
  if (!need_weight_grads) {
    return {dh, ds, at::zeros(alpha.sizes(), alpha.options()), at::zeros(gate.sizes(), gate.options())};
  }
  return {dh, ds, finish_weight_grad(da, alpha, need_alpha_grad),
          finish_weight_grad(dg, gate, need_gate_grad)};
}

// ---------------------------------------------------------------- MULTIPLY
at::Tensor blend_multiply(const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
                          const std::optional<at::Tensor>& seed_input) {
  check_blend("blend_multiply", h, s, alpha);
  const bool has_r = seed_input.has_value() && seed_input->defined();
  if (has_r) {
    check_features("blend_multiply", "seed_input", *seed_input);
    check_same_shape("blend_multiply", h, "seed_input", *seed_input);
  }
  check_cuda_features("blend_multiply", "host", h);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor s_k = kernel_operand(s, h.scalar_type());
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  const Shape W = shape_of(alpha.sizes());
  BlendParams p = blend_params(BlendOp::kMultiply, h, s_k);
  p.alpha = weight_source(alpha, W);
  p.r_is_h = !has_r;
  if (has_r) {
    const at::Tensor r = as_dtype(*seed_input, s_k.scalar_type());  // exact: read as h's dtype
    run_blend(p, {out}, {h, s_k, r}, W, false);
  } else {
    run_blend(p, {out}, {h, s_k}, W, false);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blend_multiply_backward(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, const at::Tensor& alpha,
    const std::optional<at::Tensor>& seed_input, bool need_alpha_grad,
    bool need_seed_input_grad) {
  check_blend("blend_multiply_backward", h, s, alpha);
  const bool has_r = seed_input.has_value() && seed_input->defined();
  if (has_r) {
    check_features("blend_multiply_backward", "seed_input", *seed_input);
    check_same_shape("blend_multiply_backward", h, "seed_input", *seed_input);
  }
  check_cuda_features("blend_multiply_backward", "host", h);
  check_grad("blend_multiply_backward", grad, h);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto host = h.scalar_type();
  const at::Tensor g = as_dtype(grad, host);
  const at::Tensor s_k = kernel_operand(s, host);
  const at::Tensor r = has_r ? as_dtype(*seed_input, s_k.scalar_type()) : at::Tensor();
  at::Tensor dh = at::empty_like(h);
  at::Tensor ds = at::empty_like(s_k);
  at::Tensor dr = has_r ? at::empty_like(r) : at::empty({0}, h.options());
  const Shape W = shape_of(alpha.sizes());
  at::Tensor da = need_alpha_grad ? weight_grad_buffer(alpha, h) : at::Tensor();
  BlendParams p = blend_params(BlendOp::kMultiply, h, s_k);
  p.alpha = weight_source(alpha, W);
  p.r_is_h = !has_r;
  p.need_weight_grad = need_alpha_grad;
  if (need_alpha_grad) p.dalpha = weight_grad(da);
  if (has_r) {
    run_blend(p, {dh, ds, dr}, {g, h, s_k, r}, W, true);
  } else {
    run_blend(p, {dh, ds}, {g, h, s_k}, W, true);
  }
  if (ds.scalar_type() != s.scalar_type()) ds = ds.to(s.scalar_type());
  // the CUDA pass writes dr whenever r is given; a seed input that wants no gradient gets the
  // same empty placeholder as the CPU kernel returns
  if (has_r && !need_seed_input_grad) dr = at::empty({0}, h.options());
  if (has_r && need_seed_input_grad && dr.scalar_type() != seed_input->scalar_type()) {
    dr = dr.to(seed_input->scalar_type());
  }
  at::Tensor dalpha = need_alpha_grad ? finish_weight_grad(da, alpha)
                                      : at::zeros(alpha.sizes(), alpha.options());
  return {dh, ds, dalpha, dr};
}

// ---------------------------------------------------------------- STE
at::Tensor ste_forward(const at::Tensor& h, const at::Tensor& s) {
  check_features("ste_forward", "host", h);
  check_features("ste_forward", "seed", s);
  check_same_shape("ste_forward", h, "seed", s);
  check_cuda_features("ste_forward", "host", h);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor s_k = kernel_operand(s, h.scalar_type());
  at::Tensor out = at::empty_like(h);
  if (h.numel() == 0) return out;
  BlendParams p = blend_params(BlendOp::kSte, h, s_k);
  run_blend(p, {out}, {h, s_k}, Shape{}, false);
  return out;
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
  const Shape W = shape_of(alpha.sizes());
  BlendParams p;
  p.op = BlendOp::kValve;
  p.host = to_dtype(result);
  p.seed = to_dtype(m_k.scalar_type());
  p.alpha = weight_source(alpha, W);
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
  const at::Tensor g = as_dtype(grad, result);
  const at::Tensor m_k = valve_operand(m, result);
  at::Tensor dm = at::empty_like(m_k);
  const Shape W = shape_of(alpha.sizes());
  at::Tensor da = need_alpha_grad ? weight_grad_buffer(alpha, m) : at::Tensor();
  BlendParams p;
  p.op = BlendOp::kValve;
  p.host = to_dtype(result);
  p.seed = to_dtype(m_k.scalar_type());
  p.alpha = weight_source(alpha, W);
  p.need_weight_grad = need_alpha_grad;
  if (need_alpha_grad) p.dalpha = weight_grad(da);
  run_blend(p, {dm}, {g, m_k}, W, true);
  if (dm.scalar_type() != m.scalar_type()) dm = dm.to(m.scalar_type());
  at::Tensor dalpha = need_alpha_grad ? finish_weight_grad(da, alpha)
                                      : at::zeros(alpha.sizes(), alpha.options());
  return {dalpha, dm};
}

// ---------------------------------------------------------------- gate effective alpha
namespace {
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

at::Tensor gate_effective_alpha(const at::Tensor& alpha, const at::Tensor& gate) {
  TORCH_CHECK(is_supported_float(gate.scalar_type()) || is_supported_float(alpha.scalar_type()),
              "gate_effective_alpha: alpha or gate must be a float tensor");
  const at::Device dev = pair_device("gate_effective_alpha", alpha, gate);
  const c10::cuda::CUDAGuard guard(dev);
  const GateShape gs = gate_shape(alpha, gate);
  at::Tensor out = at::empty(gs.W, at::TensorOptions().dtype(gs.promoted).device(dev));
  if (out.numel() == 0) return out;
  GateWeightsParams p;
  p.weight_numel = out.numel();
  p.alpha = weight_source(alpha, gs.W);
  p.gate = weight_source(gate, gs.W);
  p.promoted = to_dtype(gs.promoted);
  p.out = out.data_ptr();
  p.stream = current_stream();
  check_launch(launch_gate_effective_forward(p));
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_effective_alpha_backward(const at::Tensor& grad,
                                                                 const at::Tensor& alpha,
                                                                 const at::Tensor& gate,
                                                                 bool need_alpha_grad,
                                                                 bool need_gate_grad) {
  const at::Device dev = pair_device("gate_effective_alpha_backward", alpha, gate);
  const c10::cuda::CUDAGuard guard(dev);
  const GateShape gs = gate_shape(alpha, gate);
  TORCH_CHECK(grad.device() == dev || (grad.dim() == 0 && grad.is_cpu()),
              "gate_effective_alpha_backward: grad is on ", grad.device(), ", expected ", dev);
  const at::Tensor like = at::empty({0}, at::TensorOptions().device(dev));
  at::Tensor da = weight_grad_buffer(alpha, like);
  at::Tensor dg = weight_grad_buffer(gate, like);
  GateWeightsParams p;
  p.weight_numel = plan::numel(gs.W);
  p.alpha = weight_source(alpha, gs.W);
  p.gate = weight_source(gate, gs.W);
  p.promoted = to_dtype(gs.promoted);
  p.grad = weight_source(grad, gs.W);
  p.dalpha = weight_grad(da);
  p.dalpha.from_w = reduce_from_w(gs.W, alpha);
  p.dgate = weight_grad(dg);
  p.dgate.from_w = reduce_from_w(gs.W, gate);
  p.stream = current_stream();
  check_launch(launch_gate_effective_backward(p));
  return {finish_weight_grad(da, alpha, need_alpha_grad), finish_weight_grad(dg, gate, need_gate_grad)};
}

// ---------------------------------------------------------------- pooling
at::Tensor gated_pool(const at::Tensor& x, c10::string_view topology) {
  check_pool_input("gated_pool", x, topology);
  const c10::cuda::CUDAGuard guard(x.device());
  PoolParams p;
  p.dtype = to_dtype(x.scalar_type());
  p.x = x.const_data_ptr();
  p.shape = pool_shape(x, topology);
  at::Tensor out = at::empty({p.shape.B, p.shape.C}, x.options());
  p.out = out.data_ptr();
  p.stream = current_stream();
  const size_t bytes = pool_forward_workspace_bytes(p);
  const at::Tensor ws = bytes > 0 ? workspace(bytes, x) : at::Tensor();
  check_launch(launch_pool_forward(p, bytes > 0 ? ws.data_ptr() : nullptr));
  return out;
}

at::Tensor gated_pool_backward(const at::Tensor& grad, const at::Tensor& x,
                               c10::string_view topology) {
  check_pool_input("gated_pool_backward", x, topology);
  const c10::cuda::CUDAGuard guard(x.device());
  const PoolShape xs = pool_shape(x, topology);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == xs.B && grad.size(1) == xs.C,
              "gated_pool_backward: grad must be (", xs.B, ", ", xs.C, "), got ", grad.sizes());
  TORCH_CHECK(grad.device() == x.device(), "gated_pool_backward: grad is on ", grad.device(),
              " but x is on ", x.device());
  TORCH_CHECK(is_supported_float(grad.scalar_type()), "gated_pool_backward: grad must be a float tensor");
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  PoolBackwardParams p;
  p.dtype = to_dtype(x.scalar_type());
  p.dx = dx.data_ptr();
  p.dx_shape = pool_shape(dx, topology);
  p.grad = grad.const_data_ptr();
  p.grad_dtype = to_dtype(grad.scalar_type());
  p.grad_sb = grad.stride(0);
  p.grad_sc = grad.stride(1);
  p.stream = current_stream();
  check_launch(launch_pool_backward(p));
  return dx;
}

// ---------------------------------------------------------------- gate network
namespace {
GateNetworkParams network_params(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& b2,
                                 c10::string_view topology) {
  GateNetworkParams p;
  p.dtype = to_dtype(x.scalar_type());
  p.x = x.const_data_ptr();
  p.shape = pool_shape(x, topology);
  p.hidden = check_gate_params(x, p.shape.C, w1, b1, w2, b2);
  p.w1 = dense_param(w1);
  p.b1 = dense_param(b1);
  p.w2 = dense_param(w2);
  p.b2 = dense_param(b2);
  p.stream = current_stream();
  return p;
}

std::vector<int64_t> gate_out_shape(const at::Tensor& x, c10::string_view topology) {
  if (topology == "cnn") return {x.size(0), 1, 1, 1};
  return {x.size(0), 1, 1};
}
}  // namespace

at::Tensor gate_network(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  check_pool_input("gate_network", x, topology);
  const c10::cuda::CUDAGuard guard(x.device());
  GateNetworkParams p = network_params(x, w1, b1, w2, b2, topology);
  at::Tensor out = at::empty(gate_out_shape(x, topology), x.options());
  if (x.size(0) == 0) return out;
  p.out = out.data_ptr();
  const at::Tensor ws = workspace(gate_network_workspace_bytes(p, false), x);
  check_launch(launch_gate_network_forward(p, ws.data_ptr()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_network_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, c10::string_view topology) {
  check_pool_input("gate_network_backward", x, topology);
  const c10::cuda::CUDAGuard guard(x.device());
  GateNetworkParams p = network_params(x, w1, b1, w2, b2, topology);
  TORCH_CHECK(grad.numel() == x.size(0), "gate_network_backward: grad must hold one value per "
              "sample (", x.size(0), "), got shape ", grad.sizes());
  TORCH_CHECK(grad.device() == x.device(), "gate_network_backward: grad is on ", grad.device(),
              " but x is on ", x.device());
  TORCH_CHECK(is_supported_float(grad.scalar_type()), "gate_network_backward: grad must be a float tensor");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw1 = at::empty(w1.sizes(), w1.options());
  at::Tensor db1 = at::empty(b1.sizes(), b1.options());
  at::Tensor dw2 = at::empty(w2.sizes(), w2.options());
  at::Tensor db2 = at::empty(b2.sizes(), b2.options());
  // One value per sample, at b * stride over the only non-1 dim (grad is (B,1,...,1)).
  const at::Tensor gflat = grad.reshape({x.size(0)});
  p.grad = gflat.const_data_ptr();
  p.grad_dtype = to_dtype(gflat.scalar_type());
  p.grad_s = gflat.dim() == 1 ? gflat.stride(0) : 1;
  p.dx = dx.data_ptr();
  p.dx_shape = pool_shape(dx, topology);
  p.dw1 = weight_grad(dw1);
  p.db1 = weight_grad(db1);
  p.dw2 = weight_grad(dw2);
  p.db2 = weight_grad(db2);
  const at::Tensor ws = workspace(gate_network_workspace_bytes(p, true), x);
  check_launch(launch_gate_network_backward(p, ws.data_ptr()));
  return {dx, dw1, db1, dw2, db2};
}

// The CUDA implementations take exactly the CPU implementations' signatures.
static_assert(std::is_same_v<decltype(blend_add), cpu::sig::blend_add>);
static_assert(std::is_same_v<decltype(blend_add_backward), cpu::sig::blend_add_backward>);
static_assert(std::is_same_v<decltype(blend_gate), cpu::sig::blend_gate>);
static_assert(std::is_same_v<decltype(blend_gate_backward), cpu::sig::blend_gate_backward>);
static_assert(std::is_same_v<decltype(blend_multiply), cpu::sig::blend_multiply>);
static_assert(std::is_same_v<decltype(blend_multiply_backward), cpu::sig::blend_multiply_backward>);
static_assert(std::is_same_v<decltype(ste_forward), cpu::sig::ste_forward>);
static_assert(std::is_same_v<decltype(multiply_valve_multiplier), cpu::sig::multiply_valve_multiplier>);
static_assert(std::is_same_v<decltype(multiply_valve_multiplier_backward),
                             cpu::sig::multiply_valve_multiplier_backward>);
static_assert(std::is_same_v<decltype(gate_effective_alpha), cpu::sig::gate_effective_alpha>);
static_assert(std::is_same_v<decltype(gate_effective_alpha_backward),
                             cpu::sig::gate_effective_alpha_backward>);
static_assert(std::is_same_v<decltype(gated_pool), cpu::sig::gated_pool>);
static_assert(std::is_same_v<decltype(gated_pool_backward), cpu::sig::gated_pool_backward>);
static_assert(std::is_same_v<decltype(gate_network), cpu::sig::gate_network>);
static_assert(std::is_same_v<decltype(gate_network_backward), cpu::sig::gate_network_backward>);

}  // namespace kk::cuda

TORCH_LIBRARY_IMPL(kasmina, CUDA, m) {
  m.impl("blend_add", &kk::cuda::blend_add);
  m.impl("blend_add_backward", &kk::cuda::blend_add_backward);
  m.impl("blend_gate", &kk::cuda::blend_gate);
  m.impl("blend_gate_backward", &kk::cuda::blend_gate_backward);
  m.impl("blend_multiply", &kk::cuda::blend_multiply);
  m.impl("blend_multiply_backward", &kk::cuda::blend_multiply_backward);
  m.impl("ste_forward", &kk::cuda::ste_forward);
  m.impl("multiply_valve_multiplier", &kk::cuda::multiply_valve_multiplier);
  m.impl("multiply_valve_multiplier_backward", &kk::cuda::multiply_valve_multiplier_backward);
  m.impl("gate_effective_alpha", &kk::cuda::gate_effective_alpha);
  m.impl("gate_effective_alpha_backward", &kk::cuda::gate_effective_alpha_backward);
  m.impl("gated_pool", &kk::cuda::gated_pool);
  m.impl("gated_pool_backward", &kk::cuda::gated_pool_backward);
  m.impl("gate_network", &kk::cuda::gate_network);
  m.impl("gate_network_backward", &kk::cuda::gate_network_backward);
}
