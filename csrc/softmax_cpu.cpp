// Row softmax forward and backward on CPU tensors (math in kernels.h), rows in parallel, float32
// math in the vectorized row loops of cpu_vec.cpp; -inf entries contribute nothing and a row of
// all -inf gives zeros.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_utils.h"
#include "kernels.h"

namespace lk {

// y = exp(x - max) / sum(exp(x - max)): a max pass, an exp-and-sum pass writing y, a scale pass.
void softmax_forward_cpu(const SoftmaxForwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t cols = a.cols;
    parallel_rows(a.rows, cols, [&](int64_t begin, int64_t end) {
      RowBuffer buffer = row_buffer<T>(cols, 0);  // the row as float32, then y in place
      populate_fresh_output(static_cast<T*>(a.y) + begin * cols, (end - begin) * cols,
                            a.rows * cols);
      for (int64_t row = begin; row < end; ++row) {
        const float* x = row_as_float(static_cast<const T*>(a.x) + row * cols, cols, buffer);
        T* y = static_cast<T*>(a.y) + row * cols;
        touch_pages(y, cols);
        float* out = output_row(y, buffer);
        const float max = max_of(x, cols);
        if (max == -INFINITY) {
          std::fill(out, out + cols, 0.0f);
        } else {
          const float sum = exp_shift_sum(x, cols, max, out);
          scale_floats(out, cols, 1.0f / sum, out);
        }
        if constexpr (!std::is_same_v<T, float>) from_float(out, cols, y);
      }
    });
  });
}

void softmax_backward_cpu(const SoftmaxBackwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t cols = a.cols;
    parallel_rows(a.rows, cols, [&](int64_t begin, int64_t end) {
      RowBuffer gb = row_buffer<T>(cols, 0), yb = row_buffer<T>(cols, 1);
      RowBuffer dxb = row_buffer<T>(cols, 2);
      populate_fresh_output(static_cast<T*>(a.dx) + begin * cols, (end - begin) * cols,
                            a.rows * cols);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * cols;
        T* dx = static_cast<T*>(a.dx) + base;
        touch_pages(dx, cols);
        float* out = output_row(dx, dxb);
        // y was rounded to T: the row routine renormalizes it (p = y / sum(y)) so that
        // dx = p * (dy - sum(dy * p)) stays accurate on saturated rows; an all-zero row (all
        // -inf logits) gives dx = 0.
        softmax_backward_row(row_as_float(static_cast<const T*>(a.grad_y) + base, cols, gb),
                             row_as_float(static_cast<const T*>(a.y) + base, cols, yb), cols, out);
        if constexpr (!std::is_same_v<T, float>) from_float(out, cols, dx);
      }
    });
  });
}

}  // namespace lk
