// Cross-entropy forward and backward over (N, V) logits, chunked over V (math in kernels.h).
// The forward streams each row once through an online (max, sum) in float32 registers; the
// backward streams it once more and writes the gradient in the logits' dtype. The target logit
// is read only after its index has been checked against [0, V). The backward's grad may be the
// logits themselves (cross_entropy_backward_inplace): each thread reads its vector of logits,
// then overwrites that same vector, and reads no other logit (not even logits[target]).
#include "cuda_utils.cuh"
#include "kernels.h"

namespace lk {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kItems = 8;  // vectors per thread, for the launch shape

struct Params {
  const int64_t* target;
  int64_t rows;
  int64_t cols;
  int64_t ignore_index;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_forward_kernel(const T* logits, Params p, float* loss, float* lse) {
  __shared__ MaxSum smem[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < p.rows;
  const T* x = logits + row * p.cols;
  MaxSum stats{-INFINITY, 0.0f};
  for (int64_t col = threadIdx.x * VEC; active && col < p.cols; col += blockDim.x * VEC) {
    float v[VEC];
    load_vec<T, VEC>(x + col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) stats = push(stats, v[k]);
  }
  stats = row_reduce(stats, smem, MergeOp{});
  if (!active || threadIdx.x != 0) return;
  const float row_lse = is_empty(stats) ? -INFINITY : stats.max + logf(stats.sum);
  const int64_t t = p.target[row];
  float row_loss = 0.0f;
  if (t != p.ignore_index) row_loss = (t >= 0 && t < p.cols) ? row_lse - to_float(x[t]) : NAN;
  lse[row] = row_lse;
  loss[row] = row_loss;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_backward_kernel(const float* grad_loss, const T* logits, Params p,
                                  const float* lse, T* grad) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.rows) return;
  const int64_t t = p.target[row];
  const bool ignored = t == p.ignore_index;
  const float scale = ignored ? 0.0f : ((t >= 0 && t < p.cols) ? grad_loss[row] : NAN);
  const float row_lse = lse[row];
  const T* x = logits + row * p.cols;
  T* g = grad + row * p.cols;
  for (int64_t col = threadIdx.x * VEC; col < p.cols; col += blockDim.x * VEC) {
    float v[VEC];
    load_vec<T, VEC>(x + col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float onehot = col + k == t ? 1.0f : 0.0f;
      v[k] = ignored ? 0.0f : scale * (expf(v[k] - row_lse) - onehot);
    }
    store_vec<T, VEC>(g + col, v);
  }
}

struct Launch {
  dim3 grid, block;
};

Launch row_launch(int64_t rows, int64_t cols, int vec) {
  const RowShape shape = row_shape(cols, vec, kItems, kMaxThreads);
  return {dim3(static_cast<unsigned>(ceil_div(rows, shape.rows))), dim3(shape.threads, shape.rows)};
}

template <typename A>
Params params(const A& a) {
  return {a.target, a.rows, a.cols, a.ignore_index};
}

template <typename T, int VEC>
void launch_forward(const CrossEntropyForwardArgs& a, cudaStream_t stream) {
  const Launch l = row_launch(a.rows, a.cols, VEC);
  launch_kernel(cross_entropy_forward_kernel<T, VEC>, l.grid, l.block, stream,
                static_cast<const T*>(a.logits), params(a), a.loss, a.lse);
}

template <typename T, int VEC>
void launch_backward(const CrossEntropyBackwardArgs& a, cudaStream_t stream) {
  const Launch l = row_launch(a.rows, a.cols, VEC);
  launch_kernel(cross_entropy_backward_kernel<T, VEC>, l.grid, l.block, stream, a.grad_loss,
                static_cast<const T*>(a.logits), params(a), a.lse, static_cast<T*>(a.grad));
}

}  // namespace

const char* cross_entropy_forward_cuda(const CrossEntropyForwardArgs& args, void* stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    if (vectorizable(args.cols, kVec16<T>, {args.logits})) {
      launch_forward<T, kVec16<T>>(args, s);
    } else {
      launch_forward<T, 1>(args, s);
    }
    return launch_error();
  });
}

const char* cross_entropy_backward_cuda(const CrossEntropyBackwardArgs& args, void* stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    if (vectorizable(args.cols, kVec16<T>, {args.logits, args.grad})) {
      launch_backward<T, kVec16<T>>(args, s);
    } else {
      launch_backward<T, 1>(args, s);
    }
    return launch_error();
  });
}

}  // namespace lk
