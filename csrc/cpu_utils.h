// Helpers of the C++ CPU twins: dtype dispatch to c10 types, row-parallel loops, float32 row
// buffers, and the vectorized row loops of cpu_vec.cpp (sums accurate for long rows).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace lk {

// Calls f(T{}) with T the c10 element type of `dtype`.
template <typename F>
void dispatch_cpu_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kFloat16:
      f(c10::Half{});
      break;
    default:
      f(c10::BFloat16{});
  }
}

// f(begin, end) over row ranges in parallel, about 32K elements per task.
template <typename F>
void parallel_rows(int64_t rows, int64_t cols, F&& f) {
  const int64_t grain = cols >= 32768 ? 1 : 32768 / (cols > 0 ? cols : 1);
  at::parallel_for(0, rows, grain, f);
}

// f(begin, end) over element ranges in parallel.
template <typename F>
void parallel_elements(int64_t n, F&& f) {
  at::parallel_for(0, n, 32768, f);
}

// Row loops in cpu_vec.cpp, cloned for AVX-512 / AVX2 / baseline x86-64.
void bf16_to_float(const c10::BFloat16* src, int64_t n, float* dst);
void float_to_bf16(const float* src, int64_t n, c10::BFloat16* dst);
void half_to_float(const c10::Half* src, int64_t n, float* dst);
void float_to_half(const float* src, int64_t n, c10::Half* dst);
// Mean and sum of squared deviations from the mean of one row.
struct RowMoments {
  float mean, m2;
};
RowMoments row_moments(const float* v, int64_t n);
float sum_squares(const float* v, int64_t n);  // sum v^2
void add_floats(const float* a, const float* b, int64_t n, float* out);  // out = a + b
// out = (v - mean) * rstd * w + b (out may be v).
void normalize_affine(const float* v, int64_t n, float mean, float rstd, const float* w,
                      const float* b, float* out);
// One row of the norm backward (math in kernels.h): writes dx (plus grad_h when non-null) and
// adds grad_y * xhat, grad_y to acc_w, acc_b when non-null.
void norm_backward_row(const float* dy, const float* h, const float* w, const float* grad_h,
                       int64_t n, float mean, float rstd, bool rms, float* dx, float* acc_w,
                       float* acc_b);

// Softmax rows: max(v[0:n]), NaN when a value is NaN (-inf when n == 0); out = exp(v - shift)
// returning sum(out) (blocked float32 lanes, block totals in double; shift > -inf or NaN, out
// may be v);
// out = v * factor.
float max_of(const float* v, int64_t n);
float exp_shift_sum(const float* v, int64_t n, float shift, float* out);
void scale_floats(const float* v, int64_t n, float factor, float* out);
// Softmax backward of one row from its output y rounded to the storage dtype: with
// p = y / sum(y) (0 when sum(y) == 0), dx = p * (dy - sum(dy * p)).
void softmax_backward_row(const float* dy, const float* y, int64_t n, float* dx);
// Cross-entropy gradient row: out[i] = scale * (exp(v[i] - shift) - [i == hot]) for i < n, with
// shift the row's logsumexp (hot outside [0, n) matches nothing; out may be v).
void softmax_minus_onehot(const float* v, int64_t n, float shift, float scale, int64_t hot,
                          float* out);

// The feed-forward epilogues over n floats (math in common.h): out = act(pre); with the
// gradient, grad_pre = grad_out * act'(pre) too; swiglu out = silu(gate) * up, grad_gate =
// grad_out * up * silu'(gate), grad_up = grad_out * silu(gate).
void activation_rows(Activation act, const float* pre, int64_t n, float* out);
void activation_grad_rows(Activation act, const float* pre, const float* grad_out, int64_t n,
                          float* out, float* grad_pre);
void swiglu_rows(const float* gate, const float* up, int64_t n, float* out);
void swiglu_grad_rows(const float* gate, const float* up, const float* grad_out, int64_t n,
                      float* out, float* grad_gate, float* grad_up);

// float(src[i]) for i < n into dst.
template <typename T>
void to_float(const T* src, int64_t n, float* dst) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bf16_to_float(src, n, dst);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    half_to_float(src, n, dst);
  } else {
    std::memcpy(dst, src, n * sizeof(float));
  }
}

// T(src[i]) for i < n into dst (round to nearest even).
template <typename T>
void from_float(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    float_to_bf16(src, n, dst);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    float_to_half(src, n, dst);
  } else {
    std::memcpy(dst, src, n * sizeof(float));
  }
}

// A float32 row buffer for row_as_float / output_row (empty for float rows, which need none).
// Buffer `slot` starts at slot KB mod 4 KB: a loop that stores to one buffer and then loads
// from another at the same address mod 4 KB waits for the store to retire (4K aliasing), which
// buffers of whole rows would otherwise hit on every vector (their mallocs lie 4 KB + a header
// apart when a row is 4 KB).
class RowBuffer {
 public:
  RowBuffer(int64_t n, int slot) : storage_(n > 0 ? n + kPageFloats : 0) {
    if (n > 0) {
      const uintptr_t start = reinterpret_cast<uintptr_t>(storage_.data());
      const uintptr_t wanted = static_cast<uintptr_t>(slot % 4) * 1024;
      offset_ = static_cast<int64_t>(((wanted - start) & 4095) / sizeof(float));
    }
  }
  float* data() { return storage_.data() + offset_; }

 private:
  static constexpr int64_t kPageFloats = 4096 / sizeof(float);
  std::vector<float> storage_;
  int64_t offset_ = 0;
};

template <typename T>
RowBuffer row_buffer(int64_t n, int slot) {
  return RowBuffer(std::is_same_v<T, float> ? 0 : n, slot);
}

// The float32 values of a row: the row itself for float, else converted into `buffer`.
template <typename T>
const float* row_as_float(const T* src, int64_t n, RowBuffer& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float(src, n, buffer.data());
    return buffer.data();
  }
}

// Where a kernel writes a float32 row bound for `dst`: dst itself for float, else `buffer`
// (then stored with from_float).
template <typename T>
float* output_row(T* dst, RowBuffer& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return buffer.data();
  }
}

// Stores a zero byte into every 4 KB page of the output row dst[0, n) before a row loop
// writes it; only for outputs that alias no input. A fresh allocation faults once per page on
// its first write: a fault taken by this lone byte store costs less than one taken amid the
// row loop's stream of vector stores (2048 x 4096 float32 layer norm forward, 8193 faults a
// call, this 2-core machine: 0.89x -> 1.02x F.layer_norm). Nearly free when the pages are in.
template <typename T>
void touch_pages(T* dst, int64_t n) {
  if (n <= 0) return;
  volatile char* bytes = reinterpret_cast<volatile char*>(dst);
  const int64_t size = n * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < size; i += 4096) bytes[i] = 0;
  bytes[size - 1] = 0;
}

// Outputs of at least this many bytes come from a fresh mmap, none of their pages in yet: torch's
// CPU allocator calls malloc, and glibc maps every allocation of its largest mmap threshold
// (32 MiB on 64-bit) or more.
constexpr int64_t kFreshMapBytes = int64_t{32} << 20;

// Prefaults dst[0, n), this thread's rows of a fresh output of `total` elements, in one system
// call (MADV_POPULATE_WRITE, Linux 5.14+; nothing where the kernel lacks it) instead of a page
// fault per 4 KB in the row loop: 2048 x 4096 float32 layer norm forward 0.94-1.0x -> 1.03-1.12x
// F.layer_norm, this 2-core machine. Only for outputs of kFreshMapBytes or more: the pages of a
// smaller one are often in already (reused heap memory), and walking them costs (512 x 1024
// float32: 1.2x -> 0.6x).
template <typename T>
void populate_fresh_output(T* dst, int64_t n, int64_t total) {
#ifdef MADV_POPULATE_WRITE
  if (n <= 0 || total * static_cast<int64_t>(sizeof(T)) < kFreshMapBytes) return;
  constexpr uintptr_t kPage = 4096;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(dst) & ~(kPage - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(dst + n);
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
#endif
}

// A (C,) parameter as float32, or `fill` when absent.
template <typename T>
std::vector<float> param_as_float(const void* p, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (p != nullptr) to_float(static_cast<const T*>(p), n, out.data());
  return out;
}

}  // namespace lk
