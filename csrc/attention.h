// Attention ops (FlashAttention-2 algorithm) as seen by the binding layer (csrc/bindings.cpp).
// q (B, H, Lq, D), k/v (B, Hkv, Lk, D) with stride(-1) == 1; mask: optional additive float
// (B, H, Lq, Lk) with any strides (0 on broadcast dims); query i sees key j iff
// j <= i + causal_offset when causal. Returns out (B, H, Lq, D) contiguous in q's dtype and
// lse (B, H, Lq) float32; the backward returns dq, dk, dv shaped like q, k, v.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, bool causal, int64_t causal_offset, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    bool causal, int64_t causal_offset, double scale);

#ifdef LLM_KERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, bool causal, int64_t causal_offset, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    bool causal, int64_t causal_offset, double scale);
#endif
