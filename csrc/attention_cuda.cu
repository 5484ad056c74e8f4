// CUDA attention entry points: checks, layouts and workspaces; the kernels are launched by the
// translation units of attention_cuda_launch.cuh, per the plans of attention_launch.cuh.
//
// fp16/bf16 with D % 8 == 0 (and 16-byte aligned rows, else a contiguous copy): tensor cores,
// D padded to 64, 128 or 256 in shared memory (the backward up to D = 128). Everything else
// (float32, other head dims, the backward at D > 128) runs the float32 SIMT kernels on float32
// copies. A forward of at most 32 query rows per kv head (group * Lq, e.g. a decode step; 16 at
// D > 128) runs flash-decoding: the keys split over blocks, then merged. The backward is deterministic: no
// atomics, every gradient element is written by one thread block (dK/dV per key tile over the
// group's query heads, dQ per query tile).
#include "attention.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <string>

#include "attention_checks.h"
#include "attention_cuda_launch.cuh"
#include "check.h"
#include "common.h"

namespace lk::attn {
namespace {

constexpr int kMaxGridY = 65535;

Params make_params(const Sizes& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, bool causal, int64_t causal_offset,
                   double scale) {
  Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q.stride(d);
    p.k_stride[d] = k.stride(d);
    p.v_stride[d] = v.stride(d);
  }
  if (mask.has_value()) {
    p.mask = mask->data_ptr();
    p.mask_dtype = mask->scalar_type() == at::kHalf       ? kMaskFloat16
                   : mask->scalar_type() == at::kBFloat16 ? kMaskBFloat16
                                                          : kMaskFloat32;
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask->stride(d);
  }
  p.batch = static_cast<int>(s.batch);
  p.heads = static_cast<int>(s.heads);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.q_len = static_cast<int>(s.q_len);
  p.k_len = static_cast<int>(s.k_len);
  p.head_dim = static_cast<int>(s.head_dim);
  p.group = static_cast<int>(s.heads / s.kv_heads);
  p.causal = causal;
  p.causal_offset = causal_offset;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return p;
}

// Query rows per warp of the tensor-core forward (and dQ at D <= 64):
// $LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS, 16 (the default) or 32, read at each call.
int query_warp_rows() {
  const char* value = std::getenv("LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS");
  if (value == nullptr || *value == '\0') return 16;
  const std::string rows(value);
  LK_CHECK(rows == "16" || rows == "32",
           "LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS must be 16 or 32, got '", rows, "'");
  return std::stoi(rows);
}

void check_grid(const char* op, const Sizes& s) {
  LK_CHECK(s.batch * s.heads < (int64_t{1} << 31) && s.q_len < (int64_t{1} << 30) &&
                  s.k_len < (int64_t{1} << 30),
              op, ": sizes too large for the CUDA kernels (B * H < 2^31, Lq, Lk < 2^30)");
  LK_CHECK(lk::ceil_div(std::max(s.q_len, s.k_len), 32) <= kMaxGridY, op,
              ": sequence length ", std::max(s.q_len, s.k_len), " exceeds the CUDA grid limit (",
              kMaxGridY * 32, ")");
}

bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// 16-byte aligned rows: base address and the strides of every dim of size > 1.
bool rows_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

at::Tensor with_aligned_rows(const at::Tensor& t) {
  if (rows_aligned(t)) return t;
  at::Tensor c = t.contiguous();
  return rows_aligned(c) ? c : c.clone();
}

at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// The launcher of the kernels on the current stream of the current device.
CudaLaunch current_launch() {
  return {c10::cuda::getCurrentCUDAStream(),
          at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin};
}

at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

}  // namespace
}  // namespace lk::attn

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, bool causal, int64_t causal_offset, double scale) {
  using namespace lk::attn;
  constexpr const char* kOp = "attention_forward_cuda";
  const Sizes s = check_forward_inputs(kOp, q, k, v, mask, scale, at::kCUDA);
  check_grid(kOp, s);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // (B, H, Lq, D) contiguous
  at::Tensor lse = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (tensor_core_forward(is_16bit(q), s.head_dim)) {
    const at::Tensor qa = with_aligned_rows(q), ka = with_aligned_rows(k);
    const at::Tensor va = with_aligned_rows(v);
    Params p = make_params(s, qa, ka, va, mask, causal, causal_offset, scale);
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.warp_rows = query_warp_rows();
    p.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const size_t workspace_floats = plan_decode(p);
    at::Tensor workspace;  // freed after the launches: the stream's later work reuses it
    if (workspace_floats > 0) {
      workspace = at::empty({static_cast<int64_t>(workspace_floats)}, lse.options());
      set_decode_workspace(p, workspace.data_ptr<float>());
    }
    q.scalar_type() == at::kHalf ? forward_f16(p, current_launch())
                                 : forward_bf16(p, current_launch());
    return {out, lse};
  }
  const at::Tensor qf = as_float(q), kf = as_float(k), vf = as_float(v);
  at::Tensor out_f = q.scalar_type() == at::kFloat ? out : at::empty(q.sizes(), qf.options());
  Params p = make_params(s, qf, kf, vf, mask, causal, causal_offset, scale);
  p.out = out_f.data_ptr();
  p.lse = lse.data_ptr<float>();
  forward_f32(p, current_launch());
  if (!out_f.is_same(out)) out.copy_(out_f);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    bool causal, int64_t causal_offset, double scale) {
  using namespace lk::attn;
  constexpr const char* kOp = "attention_backward_cuda";
  const Sizes s = check_backward_inputs(kOp, grad_out, q, k, v, out, lse, mask, scale, at::kCUDA);
  check_grid(kOp, s);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty({s.batch, s.heads, s.q_len}, lse.options());
  if (tensor_core_backward(is_16bit(q), s.head_dim)) {
    const at::Tensor qa = with_aligned_rows(q), ka = with_aligned_rows(k);
    const at::Tensor va = with_aligned_rows(v);
    const at::Tensor go = contiguous_aligned(grad_out), o = contiguous_aligned(out);
    Params p = make_params(s, qa, ka, va, mask, causal, causal_offset, scale);
    p.dout = go.data_ptr();
    p.o = o.data_ptr();
    p.lse = lse_c.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    p.warp_rows = query_warp_rows();
    q.scalar_type() == at::kHalf ? backward_f16(p, current_launch())
                                 : backward_bf16(p, current_launch());
    return {dq, dk, dv};
  }
  const bool is_float = q.scalar_type() == at::kFloat;
  const at::Tensor qf = as_float(q), kf = as_float(k), vf = as_float(v);
  const at::Tensor go = as_float(grad_out).contiguous(), o = as_float(out).contiguous();
  at::Tensor dq_f = is_float ? dq : at::empty(q.sizes(), qf.options());
  at::Tensor dk_f = is_float ? dk : at::empty(k.sizes(), qf.options());
  at::Tensor dv_f = is_float ? dv : at::empty(v.sizes(), qf.options());
  Params p = make_params(s, qf, kf, vf, mask, causal, causal_offset, scale);
  p.dout = go.data_ptr();
  p.o = o.data_ptr();
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq_f.data_ptr();
  p.dk = dk_f.data_ptr();
  p.dv = dv_f.data_ptr();
  backward_f32(p, current_launch());
  if (!is_float) {
    dq.copy_(dq_f);
    dk.copy_(dk_f);
    dv.copy_(dv_f);
  }
  return {dq, dk, dv};
}
