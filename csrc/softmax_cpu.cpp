// Row softmax forward and backward on CPU tensors (math in kernels.h), rows in parallel, float32
// math; -inf entries contribute nothing and a row of all -inf gives zeros.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_utils.h"
#include "kernels.h"

namespace lk {

void softmax_forward_cpu(const SoftmaxForwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(a.rows, a.cols, [&](int64_t begin, int64_t end) {
      std::vector<float> v(a.cols);
      for (int64_t row = begin; row < end; ++row) {
        to_float(static_cast<const T*>(a.x) + row * a.cols, a.cols, v.data());
        float max = -INFINITY;
        for (float x : v) max = std::fmax(max, x);
        if (max == -INFINITY) {
          std::fill(v.begin(), v.end(), 0.0f);
        } else {
          for (float& x : v) x = std::exp(x - max);
          const float inv_sum = 1.0f / lane_sum(a.cols, [&](int64_t j) { return v[j]; });
          for (float& x : v) x *= inv_sum;
        }
        from_float(v.data(), a.cols, static_cast<T*>(a.y) + row * a.cols);
      }
    });
  });
}

void softmax_backward_cpu(const SoftmaxBackwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(a.rows, a.cols, [&](int64_t begin, int64_t end) {
      std::vector<float> g(a.cols), y(a.cols);
      for (int64_t row = begin; row < end; ++row) {
        to_float(static_cast<const T*>(a.grad_y) + row * a.cols, a.cols, g.data());
        to_float(static_cast<const T*>(a.y) + row * a.cols, a.cols, y.data());
        // y was rounded to T: renormalize it (p = y / sum(y)) so that dx = p * (dy - sum(dy * p))
        // stays accurate on saturated rows; an all-zero row (all -inf logits) gives dx = 0.
        const float total = lane_sum(a.cols, [&](int64_t j) { return y[j]; });
        const float inv = total != 0.0f ? 1.0f / total : 0.0f;
        const float dot = lane_sum(a.cols, [&](int64_t j) { return g[j] * y[j]; }) * inv;
        for (int64_t j = 0; j < a.cols; ++j) g[j] = y[j] * inv * (g[j] - dot);
        from_float(g.data(), a.cols, static_cast<T*>(a.dx) + row * a.cols);
      }
    });
  });
}

}  // namespace lk
