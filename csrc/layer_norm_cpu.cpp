// layer_norm / rms_norm forward and backward on CPU tensors (math in kernels.h): rows in
// parallel, each row converted to a float32 buffer once, statistics from one read of the row in
// the common case (cpu_vec.cpp row_moments), the row loops vectorized.
// dweight/dbias: per-chunk partial sums over a fixed split of the rows, added in chunk order, so
// the result does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_utils.h"
#include "kernels.h"

namespace lk {
namespace {

// Row chunks of the backward's partial dweight/dbias sums: a fixed split (so the sums do not
// depend on the thread count) of at least kMinChunkRows rows each, at most kMaxChunks.
constexpr int64_t kMaxChunks = 32;
constexpr int64_t kMinChunkRows = 64;

template <typename T>
void forward_rows(const NormForwardArgs& a, const float* w, const float* b, int64_t begin,
                  int64_t end) {
  const int64_t cols = a.cols;
  const int64_t residual_cols = a.residual != nullptr ? cols : 0;
  RowBuffer xb = row_buffer<T>(cols, 0), yb = row_buffer<T>(cols, 1);
  RowBuffer rb = row_buffer<T>(residual_cols, 2), hb = row_buffer<T>(residual_cols, 3);
  populate_fresh_output(static_cast<T*>(a.y) + begin * cols, (end - begin) * cols, a.rows * cols);
  if (a.residual != nullptr) {
    populate_fresh_output(static_cast<T*>(a.h) + begin * cols, (end - begin) * cols,
                          a.rows * cols);
  }
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * cols;
    const float* v = row_as_float(static_cast<const T*>(a.x) + base, cols, xb);
    if (a.residual != nullptr) {  // h = T(x + residual), normalized as rounded
      T* h = static_cast<T*>(a.h) + base;
      touch_pages(h, cols);
      float* sum = output_row(h, hb);
      add_floats(v, row_as_float(static_cast<const T*>(a.residual) + base, cols, rb), cols, sum);
      if constexpr (!std::is_same_v<T, float>) {
        from_float(sum, cols, h);
        to_float(h, cols, sum);
      }
      v = sum;
    }
    const RowMoments m = a.rms ? RowMoments{0.0f, sum_squares(v, cols)} : row_moments(v, cols);
    const float mean = m.mean;
    const float rstd = 1.0f / std::sqrt(m.m2 / cols + a.eps);
    T* y = static_cast<T*>(a.y) + base;
    touch_pages(y, cols);
    float* out = output_row(y, yb);
    normalize_affine(v, cols, mean, rstd, w, b, out);
    if constexpr (!std::is_same_v<T, float>) from_float(out, cols, y);
    if (a.mean != nullptr) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// dx for rows [begin, end); adds grad_y * xhat and grad_y to acc_w / acc_b when non-null.
template <typename T>
void backward_rows(const NormBackwardArgs& a, const float* w, int64_t begin, int64_t end,
                   float* acc_w, float* acc_b) {
  const int64_t cols = a.cols;
  RowBuffer dyb = row_buffer<T>(cols, 0), hb = row_buffer<T>(cols, 1);
  RowBuffer dxb = row_buffer<T>(cols, 2), ghb = row_buffer<T>(a.grad_h != nullptr ? cols : 0, 3);
  populate_fresh_output(static_cast<T*>(a.dx) + begin * cols, (end - begin) * cols,
                        a.rows * cols);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * cols;
    const float* gh = a.grad_h != nullptr
                          ? row_as_float(static_cast<const T*>(a.grad_h) + base, cols, ghb)
                          : nullptr;
    T* dx = static_cast<T*>(a.dx) + base;
    touch_pages(dx, cols);
    float* out = output_row(dx, dxb);
    norm_backward_row(row_as_float(static_cast<const T*>(a.grad_y) + base, cols, dyb),
                      row_as_float(static_cast<const T*>(a.h) + base, cols, hb), w, gh, cols,
                      a.mean != nullptr ? a.mean[row] : 0.0f, a.rstd[row], a.rms, out, acc_w,
                      acc_b);
    if constexpr (!std::is_same_v<T, float>) from_float(out, cols, dx);
  }
}

// out[c] = T(sum over chunks of partial[chunk][c]), chunks added in order.
template <typename T>
void sum_chunks(const std::vector<float>& partial, int64_t chunks, int64_t cols, void* out) {
  if (out == nullptr) return;
  T* dst = static_cast<T*>(out);
  at::parallel_for(0, cols, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float total = 0.0f;
      for (int64_t k = 0; k < chunks; ++k) total += partial[k * cols + c];
      dst[c] = static_cast<T>(total);
    }
  });
}

}  // namespace

void layer_norm_forward_cpu(const NormForwardArgs& args) {
  dispatch_cpu_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    const std::vector<float> w = param_as_float<T>(args.weight, args.cols, 1.0f);
    const std::vector<float> b = param_as_float<T>(args.bias, args.cols, 0.0f);
    parallel_rows(args.rows, args.cols, [&](int64_t begin, int64_t end) {
      forward_rows<T>(args, w.data(), b.data(), begin, end);
    });
  });
}

void layer_norm_backward_cpu(const NormBackwardArgs& args) {
  dispatch_cpu_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    const std::vector<float> w = param_as_float<T>(args.weight, args.cols, 1.0f);
    const bool param_grads = args.dweight != nullptr || args.dbias != nullptr;
    if (!param_grads) {
      parallel_rows(args.rows, args.cols, [&](int64_t begin, int64_t end) {
        backward_rows<T>(args, w.data(), begin, end, nullptr, nullptr);
      });
      return;
    }
    const int64_t chunks = std::clamp<int64_t>(args.rows / kMinChunkRows, 1, kMaxChunks);
    const int64_t rows_per_chunk = ceil_div(args.rows, chunks);
    std::vector<float> partial_w(chunks * args.cols, 0.0f), partial_b(chunks * args.cols, 0.0f);
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        const int64_t begin = k * rows_per_chunk;
        const int64_t end = std::min(args.rows, begin + rows_per_chunk);
        backward_rows<T>(args, w.data(), begin, end, partial_w.data() + k * args.cols,
                         partial_b.data() + k * args.cols);
      }
    });
    sum_chunks<T>(partial_w, chunks, args.cols, args.dweight);
    sum_chunks<T>(partial_b, chunks, args.cols, args.dbias);
  });
}

}  // namespace lk
