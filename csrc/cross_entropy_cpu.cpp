// Cross-entropy forward and backward on CPU (N, V) logits (math in kernels.h), rows in
// parallel, chunked over V (float32 conversion buffers of kChunk values), the row loops
// vectorized in cpu_vec.cpp. The forward keeps an online (max, sum) over the chunks; the target
// logit is read only after its index has been checked against [0, V). The backward's grad may be
// the logits themselves (cross_entropy_backward_inplace): each vector (converted chunk for
// fp16/bf16) of g is written after the same values of x are read, and no other logit of the row
// (not even x[target]) is read.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_utils.h"
#include "kernels.h"

namespace lk {
namespace {

constexpr int64_t kChunk = 2048;  // logits per chunk

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
      RowBuffer buffer(kChunk, 0);  // the chunk as float32, then its exp values
      for (int64_t row = begin; row < end; ++row) {
        const T* x = static_cast<const T*>(a.logits) + row * a.cols;
        MaxSum stats{-INFINITY, 0.0f};
        for (int64_t start = 0; start < a.cols; start += kChunk) {
          const int64_t n = std::min(kChunk, a.cols - start);
          const float* v = row_as_float(x + start, n, buffer);
          MaxSum chunk{max_of(v, n), 0.0f};
          if (chunk.max != -INFINITY) chunk.sum = exp_shift_sum(v, n, chunk.max, buffer.data());
          stats = merge(stats, chunk);
        }
        const float lse = stats.max == -INFINITY ? -INFINITY : stats.max + std::log(stats.sum);
        a.lse[row] = lse;
        a.loss[row] = row_loss(x, a.target[row], lse, a.cols, a.ignore_index);
      }
    });
  });
}

// g = dloss * (exp(x - lse) - onehot(target)); 0 on ignored rows, NaN for a target outside
// [0, V).
void cross_entropy_backward_cpu(const CrossEntropyBackwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(a.rows, a.cols, [&](int64_t begin, int64_t end) {
      RowBuffer buffer(kChunk, 0);
      for (int64_t row = begin; row < end; ++row) {
        const T* x = static_cast<const T*>(a.logits) + row * a.cols;
        T* g = static_cast<T*>(a.grad) + row * a.cols;
        const int64_t t = a.target[row];
        if (t == a.ignore_index) {
          std::fill(g, g + a.cols, static_cast<T>(0.0f));
          continue;
        }
        const bool valid = t >= 0 && t < a.cols;
        const float scale = valid ? a.grad_loss[row] : NAN;
        const int64_t hot = valid ? t : -1;
        for (int64_t start = 0; start < a.cols; start += kChunk) {
          const int64_t n = std::min(kChunk, a.cols - start);
          const float* v = row_as_float(x + start, n, buffer);
          float* out = output_row(g + start, buffer);
          softmax_minus_onehot(v, n, a.lse[row], scale, hot - start, out);
          if constexpr (!std::is_same_v<T, float>) from_float(out, n, g + start);
        }
      }
    });
  });
}

}  // namespace lk
