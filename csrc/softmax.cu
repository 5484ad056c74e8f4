// Row softmax forward and backward (math in kernels.h). (threads per row) x (rows per block)
// blocks; the forward makes one online (max, sum) pass and one writing pass over its row, so any
// C works in float32 registers of constant size. -inf entries contribute nothing; a row of all
// -inf gives zeros.
#include "cuda_utils.cuh"
#include "kernels.h"

namespace lk {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kItems = 4;  // vectors per thread per pass, for the launch shape

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_forward_kernel(const T* x, T* y, int64_t rows, int cols) {
  __shared__ MaxSum smem[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < rows;
  const int64_t base = row * cols;
  const int step = blockDim.x * VEC;
  MaxSum stats{-INFINITY, 0.0f};
  for (int col = threadIdx.x * VEC; active && col < cols; col += step) {
    float v[VEC];
    load_vec<T, VEC>(x + base + col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) stats = push(stats, v[k]);
  }
  stats = row_reduce(stats, smem, MergeOp{});
  const bool empty = is_empty(stats);
  const float inv_sum = empty ? 0.0f : 1.0f / stats.sum;
  for (int col = threadIdx.x * VEC; active && col < cols; col += step) {
    float v[VEC];
    load_vec<T, VEC>(x + base + col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = empty ? 0.0f : expf(v[k] - stats.max) * inv_sum;
    store_vec<T, VEC>(y + base + col, v);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_backward_kernel(const T* grad_y, const T* y, T* dx, int64_t rows, int cols) {
  // y was rounded to T: renormalize it (p = y / sum(y)) so that dx = p * (dy - sum(dy * p))
  // stays accurate on saturated rows; an all-zero row (all -inf logits) gives dx = 0.
  __shared__ float2 smem[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < rows;
  const int64_t base = row * cols;
  const int step = blockDim.x * VEC;
  float2 sums = make_float2(0.0f, 0.0f);  // (sum y, sum dy * y)
  for (int col = threadIdx.x * VEC; active && col < cols; col += step) {
    float g[VEC], v[VEC];
    load_vec<T, VEC>(grad_y + base + col, g);
    load_vec<T, VEC>(y + base + col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      sums.x += v[k];
      sums.y += g[k] * v[k];
    }
  }
  sums = row_reduce(sums, smem, Sum2Op{});
  const float inv = sums.x != 0.0f ? 1.0f / sums.x : 0.0f;
  const float dot = sums.y * inv;
  for (int col = threadIdx.x * VEC; active && col < cols; col += step) {
    float g[VEC], v[VEC];
    load_vec<T, VEC>(grad_y + base + col, g);
    load_vec<T, VEC>(y + base + col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = v[k] * inv * (g[k] - dot);
    store_vec<T, VEC>(dx + base + col, g);
  }
}

// Launch grid and block for `rows` rows of `cols` columns read VEC at a time.
struct Launch {
  dim3 grid, block;
};

Launch row_launch(int64_t rows, int64_t cols, int vec) {
  const RowShape shape = row_shape(cols, vec, kItems, kMaxThreads);
  return {dim3(static_cast<unsigned>(ceil_div(rows, shape.rows))), dim3(shape.threads, shape.rows)};
}

template <typename T, int VEC>
void launch_forward(const SoftmaxForwardArgs& a, cudaStream_t stream) {
  const Launch l = row_launch(a.rows, a.cols, VEC);
  launch_kernel(softmax_forward_kernel<T, VEC>, l.grid, l.block, stream,
                static_cast<const T*>(a.x), static_cast<T*>(a.y), a.rows, static_cast<int>(a.cols));
}

template <typename T, int VEC>
void launch_backward(const SoftmaxBackwardArgs& a, cudaStream_t stream) {
  const Launch l = row_launch(a.rows, a.cols, VEC);
  launch_kernel(softmax_backward_kernel<T, VEC>, l.grid, l.block, stream,
                static_cast<const T*>(a.grad_y), static_cast<const T*>(a.y),
                static_cast<T*>(a.dx), a.rows, static_cast<int>(a.cols));
}

}  // namespace

const char* softmax_forward_cuda(const SoftmaxForwardArgs& args, void* stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    if (vectorizable(args.cols, kVec16<T>, {args.x, args.y})) {
      launch_forward<T, kVec16<T>>(args, s);
    } else {
      launch_forward<T, 1>(args, s);
    }
    return launch_error();
  });
}

const char* softmax_backward_cuda(const SoftmaxBackwardArgs& args, void* stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    if (vectorizable(args.cols, kVec16<T>, {args.grad_y, args.y, args.dx})) {
      launch_backward<T, kVec16<T>>(args, s);
    } else {
      launch_backward<T, 1>(args, s);
    }
    return launch_error();
  });
}

}  // namespace lk
