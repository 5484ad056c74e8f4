// Cross-entropy forward and backward on CPU (N, V) logits (math in kernels.h), rows in
// parallel, chunked over V with an online (max, sum) in float32; the target logit is read only
// after its index has been checked against [0, V). The backward's grad may be the logits
// themselves (cross_entropy_backward_inplace): g[j] is written right after x[j] is read, and no
// other logit of the row (not even x[target]) is read.
#include <algorithm>
#include <cmath>

#include "cpu_utils.h"
#include "kernels.h"

namespace lk {
namespace {

constexpr int64_t kChunk = 2048;  // logits converted to float32 at a time

// Loss of one row given its logsumexp: 0 when ignored, NaN for a target outside [0, V).
template <typename T>
float row_loss(const T* x, int64_t target, float lse, int64_t cols, int64_t ignore_index) {
  if (target == ignore_index) return 0.0f;
  if (target < 0 || target >= cols) return NAN;
  return lse - static_cast<float>(x[target]);
}

}  // namespace

void cross_entropy_forward_cpu(const CrossEntropyForwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(a.rows, a.cols, [&](int64_t begin, int64_t end) {
      float v[kChunk];
      for (int64_t row = begin; row < end; ++row) {
        const T* x = static_cast<const T*>(a.logits) + row * a.cols;
        MaxSum stats{-INFINITY, 0.0f};
        for (int64_t start = 0; start < a.cols; start += kChunk) {
          const int64_t n = std::min(kChunk, a.cols - start);
          to_float(x + start, n, v);
          MaxSum chunk{-INFINITY, 0.0f};
          for (int64_t j = 0; j < n; ++j) chunk.max = std::fmax(chunk.max, v[j]);
          if (chunk.max != -INFINITY) {
            chunk.sum = lane_sum(n, [&](int64_t j) { return std::exp(v[j] - chunk.max); });
          }
          stats = merge(stats, chunk);
        }
        const float lse = stats.max == -INFINITY ? -INFINITY : stats.max + std::log(stats.sum);
        a.lse[row] = lse;
        a.loss[row] = row_loss(x, a.target[row], lse, a.cols, a.ignore_index);
      }
    });
  });
}

void cross_entropy_backward_cpu(const CrossEntropyBackwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(a.rows, a.cols, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const T* x = static_cast<const T*>(a.logits) + row * a.cols;
        T* g = static_cast<T*>(a.grad) + row * a.cols;
        const int64_t t = a.target[row];
        if (t == a.ignore_index) {
          std::fill(g, g + a.cols, static_cast<T>(0.0f));
          continue;
        }
        const float scale = (t >= 0 && t < a.cols) ? a.grad_loss[row] : NAN;
        const float lse = a.lse[row];
        for (int64_t j = 0; j < a.cols; ++j) {
          const float p = std::exp(static_cast<float>(x[j]) - lse);
          g[j] = static_cast<T>(scale * (p - (j == t ? 1.0f : 0.0f)));
        }
      }
    });
  });
}

}  // namespace lk
