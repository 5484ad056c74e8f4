// Raw-pointer entry points of the non-attention kernels, called by csrc/bindings.cpp after it has
// checked every precondition and allocated the outputs. No torch headers.
//
// Every tensor is contiguous and row-major; `rows` x `cols` is the 2D (N, C) view. Optional
// inputs and outputs are nullptr when absent. Statistics are float32. The CPU functions run the
// work with at::parallel_for; the CUDA launchers enqueue on `stream` (a cudaStream_t) and return
// nullptr, or the CUDA error string of a failed launch.
#pragma once

#include <cstdint>

#include "common.h"

namespace lk {

// ---- layer_norm / rms_norm -----------------------------------------------------------------

// h = x + residual (when given, stored in `h`), y = (h - mean) * rstd * weight + bias; rms:
// mean = 0 and rstd = 1 / sqrt(mean(h^2) + eps). `mean` is nullptr when rms.
struct NormForwardArgs {
  const void* x;         // (N, C)
  const void* residual;  // (N, C) or nullptr
  const void* weight;    // (C,) or nullptr
  const void* bias;      // (C,) or nullptr
  void* y;               // (N, C)
  void* h;               // (N, C), nullptr without residual
  float* mean;           // (N,), nullptr when rms
  float* rstd;           // (N,)
  int64_t rows, cols;
  float eps;
  bool rms;
  DType dtype;
};

// xhat = (h - mean) * rstd, g = grad_y * weight:
// dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) + grad_h   (rms: without the mean(g) term)
// dweight = sum_rows(grad_y * xhat), dbias = sum_rows(grad_y), reduced in a fixed order.
struct NormBackwardArgs {
  const void* grad_y;  // (N, C)
  const void* grad_h;  // (N, C) or nullptr
  const void* h;       // (N, C): the normalized input (x + residual)
  const void* weight;  // (C,) or nullptr
  const float* mean;   // (N,), nullptr when rms
  const float* rstd;   // (N,)
  void* dx;            // (N, C)
  void* dweight;       // (C,) or nullptr
  void* dbias;         // (C,) or nullptr
  float* workspace;    // CUDA only: layer_norm_backward_workspace_floats() floats
  int64_t rows, cols;
  bool rms;
  DType dtype;
};

void layer_norm_forward_cpu(const NormForwardArgs& args);
void layer_norm_backward_cpu(const NormBackwardArgs& args);
const char* layer_norm_forward_cuda(const NormForwardArgs& args, void* stream);
// Floats of scratch the CUDA backward needs for its deterministic dweight/dbias partial sums.
int64_t layer_norm_backward_workspace_floats(const NormBackwardArgs& args);
const char* layer_norm_backward_cuda(const NormBackwardArgs& args, void* stream);

// ---- softmax over rows ---------------------------------------------------------------------

// y = exp(x - max) / sum(exp(x - max)); a row of all -inf gives zeros.
struct SoftmaxForwardArgs {
  const void* x;  // (N, C)
  void* y;        // (N, C)
  int64_t rows, cols;
  DType dtype;
};

// dx = y * (grad_y - sum(grad_y * y)).
struct SoftmaxBackwardArgs {
  const void* grad_y;  // (N, C)
  const void* y;       // (N, C)
  void* dx;            // (N, C)
  int64_t rows, cols;
  DType dtype;
};

void softmax_forward_cpu(const SoftmaxForwardArgs& args);
void softmax_backward_cpu(const SoftmaxBackwardArgs& args);
const char* softmax_forward_cuda(const SoftmaxForwardArgs& args, void* stream);
const char* softmax_backward_cuda(const SoftmaxBackwardArgs& args, void* stream);

// ---- cross_entropy over (N, V) logits, chunked over V ------------------------------------------

// lse = logsumexp(logits[i]); loss = lse - logits[i, target[i]]; loss = 0 where
// target == ignore_index, NaN where the target is outside [0, V) (never read out of bounds).
struct CrossEntropyForwardArgs {
  const void* logits;     // (N, V)
  const int64_t* target;  // (N,)
  float* loss;            // (N,)
  float* lse;             // (N,)
  int64_t rows, cols;
  int64_t ignore_index;
  DType dtype;
};

// grad = grad_loss[i] * (exp(logits - lse[i]) - onehot(target[i])), in the logits dtype;
// rows with target == ignore_index get 0, rows with a target outside [0, V) get NaN.
struct CrossEntropyBackwardArgs {
  const float* grad_loss;  // (N,)
  const void* logits;      // (N, V)
  const int64_t* target;   // (N,)
  const float* lse;        // (N,)
  void* grad;              // (N, V)
  int64_t rows, cols;
  int64_t ignore_index;
  DType dtype;
};

void cross_entropy_forward_cpu(const CrossEntropyForwardArgs& args);
void cross_entropy_backward_cpu(const CrossEntropyBackwardArgs& args);
const char* cross_entropy_forward_cuda(const CrossEntropyForwardArgs& args, void* stream);
const char* cross_entropy_backward_cuda(const CrossEntropyBackwardArgs& args, void* stream);

// ---- feed-forward epilogues (elementwise over n values; the GEMMs are cuBLAS/CPU BLAS) --------

// out = act(pre).
struct ActivationForwardArgs {
  const void* pre;  // (n,)
  void* out;        // (n,)
  int64_t n;
  Activation act;
  DType dtype;
};

// out = act(pre); grad_pre = grad_out * act'(pre). grad_pre may alias grad_out.
struct ActivationBackwardArgs {
  const void* pre;       // (n,)
  const void* grad_out;  // (n,): the gradient w.r.t. act(pre)
  void* out;             // (n,)
  void* grad_pre;        // (n,)
  int64_t n;
  Activation act;
  DType dtype;
};

// out = silu(gate) * up.
struct SwigluForwardArgs {
  const void* gate;  // (n,)
  const void* up;    // (n,)
  void* out;         // (n,)
  int64_t n;
  DType dtype;
};

// out = silu(gate) * up; grad_gate = grad_out * up * silu'(gate); grad_up = grad_out * silu(gate).
// grad_gate may alias grad_out.
struct SwigluBackwardArgs {
  const void* gate;      // (n,)
  const void* up;        // (n,)
  const void* grad_out;  // (n,)
  void* out;             // (n,)
  void* grad_gate;       // (n,)
  void* grad_up;         // (n,)
  int64_t n;
  DType dtype;
};

void activation_forward_cpu(const ActivationForwardArgs& args);
void activation_backward_cpu(const ActivationBackwardArgs& args);
void swiglu_forward_cpu(const SwigluForwardArgs& args);
void swiglu_backward_cpu(const SwigluBackwardArgs& args);
const char* activation_forward_cuda(const ActivationForwardArgs& args, void* stream);
const char* activation_backward_cuda(const ActivationBackwardArgs& args, void* stream);
const char* swiglu_forward_cuda(const SwigluForwardArgs& args, void* stream);
const char* swiglu_backward_cuda(const SwigluBackwardArgs& args, void* stream);

}  // namespace lk
