// Preconditions of the attention ops, shared by the CPU (attention_cpu.cpp) and CUDA
// (attention_cuda.cu) entry points. Host code only: every check runs before any kernel.
#pragma once

#include <cmath>
#include <optional>

#include <ATen/core/Tensor.h>

#include "check.h"

namespace lk::attn {

constexpr int64_t kMaxHeadDim = 256;

// Sizes of one attention call: q (B, H, Lq, D), k/v (B, Hkv, Lk, D).
struct Sizes {
  int64_t batch, heads, kv_heads, q_len, k_len, head_dim;
};

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_on(const char* op, const char* name, const at::Tensor& t,
                     at::DeviceType device) {
  LK_CHECK(t.defined(), op, ": ", name, " is undefined");
  LK_CHECK(t.device().type() == device, op, ": ", name, " must be a ",
              c10::DeviceTypeName(device), " tensor, got one on ", t.device());
}

inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  LK_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have a contiguous last dim (stride(-1) == 1), got strides ", t.strides());
}

// q (B, H, Lq, D), k/v (B, Hkv, Lk, D) of one kernel dtype on `device`, H % Hkv == 0,
// 1 <= D <= 256, mask None or a float (B, H, Lq, Lk) tensor on the same device.
inline Sizes check_forward_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                  double scale, at::DeviceType device) {
  check_on(op, "q", q, device);
  check_on(op, "k", k, device);
  check_on(op, "v", v, device);
  LK_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be 4-D (B, H, L, D), got shapes ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  LK_CHECK(is_kernel_dtype(q.scalar_type()), op,
              ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  LK_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  LK_CHECK(q.device() == k.device() && q.device() == v.device(), op,
              ": q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  LK_CHECK(k.sizes() == v.sizes(), op,
              ": k and v must have the same shape (B, Hkv, Lk, D), got ", k.sizes(), " and ",
              v.sizes());
  const Sizes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  LK_CHECK(k.size(0) == s.batch && k.size(3) == s.head_dim, op, ": q (B, H, Lq, D) = ",
              q.sizes(), " and k (B, Hkv, Lk, D) = ", k.sizes(), " must agree in B and D");
  LK_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, op, ": the query heads H=", s.heads,
              " must be a multiple of the key/value heads Hkv=", s.kv_heads);
  LK_CHECK(s.head_dim >= 1 && s.head_dim <= kMaxHeadDim, op, ": head dim D must be in [1, ",
              kMaxHeadDim, "], got ", s.head_dim);
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "v", v);
  LK_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_on(op, "mask", m, device);
    LK_CHECK(m.device() == q.device(), op, ": mask is on ", m.device(), " but q is on ",
                q.device());
    LK_CHECK(is_kernel_dtype(m.scalar_type()), op,
                ": mask must be an additive float32, float16 or bfloat16 tensor, got ",
                m.scalar_type());
    LK_CHECK(m.dim() == 4 && m.size(0) == s.batch && m.size(1) == s.heads &&
                    m.size(2) == s.q_len && m.size(3) == s.k_len,
                op, ": mask must have shape (B, H, Lq, Lk) = (", s.batch, ", ", s.heads, ", ",
                s.q_len, ", ", s.k_len, ") (0 strides on broadcast dims), got ", m.sizes());
  }
  return s;
}

// The forward's preconditions, plus grad_out and out shaped and typed like q, and lse
// (B, H, Lq) float32.
inline Sizes check_backward_inputs(const char* op, const at::Tensor& grad_out,
                                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& out, const at::Tensor& lse,
                                   const std::optional<at::Tensor>& mask, double scale,
                                   at::DeviceType device) {
  const Sizes s = check_forward_inputs(op, q, k, v, mask, scale, device);
  check_on(op, "grad_out", grad_out, device);
  check_on(op, "out", out, device);
  check_on(op, "lse", lse, device);
  LK_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(), op,
              ": grad_out must have q's shape ", q.sizes(), " and dtype ", q.scalar_type(),
              ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  LK_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), op,
              ": out must have q's shape ", q.sizes(), " and dtype ", q.scalar_type(), ", got ",
              out.sizes(), " ", out.scalar_type());
  LK_CHECK(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.heads &&
                  lse.size(2) == s.q_len && lse.scalar_type() == at::kFloat,
              op, ": lse must be float32 of shape (B, H, Lq) = (", s.batch, ", ", s.heads, ", ",
              s.q_len, "), got ", lse.sizes(), " ", lse.scalar_type());
  LK_CHECK(grad_out.device() == q.device() && out.device() == q.device() &&
                  lse.device() == q.device(),
              op, ": grad_out, out and lse must be on q's device ", q.device());
  return s;
}

}  // namespace lk::attn
