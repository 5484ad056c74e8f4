// The one binding layer of llm_kernels._C: declares every op of llm_kernels/_ops.py SCHEMAS in
// TORCH_LIBRARY(llm_kernels, ...) with the identical schema, LK_CHECKs (check.h) every precondition
// (device, dtype, contiguity, shapes) with a clear message, allocates the outputs (the one
// mutating op, cross_entropy_backward_inplace, writes into its logits instead), and runs the
// CPU twin or enqueues the CUDA kernel on the current stream. The feed-forward GEMMs run here
// through at::mm/at::addmm (cuBLAS on CUDA tensors, CPU BLAS otherwise) around the fused
// epilogue kernels. Gradients arriving from autograd may have any strides; they are made
// contiguous here (free when they already are). The attention entry points check their own
// preconditions (attention_checks.h, shared by the CPU and CUDA attention).
#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#ifdef LLM_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include "attention.h"
#include "check.h"
#include "kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

#ifdef LLM_KERNELS_WITH_CUDA
#define LK_CUDA_FN(fn) (fn)
#else
#define LK_CUDA_FN(fn) nullptr
#endif

// ---- precondition checks ----------------------------------------------------------------------

lk::DType kernel_dtype(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return lk::DType::kFloat32;
    case at::kHalf:
      return lk::DType::kFloat16;
    case at::kBFloat16:
      return lk::DType::kBFloat16;
    default:
      LK_CHECK(false, op, ": ", name, " must be float16, bfloat16 or float32, got ",
                  t.scalar_type());
  }
}

void check_device(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                  const char* ref_name) {
  LK_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all tensors must be on one device");
  LK_CHECK(t.is_cpu() || t.is_cuda(), op, ": ", name, " must be a CPU or CUDA tensor, got ",
              t.device());
}

// `t` has `ref`'s device and dtype.
void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                const char* ref_name) {
  check_device(op, name, t, ref, ref_name);
  LK_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type(),
              "; the floating tensors must share one dtype");
}

void check_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape) {
  LK_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

void check_contiguous(const char* op, const char* name, const Tensor& t) {
  LK_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides());
}

// Columns per row the kernels take: their int column index plus one loop step stays < 2^31.
constexpr int64_t kMaxCols = INT32_MAX - 65536;

// A contiguous 2D (N, C) kernel input with 1 <= C <= kMaxCols; returns its dtype.
lk::DType check_rows(const char* op, const char* name, const Tensor& t) {
  LK_CHECK(t.dim() == 2, op, ": ", name, " must be 2D (N, C), got shape ", t.sizes());
  LK_CHECK(t.size(1) >= 1 && t.size(1) <= kMaxCols, op, ": ", name, " must have 1 <= C <= ",
              kMaxCols, " columns, got shape ", t.sizes());
  LK_CHECK(t.size(0) <= INT32_MAX, op, ": ", name, " must have fewer than 2^31 rows, got ",
              t.size(0));
  LK_CHECK(t.is_cpu() || t.is_cuda(), op, ": ", name, " must be a CPU or CUDA tensor, got ",
              t.device());
  check_contiguous(op, name, t);
  return kernel_dtype(op, name, t);
}

// An optional tensor like `ref` (device, dtype), of `shape`, contiguous.
void check_optional(const char* op, const char* name, const OptTensor& t, const Tensor& ref,
                    const char* ref_name, at::IntArrayRef shape) {
  if (!t.has_value()) return;
  check_like(op, name, *t, ref, ref_name);
  check_shape(op, name, *t, shape);
  check_contiguous(op, name, *t);
}

// A float32 statistic of shape (N,) on ref's device.
void check_stat(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                int64_t rows) {
  check_device(op, name, t, ref, "the input");
  LK_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  check_shape(op, name, t, {rows});
  check_contiguous(op, name, t);
}

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

Tensor empty_absent(const Tensor& ref) { return at::empty({0}, ref.options()); }

// ---- running a kernel on the tensors' device ---------------------------------------------------

template <typename Args>
using CudaLauncher = const char* (*)(const Args&, void*);

template <typename T>
struct NonDeduced {
  using type = T;
};

// Runs `cpu(args)` for CPU tensors, or enqueues `cuda(args, stream)` on the current stream of
// `ref`'s device and checks the launch (`cuda` is nullptr in a build without CUDA).
template <typename Args>
void run(const char* op, const Tensor& ref, void (*cpu)(const Args&),
         typename NonDeduced<CudaLauncher<Args>>::type cuda, const Args& args) {
  if (ref.is_cpu()) {
    cpu(args);
    return;
  }
  LK_CHECK(cuda != nullptr, op, ": llm_kernels._C was built without CUDA kernels");
#ifdef LLM_KERNELS_WITH_CUDA
  const char* error = cuda(args, c10::cuda::getCurrentCUDAStream(ref.get_device()).stream());
  LK_CHECK(error == nullptr, op, ": CUDA kernel launch failed: ", error);
#endif
}

// ---- layer_norm / rms_norm ----------------------------------------------------------------------

Tensor4 layer_norm_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& residual, double eps, bool rms) {
  constexpr const char* op = "llm_kernels::layer_norm_forward";
  const lk::DType dtype = check_rows(op, "x", x);
  const int64_t rows = x.size(0), cols = x.size(1);
  check_optional(op, "weight", weight, x, "x", {cols});
  check_optional(op, "bias", bias, x, "x", {cols});
  check_optional(op, "residual", residual, x, "x", x.sizes());
  LK_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::OptionalDeviceGuard guard(x.device());
  const auto stats = x.options().dtype(at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor h = residual.has_value() ? at::empty_like(x) : empty_absent(x);
  Tensor mean = at::empty({rms ? 0 : rows}, stats);
  Tensor rstd = at::empty({rows}, stats);
  const lk::NormForwardArgs args{
      x.data_ptr(), ptr_or_null(residual), ptr_or_null(weight), ptr_or_null(bias),
      y.data_ptr(), residual.has_value() ? h.data_ptr() : nullptr,
      rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
      rows, cols, static_cast<float>(eps), rms, dtype};
  if (rows > 0) {
    run(op, x, lk::layer_norm_forward_cpu, LK_CUDA_FN(lk::layer_norm_forward_cuda), args);
  }
  return {y, h, mean, rstd};
}

Tensor3 layer_norm_backward(const Tensor& grad_y_in, const OptTensor& grad_h_in, const Tensor& h,
                            const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
                            const Tensor& rstd, bool rms) {
  constexpr const char* op = "llm_kernels::layer_norm_backward";
  const lk::DType dtype = check_rows(op, "h", h);
  const int64_t rows = h.size(0), cols = h.size(1);
  check_like(op, "grad_y", grad_y_in, h, "h");
  check_shape(op, "grad_y", grad_y_in, h.sizes());
  const Tensor grad_y = grad_y_in.contiguous();
  OptTensor grad_h;
  if (grad_h_in.has_value()) {
    check_like(op, "grad_h", *grad_h_in, h, "h");
    check_shape(op, "grad_h", *grad_h_in, h.sizes());
    grad_h = grad_h_in->contiguous();
  }
  check_optional(op, "weight", weight, h, "h", {cols});
  check_optional(op, "bias", bias, h, "h", {cols});
  if (!rms) check_stat(op, "mean", mean, h, rows);
  check_stat(op, "rstd", rstd, h, rows);
  const at::OptionalDeviceGuard guard(h.device());
  Tensor dx = at::empty_like(h);
  Tensor dweight = weight.has_value() ? at::empty_like(*weight) : empty_absent(h);
  Tensor dbias = bias.has_value() ? at::empty_like(*bias) : empty_absent(h);
  lk::NormBackwardArgs args{
      grad_y.data_ptr(), ptr_or_null(grad_h), h.data_ptr(), ptr_or_null(weight),
      rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
      weight.has_value() ? dweight.data_ptr() : nullptr,
      bias.has_value() ? dbias.data_ptr() : nullptr, nullptr, rows, cols, rms, dtype};
  if (rows == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  Tensor workspace;
#ifdef LLM_KERNELS_WITH_CUDA
  if (h.is_cuda()) {
    workspace = at::empty({lk::layer_norm_backward_workspace_floats(args)},
                          h.options().dtype(at::kFloat));
    args.workspace = workspace.data_ptr<float>();
  }
#endif
  run(op, h, lk::layer_norm_backward_cpu, LK_CUDA_FN(lk::layer_norm_backward_cuda), args);
  return {dx, dweight, dbias};
}

// ---- softmax ------------------------------------------------------------------------------------

Tensor softmax_forward(const Tensor& x) {
  constexpr const char* op = "llm_kernels::softmax_forward";
  const lk::DType dtype = check_rows(op, "x", x);
  const at::OptionalDeviceGuard guard(x.device());
  Tensor y = at::empty_like(x);
  const lk::SoftmaxForwardArgs args{x.data_ptr(), y.data_ptr(), x.size(0), x.size(1), dtype};
  if (x.size(0) > 0) run(op, x, lk::softmax_forward_cpu, LK_CUDA_FN(lk::softmax_forward_cuda), args);
  return y;
}

Tensor softmax_backward(const Tensor& grad_y_in, const Tensor& y) {
  constexpr const char* op = "llm_kernels::softmax_backward";
  const lk::DType dtype = check_rows(op, "y", y);
  check_like(op, "grad_y", grad_y_in, y, "y");
  check_shape(op, "grad_y", grad_y_in, y.sizes());
  const Tensor grad_y = grad_y_in.contiguous();
  const at::OptionalDeviceGuard guard(y.device());
  Tensor dx = at::empty_like(y);
  const lk::SoftmaxBackwardArgs args{grad_y.data_ptr(), y.data_ptr(), dx.data_ptr(), y.size(0),
                                     y.size(1), dtype};
  if (y.size(0) > 0) {
    run(op, y, lk::softmax_backward_cpu, LK_CUDA_FN(lk::softmax_backward_cuda), args);
  }
  return dx;
}

// ---- cross_entropy ------------------------------------------------------------------------------

void check_target(const char* op, const Tensor& target, const Tensor& logits) {
  check_device(op, "target", target, logits, "logits");
  LK_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
              target.scalar_type());
  check_shape(op, "target", target, {logits.size(0)});
  check_contiguous(op, "target", target);
}

Tensor2 cross_entropy_forward(const Tensor& logits, const Tensor& target, int64_t ignore_index) {
  constexpr const char* op = "llm_kernels::cross_entropy_forward";
  const lk::DType dtype = check_rows(op, "logits", logits);
  check_target(op, target, logits);
  const at::OptionalDeviceGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  const lk::CrossEntropyForwardArgs args{logits.data_ptr(), target.data_ptr<int64_t>(),
                                         loss.data_ptr<float>(), lse.data_ptr<float>(), rows,
                                         logits.size(1), ignore_index, dtype};
  if (rows > 0) {
    run(op, logits, lk::cross_entropy_forward_cpu, LK_CUDA_FN(lk::cross_entropy_forward_cuda),
        args);
  }
  return {loss, lse};
}

lk::DType check_cross_entropy_backward(const char* op, const Tensor& grad_loss,
                                       const Tensor& logits, const Tensor& target,
                                       const Tensor& lse) {
  const lk::DType dtype = check_rows(op, "logits", logits);
  check_target(op, target, logits);
  const int64_t rows = logits.size(0);
  check_device(op, "grad_loss", grad_loss, logits, "logits");
  LK_CHECK(grad_loss.scalar_type() == at::kFloat, op, ": grad_loss must be float32, got ",
              grad_loss.scalar_type());
  check_shape(op, "grad_loss", grad_loss, {rows});
  check_stat(op, "lse", lse, logits, rows);
  return dtype;
}

// Writes the gradient into `grad` (logits' shape and dtype, contiguous), which may be logits
// itself: both kernels read each logit once and overwrite it from the same thread (CUDA) or
// loop iteration (CPU) afterwards, and never read logits[target] or another element of the row.
void run_cross_entropy_backward(const char* op, lk::DType dtype, const Tensor& grad_loss_in,
                                const Tensor& logits, const Tensor& target, const Tensor& lse,
                                int64_t ignore_index, const Tensor& grad) {
  const Tensor grad_loss = grad_loss_in.contiguous();
  const lk::CrossEntropyBackwardArgs args{grad_loss.data_ptr<float>(), logits.data_ptr(),
                                          target.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                          grad.data_ptr(), logits.size(0), logits.size(1),
                                          ignore_index, dtype};
  if (logits.size(0) > 0) {
    run(op, logits, lk::cross_entropy_backward_cpu, LK_CUDA_FN(lk::cross_entropy_backward_cuda),
        args);
  }
}

Tensor cross_entropy_backward(const Tensor& grad_loss, const Tensor& logits,
                              const Tensor& target, const Tensor& lse, int64_t ignore_index) {
  constexpr const char* op = "llm_kernels::cross_entropy_backward";
  const lk::DType dtype = check_cross_entropy_backward(op, grad_loss, logits, target, lse);
  const at::OptionalDeviceGuard guard(logits.device());
  Tensor grad = at::empty_like(logits);
  run_cross_entropy_backward(op, dtype, grad_loss, logits, target, lse, ignore_index, grad);
  return grad;
}

// The gradient written over the logits (schema `Tensor(a!) logits`): no (N, V) allocation.
void cross_entropy_backward_inplace(const Tensor& grad_loss, Tensor& logits, const Tensor& target,
                                    const Tensor& lse, int64_t ignore_index) {
  constexpr const char* op = "llm_kernels::cross_entropy_backward_inplace";
  const lk::DType dtype = check_cross_entropy_backward(op, grad_loss, logits, target, lse);
  const at::OptionalDeviceGuard guard(logits.device());
  run_cross_entropy_backward(op, dtype, grad_loss, logits, target, lse, ignore_index, logits);
}

// ---- feed_forward / swiglu ---------------------------------------------------------------------

lk::Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "gelu") return lk::Activation::kGelu;
  if (name == "gelu_tanh") return lk::Activation::kGeluTanh;
  if (name == "relu") return lk::Activation::kRelu;
  LK_CHECK(name == "silu", op, ": activation must be gelu, gelu_tanh, relu or silu, got '",
              std::string(name), "'");
  return lk::Activation::kSilu;
}

// A 2D (out_features, in_features) nn.Linear weight like x.
void check_linear(const char* op, const char* name, const Tensor& w, const Tensor& x,
                  int64_t out_features, int64_t in_features) {
  check_like(op, name, w, x, "x");
  LK_CHECK(w.dim() == 2 && w.size(1) == in_features &&
                  (out_features < 0 || w.size(0) == out_features),
              op, ": ", name, " must have shape (", out_features < 0 ? std::string("d_out")
                                                                      : std::to_string(out_features),
              ", ", in_features, ") in nn.Linear layout, got ", w.sizes());
}

// Autocast off while alive: the feed-forward GEMMs must return the inputs' dtype, which the
// epilogue kernels read them as, also when an op is called under torch.autocast (or its
// backward runs inside an autocast region).
struct AutocastOff {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// x @ w.T (+ bias).
Tensor matmul_bias(const Tensor& x, const Tensor& w, const OptTensor& bias) {
  return (bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t())).contiguous();
}

void check_feed_forward(const char* op, const Tensor& x, const Tensor& w1, const OptTensor& b1,
                        const Tensor& w2, const OptTensor& b2) {
  check_rows(op, "x", x);
  check_linear(op, "w1", w1, x, -1, x.size(1));
  check_linear(op, "w2", w2, x, -1, w1.size(0));
  check_optional(op, "b1", b1, x, "x", {w1.size(0)});
  check_optional(op, "b2", b2, x, "x", {w2.size(0)});
}

Tensor2 feed_forward_forward(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                             const Tensor& w2, const OptTensor& b2, c10::string_view activation) {
  constexpr const char* op = "llm_kernels::feed_forward_forward";
  check_feed_forward(op, x, w1, b1, w2, b2);
  const lk::Activation act = parse_activation(op, activation);
  const AutocastOff autocast_off;
  const at::OptionalDeviceGuard guard(x.device());
  Tensor pre = matmul_bias(x, w1, b1);  // (N, d_ff)
  Tensor hidden = at::empty_like(pre);
  const lk::ActivationForwardArgs args{pre.data_ptr(), hidden.data_ptr(), pre.numel(), act,
                                       kernel_dtype(op, "x", x)};
  if (pre.numel() > 0) {
    run(op, x, lk::activation_forward_cpu, LK_CUDA_FN(lk::activation_forward_cuda), args);
  }
  return {matmul_bias(hidden, w2, b2), pre};
}

Tensor5 feed_forward_backward(const Tensor& grad_out_in, const Tensor& x, const Tensor& w1,
                              const OptTensor& b1, const Tensor& w2, const OptTensor& b2,
                              const Tensor& pre, c10::string_view activation) {
  constexpr const char* op = "llm_kernels::feed_forward_backward";
  check_feed_forward(op, x, w1, b1, w2, b2);
  const lk::Activation act = parse_activation(op, activation);
  check_like(op, "grad_out", grad_out_in, x, "x");
  check_shape(op, "grad_out", grad_out_in, {x.size(0), w2.size(0)});
  check_like(op, "pre", pre, x, "x");
  check_shape(op, "pre", pre, {x.size(0), w1.size(0)});
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor pre_c = pre.contiguous();
  const AutocastOff autocast_off;
  const at::OptionalDeviceGuard guard(x.device());
  Tensor grad_pre = at::mm(grad_out, w2).contiguous();  // (N, d_ff): d act(pre), then d pre in place
  Tensor hidden = at::empty_like(pre_c);
  const lk::ActivationBackwardArgs args{pre_c.data_ptr(), grad_pre.data_ptr(), hidden.data_ptr(),
                                        grad_pre.data_ptr(), pre_c.numel(), act,
                                        kernel_dtype(op, "x", x)};
  if (pre_c.numel() > 0) {
    run(op, x, lk::activation_backward_cpu, LK_CUDA_FN(lk::activation_backward_cuda), args);
  }
  Tensor db1 = b1.has_value() ? grad_pre.sum(0) : empty_absent(x);
  Tensor db2 = b2.has_value() ? grad_out.sum(0) : empty_absent(x);
  return {at::mm(grad_pre, w1), at::mm(grad_pre.t(), x), db1, at::mm(grad_out.t(), hidden), db2};
}

void check_swiglu(const char* op, const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                  const Tensor& w_down) {
  check_rows(op, "x", x);
  check_linear(op, "w_gate", w_gate, x, -1, x.size(1));
  check_linear(op, "w_up", w_up, x, w_gate.size(0), x.size(1));
  check_linear(op, "w_down", w_down, x, -1, w_gate.size(0));
}

Tensor3 swiglu_forward(const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                       const Tensor& w_down) {
  constexpr const char* op = "llm_kernels::swiglu_forward";
  check_swiglu(op, x, w_gate, w_up, w_down);
  const AutocastOff autocast_off;
  const at::OptionalDeviceGuard guard(x.device());
  Tensor gate = at::mm(x, w_gate.t()).contiguous();  // (N, d_ff)
  Tensor up = at::mm(x, w_up.t()).contiguous();      // (N, d_ff)
  Tensor hidden = at::empty_like(gate);
  const lk::SwigluForwardArgs args{gate.data_ptr(), up.data_ptr(), hidden.data_ptr(),
                                   gate.numel(), kernel_dtype(op, "x", x)};
  if (gate.numel() > 0) run(op, x, lk::swiglu_forward_cpu, LK_CUDA_FN(lk::swiglu_forward_cuda), args);
  return {at::mm(hidden, w_down.t()), gate, up};
}

Tensor4 swiglu_backward(const Tensor& grad_out_in, const Tensor& x, const Tensor& w_gate,
                        const Tensor& w_up, const Tensor& w_down, const Tensor& gate,
                        const Tensor& up) {
  constexpr const char* op = "llm_kernels::swiglu_backward";
  check_swiglu(op, x, w_gate, w_up, w_down);
  check_like(op, "grad_out", grad_out_in, x, "x");
  check_shape(op, "grad_out", grad_out_in, {x.size(0), w_down.size(0)});
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"gate", gate},
                                std::pair<const char*, const Tensor&>{"up", up}}) {
    check_like(op, name, t, x, "x");
    check_shape(op, name, t, {x.size(0), w_gate.size(0)});
  }
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor gate_c = gate.contiguous(), up_c = up.contiguous();
  const AutocastOff autocast_off;
  const at::OptionalDeviceGuard guard(x.device());
  Tensor grad_gate = at::mm(grad_out, w_down).contiguous();  // (N, d_ff): d hidden, then d gate in place
  Tensor grad_up = at::empty_like(grad_gate);
  Tensor hidden = at::empty_like(grad_gate);
  const lk::SwigluBackwardArgs args{gate_c.data_ptr(), up_c.data_ptr(), grad_gate.data_ptr(),
                                    hidden.data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr(),
                                    gate_c.numel(), kernel_dtype(op, "x", x)};
  if (gate_c.numel() > 0) {
    run(op, x, lk::swiglu_backward_cpu, LK_CUDA_FN(lk::swiglu_backward_cuda), args);
  }
  Tensor dx = at::mm(grad_gate, w_gate).addmm_(grad_up, w_up);
  return {dx, at::mm(grad_gate.t(), x), at::mm(grad_up.t(), x), at::mm(grad_out.t(), hidden)};
}

// ---- attention (kernels and their checks: attention_*.cpp/.cu, attention_checks.h) -----------

#ifdef LLM_KERNELS_WITH_CUDA
// attention_forward_cuda on q's device.
Tensor2 attention_forward_on_device(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const OptTensor& mask, bool causal, int64_t causal_offset,
                                    double scale) {
  const at::OptionalDeviceGuard guard(q.device());
  return attention_forward_cuda(q, k, v, mask, causal, causal_offset, scale);
}

// attention_backward_cuda on q's device.
Tensor3 attention_backward_on_device(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                     const Tensor& v, const Tensor& out, const Tensor& lse,
                                     const OptTensor& mask, bool causal, int64_t causal_offset,
                                     double scale) {
  const at::OptionalDeviceGuard guard(q.device());
  return attention_backward_cuda(grad_out, q, k, v, out, lse, mask, causal, causal_offset, scale);
}
#endif

}  // namespace

// Schemas identical to llm_kernels/_ops.py SCHEMAS (tests/test_cuda_backend.py compares them).
TORCH_LIBRARY(llm_kernels, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, "
        "int causal_offset, float scale) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor? mask, bool causal, int causal_offset, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
        "float eps, bool rms) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad_y, Tensor? grad_h, Tensor h, Tensor? weight, "
        "Tensor? bias, Tensor mean, Tensor rstd, bool rms) -> (Tensor, Tensor, Tensor)");
  m.def("softmax_forward(Tensor x) -> Tensor");
  m.def("softmax_backward(Tensor grad_y, Tensor y) -> Tensor");
  m.def("feed_forward_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
        "str activation) -> (Tensor, Tensor)");
  m.def("feed_forward_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, "
        "Tensor? b2, Tensor pre, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("swiglu_forward(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("swiglu_backward(Tensor grad_out, Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, "
        "Tensor gate, Tensor up) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cross_entropy_forward(Tensor logits, Tensor target, int ignore_index) "
        "-> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, "
        "int ignore_index) -> Tensor");
  m.def("cross_entropy_backward_inplace(Tensor grad_loss, Tensor(a!) logits, Tensor target, "
        "Tensor lse, int ignore_index) -> ()");
}

// The non-attention functions are device-generic and serve both keys: each checks that every
// tensor shares the first one's device, then runs the CPU twin or the CUDA kernel.
#define LK_IMPL_ROW_OPS(m)                                                 \
  m.impl("layer_norm_forward", &layer_norm_forward);                       \
  m.impl("layer_norm_backward", &layer_norm_backward);                     \
  m.impl("softmax_forward", &softmax_forward);                             \
  m.impl("softmax_backward", &softmax_backward);                           \
  m.impl("feed_forward_forward", &feed_forward_forward);                   \
  m.impl("feed_forward_backward", &feed_forward_backward);                 \
  m.impl("swiglu_forward", &swiglu_forward);                               \
  m.impl("swiglu_backward", &swiglu_backward);                             \
  m.impl("cross_entropy_forward", &cross_entropy_forward);                 \
  m.impl("cross_entropy_backward", &cross_entropy_backward);               \
  m.impl("cross_entropy_backward_inplace", &cross_entropy_backward_inplace)

TORCH_LIBRARY_IMPL(llm_kernels, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  LK_IMPL_ROW_OPS(m);
}

#ifdef LLM_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(llm_kernels, CUDA, m) {
  m.impl("attention_forward", &attention_forward_on_device);
  m.impl("attention_backward", &attention_backward_on_device);
  LK_IMPL_ROW_OPS(m);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "llm_kernels compiled kernels; the ops are torch.ops.llm_kernels.*";
  m.def("has_cuda", [] {
#ifdef LLM_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the extension was built with its CUDA kernels");
}
