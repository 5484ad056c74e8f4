// Runs the CUDA attention kernels of csrc/ on the CPU emulator (cuda_emulation.h): the forward
// and the backward of one case, as csrc/attention_cuda.cu runs them (the launch plans of
// csrc/attention_launch.cuh, float32 copies for the SIMT fallback).
//
// usage: attention_driver CASE_DIR
//
// CASE_DIR/case.txt holds one "key value..." per line: dtype (f32, f16, bf16), batch, heads,
// kv_heads, q_len, k_len, head_dim, causal (0/1), causal_offset, scale, q_stride / k_stride /
// v_stride (batch, head, row; in elements, the row stride of D being 1), mask_dtype (none, f32,
// f16, bf16), mask_stride (4 values), and optionally skip_syncthreads N (fault injection: every
// thread skips its N-th __syncthreads), backward 0 (forward only) and warp_rows 16 / 32 (query
// rows per warp of the tensor-core forward and dQ, $LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS),
// sm_count N (the SMs the decode split plan assumes; default 4).
// Inputs, raw: q.bin, k.bin, v.bin, mask.bin (each from its first element to its last at the
// given strides), dout.bin ((B, H, Lq, D) contiguous).
// Outputs, raw: out.bin, dq.bin ((B, H, Lq, D)), dk.bin, dv.bin ((B, Hkv, Lk, D)) in the dtype,
// lse.bin (float32, (B, H, Lq)); faults.txt: the number of faults, then their messages.
// Exit status 0 when the case ran (faults or not), else 1 with a message.
#include <cstdio>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda_emulation.h"
// cuda_emulation.h first: it defines LK_CUDA_EMULATION.
#include "driver_main.h"
#include "attention_launch.cuh"

namespace {

using lk::attn::Params;

struct Case {
  std::string dtype, mask_dtype = "none";
  int batch = 0, heads = 0, kv_heads = 0, q_len = 0, k_len = 0, head_dim = 0;
  bool causal = false, backward = true;
  int64_t causal_offset = 0;
  double scale = 0.0;
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {}, mask_stride[4] = {};
  int skip_syncthreads = 0;
  int warp_rows = 16;
  int sm_count = 4;
};

using cuda_emu_driver::fail;

Case read_case(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("cannot read " + path);
  Case c;
  const std::map<std::string, int*> ints = {
      {"batch", &c.batch}, {"heads", &c.heads}, {"kv_heads", &c.kv_heads}, {"q_len", &c.q_len},
      {"k_len", &c.k_len}, {"head_dim", &c.head_dim}, {"skip_syncthreads", &c.skip_syncthreads},
      {"warp_rows", &c.warp_rows}, {"sm_count", &c.sm_count}};
  const std::map<std::string, std::pair<int64_t*, int>> strides = {
      {"q_stride", {c.q_stride, 3}}, {"k_stride", {c.k_stride, 3}},
      {"v_stride", {c.v_stride, 3}}, {"mask_stride", {c.mask_stride, 4}}};
  std::string key;
  while (in >> key) {
    int flag = 0;
    if (ints.count(key)) {
      in >> *ints.at(key);
    } else if (strides.count(key)) {
      const auto& [values, n] = strides.at(key);
      for (int i = 0; i < n; ++i) in >> values[i];
    } else if (key == "dtype") {
      in >> c.dtype;
    } else if (key == "mask_dtype") {
      in >> c.mask_dtype;
    } else if (key == "causal" || key == "backward") {
      in >> flag;
      (key == "causal" ? c.causal : c.backward) = flag != 0;
    } else if (key == "causal_offset") {
      in >> c.causal_offset;
    } else if (key == "scale") {
      in >> c.scale;
    } else {
      fail("unknown key in case.txt: " + key);
    }
    if (!in) fail("bad value for " + key + " in case.txt");
  }
  if (c.batch <= 0 || c.heads <= 0 || c.kv_heads <= 0 || c.heads % c.kv_heads != 0 ||
      c.q_len <= 0 || c.k_len <= 0 || c.head_dim <= 0) {
    fail("case.txt: bad or missing sizes");
  }
  if (c.warp_rows != 16 && c.warp_rows != 32) fail("case.txt: warp_rows must be 16 or 32");
  if (c.sm_count <= 0) fail("case.txt: sm_count must be positive");
  return c;
}

size_t element_size(const std::string& dtype) {
  if (dtype == "f32") return 4;
  if (dtype == "f16" || dtype == "bf16") return 2;
  fail("unknown dtype " + dtype);
}

// Elements from the first to the last element of a (B, H, L, D) tensor at these strides.
size_t extent(int b, int h, int l, int d, const int64_t* stride) {
  return 1 + (b - 1) * stride[0] + (h - 1) * stride[1] + (l - 1) * stride[2] + (d - 1);
}

using cuda_emu_driver::read_file;
using cuda_emu_driver::write_file;

template <typename T>
T* alloc(size_t n) {
  return static_cast<T*>(cuda_emu::device_alloc(n * sizeof(T)));
}

template <typename T>
constexpr bool kIs16Bit = !std::is_same_v<T, float>;

// n elements of T as float32 (the same layout); src itself when T is float.
template <typename T>
const float* as_float(const void* src, size_t n) {
  if constexpr (!kIs16Bit<T>) {
    return static_cast<const float*>(src);
  } else {
    float* dst = alloc<float>(n);
    for (size_t i = 0; i < n; ++i) dst[i] = float(static_cast<const T*>(src)[i]);
    return dst;
  }
}

// Where the SIMT fallback writes an output of n elements: dst itself when T is float.
template <typename T>
float* float_output(T* dst, size_t n) {
  if constexpr (kIs16Bit<T>) return alloc<float>(n);
  return reinterpret_cast<float*>(dst);
}

// dst = src rounded to T, unless the fallback wrote dst itself.
template <typename T>
void store(T* dst, const float* src, size_t n) {
  if (static_cast<const void*>(dst) == src) return;
  for (size_t i = 0; i < n; ++i) dst[i] = T(src[i]);
}

// The inputs of a case on the emulated device; dout is (B, H, Lq, D) contiguous.
struct Inputs {
  const void* q;
  const void* k;
  const void* v;
  const void* mask = nullptr;
  const void* dout;
  size_t q_elems, k_elems, v_elems, dout_elems;
};

// q, k, v, dout as the SIMT fallback reads them: float32 (the inputs themselves for float).
template <typename T>
Inputs as_float(const Inputs& in) {
  Inputs f = in;
  f.q = as_float<T>(in.q, in.q_elems);
  f.k = as_float<T>(in.k, in.k_elems);
  f.v = as_float<T>(in.v, in.v_elems);
  f.dout = as_float<T>(in.dout, in.dout_elems);
  return f;
}

// Rows start 16-byte aligned (what attention_cuda.cu ensures, by a copy if need be, before the
// tensor cores read them).
bool rows_aligned(const void* data, const int64_t* stride, const int* sizes) {
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (sizes[d] > 1 && stride[d] % 8 != 0) return false;
  }
  return true;
}

void check_aligned(const Case& c, const Inputs& in) {
  const int q_sizes[3] = {c.batch, c.heads, c.q_len}, kv_sizes[3] = {c.batch, c.kv_heads, c.k_len};
  if (!rows_aligned(in.q, c.q_stride, q_sizes) || !rows_aligned(in.k, c.k_stride, kv_sizes) ||
      !rows_aligned(in.v, c.v_stride, kv_sizes)) {
    fail("rows of q, k or v are not 16-byte aligned: attention_cuda.cu would copy them first");
  }
}

Params make_params(const Case& c, const Inputs& in) {
  Params p{};
  p.q = in.q;
  p.k = in.k;
  p.v = in.v;
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = c.q_stride[d];
    p.k_stride[d] = c.k_stride[d];
    p.v_stride[d] = c.v_stride[d];
  }
  if (in.mask != nullptr) {
    p.mask = in.mask;
    p.mask_dtype = c.mask_dtype == "f16"    ? lk::attn::kMaskFloat16
                   : c.mask_dtype == "bf16" ? lk::attn::kMaskBFloat16
                                            : lk::attn::kMaskFloat32;
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = c.mask_stride[d];
  }
  p.batch = c.batch;
  p.heads = c.heads;
  p.kv_heads = c.kv_heads;
  p.q_len = c.q_len;
  p.k_len = c.k_len;
  p.head_dim = c.head_dim;
  p.group = c.heads / c.kv_heads;
  p.causal = c.causal;
  p.causal_offset = c.causal_offset;
  p.scale = static_cast<float>(c.scale);
  p.scale_log2 = static_cast<float>(c.scale * 1.4426950408889634);
  p.warp_rows = c.warp_rows;
  p.sm_count = c.sm_count;
  return p;
}

// out (B, H, Lq, D) and lse (B, H, Lq), as attention_forward_cuda computes them.
template <typename T>
void forward(const Case& c, const Inputs& in, T* out, float* lse) {
  if (lk::attn::tensor_core_forward(kIs16Bit<T>, c.head_dim)) {
    check_aligned(c, in);
    Params p = make_params(c, in);
    p.out = out;
    p.lse = lse;
    const size_t workspace_floats = lk::attn::plan_decode(p);
    if (workspace_floats > 0) lk::attn::set_decode_workspace(p, alloc<float>(workspace_floats));
    lk::attn::launch_forward<T>(p, cuda_emu::Launch{});
    return;
  }
  Params p = make_params(c, as_float<T>(in));
  float* out_f = float_output(out, in.dout_elems);
  p.out = out_f;
  p.lse = lse;
  lk::attn::launch_forward<float>(p, cuda_emu::Launch{});
  store(out, out_f, in.dout_elems);
}

// dq (B, H, Lq, D), dk, dv (B, Hkv, Lk, D) of the forward's out and lse, as
// attention_backward_cuda computes them.
template <typename T>
void backward(const Case& c, const Inputs& in, const T* out, float* lse, T* dq, T* dk, T* dv) {
  const size_t q_size = in.dout_elems;
  const size_t kv_size = size_t(c.batch) * c.kv_heads * c.k_len * c.head_dim;
  float* delta = alloc<float>(size_t(c.batch) * c.heads * c.q_len);
  if (lk::attn::tensor_core_backward(kIs16Bit<T>, c.head_dim)) {
    check_aligned(c, in);
    Params p = make_params(c, in);
    p.dout = in.dout;
    p.o = out;
    p.lse = lse;
    p.delta = delta;
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    lk::attn::launch_backward<T>(p, cuda_emu::Launch{});
    return;
  }
  const Inputs f = as_float<T>(in);
  float* dq_f = float_output(dq, q_size);
  float* dk_f = float_output(dk, kv_size);
  float* dv_f = float_output(dv, kv_size);
  Params p = make_params(c, f);
  p.dout = f.dout;
  p.o = as_float<T>(out, q_size);
  p.lse = lse;
  p.delta = delta;
  p.dq = dq_f;
  p.dk = dk_f;
  p.dv = dv_f;
  lk::attn::launch_backward<float>(p, cuda_emu::Launch{});
  store(dq, dq_f, q_size);
  store(dk, dk_f, kv_size);
  store(dv, dv_f, kv_size);
}

// Runs the case and writes its outputs into dir.
template <typename T>
void run(const Case& c, const Inputs& in, const std::string& dir) {
  const size_t rows = size_t(c.batch) * c.heads * c.q_len, q_size = in.dout_elems;
  const size_t kv_size = size_t(c.batch) * c.kv_heads * c.k_len * c.head_dim;
  T* out = alloc<T>(q_size);
  float* lse = alloc<float>(rows);
  forward(c, in, out, lse);
  write_file(dir + "/out.bin", out, q_size * sizeof(T));
  write_file(dir + "/lse.bin", lse, rows * sizeof(float));
  if (!c.backward) return;
  T* dq = alloc<T>(q_size);
  T* dk = alloc<T>(kv_size);
  T* dv = alloc<T>(kv_size);
  backward(c, in, out, lse, dq, dk, dv);
  write_file(dir + "/dq.bin", dq, q_size * sizeof(T));
  write_file(dir + "/dk.bin", dk, kv_size * sizeof(T));
  write_file(dir + "/dv.bin", dv, kv_size * sizeof(T));
}

void run_case(const std::string& dir) {
  const Case c = read_case(dir + "/case.txt");
  cuda_emu::skipped_syncthreads() = c.skip_syncthreads;
  const size_t elem = element_size(c.dtype);
  Inputs in;
  in.q_elems = extent(c.batch, c.heads, c.q_len, c.head_dim, c.q_stride);
  in.k_elems = extent(c.batch, c.kv_heads, c.k_len, c.head_dim, c.k_stride);
  in.v_elems = extent(c.batch, c.kv_heads, c.k_len, c.head_dim, c.v_stride);
  in.dout_elems = size_t(c.batch) * c.heads * c.q_len * c.head_dim;
  in.q = read_file(dir + "/q.bin", in.q_elems * elem);
  in.k = read_file(dir + "/k.bin", in.k_elems * elem);
  in.v = read_file(dir + "/v.bin", in.v_elems * elem);
  in.dout = read_file(dir + "/dout.bin", in.dout_elems * elem);
  if (c.mask_dtype != "none") {
    const int64_t* s = c.mask_stride;
    const size_t n = 1 + (c.batch - 1) * s[0] + (c.heads - 1) * s[1] + (c.q_len - 1) * s[2] +
                     (c.k_len - 1) * s[3];
    in.mask = read_file(dir + "/mask.bin", n * element_size(c.mask_dtype));
  }
  if (c.dtype == "f32") {
    run<float>(c, in, dir);
  } else if (c.dtype == "f16") {
    run<__half>(c, in, dir);
  } else {
    run<__nv_bfloat16>(c, in, dir);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return cuda_emu_driver::main(argc, argv, "attention_driver", run_case);
}
