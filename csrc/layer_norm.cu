// layer_norm / rms_norm forward and backward with the fused residual add (math in kernels.h).
//
// Forward: persistent (threads per row) x (rows per block) blocks; each thread keeps up to
// kCached values of its row in registers as stored (16-byte vector loads when the row allows
// them), loads the next row's while it finishes this one, and re-reads only columns past that
// (C > threads * kCached). Statistics are two-pass in float32.
// Backward, C <= 512 * kCached (256 * kCached without vector loads): a persistent kernel, one
// row at a time per block with the next row's loads in flight, writes dx and keeps per-column
// dweight/dbias sums in shared memory, stored per block to a (blocks, C) float32 workspace; a
// column kernel then sums the blocks in a fixed order.
// Wider rows: a dx kernel plus a column-tiled kernel for the partial sums. No atomics anywhere,
// so dweight/dbias are bitwise reproducible on a given GPU.
#include "cuda_utils.cuh"
#include "kernels.h"

namespace lk {
namespace {

constexpr int kCached = 16;             // float values of a row a thread keeps in registers
constexpr int kForwardThreads = 512;    // max threads per row, forward
constexpr int kBackwardThreads = 512;   // max threads per row, fused backward

// Max threads per row of the fused backward: scalar loads need more address registers, so
// VEC == 1 gets 256 threads (up to 255 registers each) to keep everything in registers.
constexpr int backward_threads(int vec) { return vec == 1 ? kBackwardThreads / 2 : kBackwardThreads; }
constexpr int kWideThreads = 1024;      // threads per row, backward dx for wide rows
constexpr int kColTile = 32;            // columns per block in the column kernels
constexpr int kColLanes = 8;            // row lanes per block in the partial-sum kernel
constexpr int kSumLanes = 32;           // partial rows summed in parallel by column_sum_kernel

// Blocks of a persistent kernel compiled for blocks of up to MAX_THREADS threads that an SM is
// to hold: three of up to 256 threads with 16-bit types (80 registers a thread, no spills on
// sm_90), else whatever one block allows.
template <typename T, int MAX_THREADS>
constexpr int min_blocks_per_sm() {
  return sizeof(T) == 2 && MAX_THREADS <= 256 ? 3 : 1;
}

template <typename T>
struct ForwardParams {
  const T* x;
  const T* residual;
  const T* weight;
  const T* bias;
  T* y;
  T* h;
  float* mean;
  float* rstd;
  int64_t rows;
  int cols;
  float eps;
};

template <typename T>
struct BackwardParams {
  const T* grad_y;
  const T* grad_h;
  const T* h;
  const T* weight;
  const float* mean;
  const float* rstd;
  T* dx;
  int64_t rows;
  int cols;
};

// Loads VEC values of h = x (+ residual, rounded to T and stored to p.h) at flat index i.
template <typename T, int VEC>
__device__ __forceinline__ void load_input(const ForwardParams<T>& p, int64_t i, float (&v)[VEC]) {
  load_vec<T, VEC>(p.x + i, v);
  if (p.residual != nullptr) {
    float r[VEC];
    load_vec<T, VEC>(p.residual + i, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_float(from_float<T>(v[k] + r[k]));
    store_vec<T, VEC>(p.h + i, v);
  }
}

// y = (v - mean) * rstd * weight + bias for the VEC columns at `col` of the row at `base`.
template <typename T, int VEC>
__device__ __forceinline__ void store_output(const ForwardParams<T>& p, int64_t base, int col,
                                             const float (&v)[VEC], float mean, float rstd) {
  float w[VEC], b[VEC], out[VEC];
  if (p.weight != nullptr) {
    load_vec<T, VEC>(p.weight + col, w);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] = 1.0f;
  }
  if (p.bias != nullptr) {
    load_vec<T, VEC>(p.bias + col, b);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) b[k] = 0.0f;
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = (v[k] - mean) * rstd * w[k] + b[k];
  store_vec<T, VEC>(p.y + base + col, out);
}

// Two tensors' values of one row as stored, the columns one thread owns: item i is the VEC
// columns at i * step + first. The forward holds x (a) and the residual (b), the backward
// grad_y (a) and h (b).
template <typename T, int VEC, int ITEMS>
struct SlicePair {
  Pack<T, VEC> a[ITEMS];
  Pack<T, VEC> b[ITEMS];
};

// Loads this thread's slice of `row` of the (rows, cols) tensors a and b (b skipped when null;
// nothing past the last row).
template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void load_pair(const T* a, const T* b, int64_t rows, int cols,
                                          int64_t row, int step, int first,
                                          SlicePair<T, VEC, ITEMS>& s) {
  if (row >= rows) return;
  const int64_t base = row * cols;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int col = i * step + first;
    if (col < cols) {
      s.a[i] = load_pack<T, VEC>(a + base + col);
      if (b != nullptr) s.b[i] = load_pack<T, VEC>(b + base + col);
    }
  }
}

// h = x (+ residual, rounded to T) of item i of the slice.
template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void input_item(const ForwardParams<T>& p,
                                           const SlicePair<T, VEC, ITEMS>& s, int i,
                                           float (&h)[VEC]) {
  unpack<T, VEC>(s.a[i], h);
  if (p.residual != nullptr) {
    float r[VEC];
    unpack<T, VEC>(s.b[i], r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) h[k] = to_float(from_float<T>(h[k] + r[k]));
  }
}

// Persistent: block b handles the row groups b, b + gridDim.x, ... (blockDim.y rows each);
// each thread holds its first kItems * VEC columns of x and residual as stored and loads the
// next group's while it reduces and writes this one, so each block has two row groups in
// flight. Columns past that (C > threads * kCached) are read when needed. blockDim.x *
// blockDim.y <= MAX_THREADS.
template <typename T, int VEC, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS, min_blocks_per_sm<T, MAX_THREADS>())
    layer_norm_forward_kernel(ForwardParams<T> p, bool rms) {
  constexpr int kItems = kCached / VEC;
  __shared__ float smem[32];
  const int cols = p.cols;
  const int step = blockDim.x * VEC;
  const int first = threadIdx.x * VEC;
  const int uncached = kItems * step + first;  // columns from here on are re-read
  // Columns past the cache are re-read from h when it was written, else from x.
  const T* reread = p.residual != nullptr ? p.h : p.x;
  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  SlicePair<T, VEC, kItems> cur, next;  // x and residual of this row and of the next
  auto load = [&](int64_t row, SlicePair<T, VEC, kItems>& s) {
    load_pair<T, VEC, kItems>(p.x, p.residual, p.rows, cols, row, step, first, s);
  };
  load(static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y, cur);
  // The loop condition is the same for the whole block (row_reduce synchronizes it).
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < p.rows;
       row0 += rows_per_step) {
    const int64_t row = row0 + threadIdx.y;
    const bool active = row < p.rows;  // inactive threads still join the reductions
    const int64_t base = row * cols;
    load(row + rows_per_step, next);

    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = i * step + first;
      if (active && col < cols) {
        float h[VEC];
        input_item<T, VEC, kItems>(p, cur, i, h);
        if (p.residual != nullptr) store_vec<T, VEC>(p.h + base + col, h);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += h[k];
      }
    }
    for (int col = uncached; active && col < cols; col += step) {
      float t[VEC];
      load_input<T, VEC>(p, base + col, t);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += t[k];
    }
    const float mean = rms ? 0.0f : row_reduce(sum, smem, SumOp{}) / cols;

    float squares = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (active && i * step + first < cols) {
        float h[VEC];
        input_item<T, VEC, kItems>(p, cur, i, h);
#pragma unroll
        for (int k = 0; k < VEC; ++k) squares += (h[k] - mean) * (h[k] - mean);
      }
    }
    for (int col = uncached; active && col < cols; col += step) {
      float t[VEC];
      load_vec<T, VEC>(reread + base + col, t);
#pragma unroll
      for (int k = 0; k < VEC; ++k) squares += (t[k] - mean) * (t[k] - mean);
    }
    const float rstd = rsqrtf(row_reduce(squares, smem, SumOp{}) / cols + p.eps);

#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = i * step + first;
      if (active && col < cols) {
        float h[VEC];
        input_item<T, VEC, kItems>(p, cur, i, h);
        store_output<T, VEC>(p, base, col, h, mean, rstd);
      }
    }
    for (int col = uncached; active && col < cols; col += step) {
      float t[VEC];
      load_vec<T, VEC>(reread + base + col, t);
      store_output<T, VEC>(p, base, col, t, mean, rstd);
    }
    if (active && threadIdx.x == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    cur = next;
  }
}

// Loads grad_y and xhat = (h - mean) * rstd for VEC columns; g = grad_y * weight.
template <typename T, int VEC>
__device__ __forceinline__ void load_grad(const BackwardParams<T>& p, int64_t base, int col,
                                          float mean, float rstd, float (&dy)[VEC],
                                          float (&xhat)[VEC]) {
  load_vec<T, VEC>(p.grad_y + base + col, dy);
  load_vec<T, VEC>(p.h + base + col, xhat);
#pragma unroll
  for (int k = 0; k < VEC; ++k) xhat[k] = (xhat[k] - mean) * rstd;
}

template <typename T, int VEC>
__device__ __forceinline__ void weighted(const BackwardParams<T>& p, int col,
                                         const float (&dy)[VEC], float (&g)[VEC]) {
  if (p.weight != nullptr) {
    load_vec<T, VEC>(p.weight + col, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] *= dy[k];
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = dy[k];
  }
}

// dx = rstd * (g - xhat * c1 - c2) + grad_h for VEC columns.
template <typename T, int VEC>
__device__ __forceinline__ void store_dx(const BackwardParams<T>& p, int64_t base, int col,
                                         const float (&dy)[VEC], const float (&xhat)[VEC],
                                         float c1, float c2, float rstd) {
  float g[VEC], out[VEC];
  weighted<T, VEC>(p, col, dy, g);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = (g[k] - xhat[k] * c1 - c2) * rstd;
  if (p.grad_h != nullptr) {
    float gh[VEC];
    load_vec<T, VEC>(p.grad_h + base + col, gh);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] += gh[k];
  }
  store_vec<T, VEC>(p.dx + base + col, out);
}

// (sum(g * xhat), sum(g)) over the row -> (c1, c2) of store_dx.
__device__ __forceinline__ float2 dx_coefficients(float2 partial, float2* smem, int cols,
                                                  bool rms) {
  const float2 s = row_reduce(partial, smem, Sum2Op{});
  return make_float2(s.x / cols, rms ? 0.0f : s.y / cols);
}

// grad_y and xhat = (h - mean) * rstd of item i of the slice.
template <typename T, int VEC, int ITEMS>
__device__ __forceinline__ void slice_item(const SlicePair<T, VEC, ITEMS>& s, int i, float mean,
                                           float rstd, float (&dy)[VEC], float (&xhat)[VEC]) {
  unpack<T, VEC>(s.a[i], dy);
  unpack<T, VEC>(s.b[i], xhat);
#pragma unroll
  for (int k = 0; k < VEC; ++k) xhat[k] = (xhat[k] - mean) * rstd;
}

// sums[k] += a[k] for k < VEC, in shared memory (16-byte accesses when VEC allows).
template <int VEC>
__device__ __forceinline__ void add_to_shared(float* sums, const float (&a)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      float4* at = reinterpret_cast<float4*>(sums + k);
      float4 v = *at;
      v.x += a[k];
      v.y += a[k + 1];
      v.z += a[k + 2];
      v.w += a[k + 3];
      *at = v;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) sums[k] += a[k];
  }
}

// Dynamic shared memory of the fused backward: the dweight and dbias sums of every column a
// block of `threads` covers, or none without parameter gradients.
size_t fused_backward_smem(int threads, bool param_grads) {
  return param_grads ? 2 * static_cast<size_t>(threads) * kCached * sizeof(float) : 0;
}

// Persistent: block b handles rows b, b + gridDim.x, ...; blockDim = (threads <= MAX_THREADS, 1)
// and cols <= blockDim.x * kCached. A thread holds its columns of grad_y and h as stored (16-bit
// types two to a register) and loads the next row's before this row's reduction, so each block
// has two rows in flight. With parameter gradients (partial_w != nullptr) the per-column
// dweight/dbias sums stay in dynamic shared memory (fused_backward_smem; each thread adds to its
// own columns only) and go to partial_w/b[b * cols + col] at the end.
template <typename T, int VEC, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS, min_blocks_per_sm<T, MAX_THREADS>())
    layer_norm_backward_fused_kernel(BackwardParams<T> p, bool rms, float* partial_w,
                                     float* partial_b) {
  constexpr int kItems = kCached / VEC;
  __shared__ float2 smem[32];
  LK_DYNAMIC_SMEM(float, sums);
  const int cols = p.cols;
  const int step = blockDim.x * VEC;
  const int first = threadIdx.x * VEC;
  const bool param_grads = partial_w != nullptr;
  float* const sum_w = sums;                  // (kItems * step,)
  float* const sum_b = sums + kItems * step;  // (kItems * step,)
  if (param_grads) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = i * step + first;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        sum_w[col + k] = 0.0f;
        sum_b[col + k] = 0.0f;
      }
    }
  }
  SlicePair<T, VEC, kItems> cur, next;  // grad_y and h of this row and of the next
  auto load = [&](int64_t row, SlicePair<T, VEC, kItems>& s) {
    load_pair<T, VEC, kItems>(p.grad_y, p.h, p.rows, cols, row, step, first, s);
  };
  load(blockIdx.x, cur);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t base = row * cols;
    const float mean = p.mean != nullptr ? p.mean[row] : 0.0f;
    const float rstd = p.rstd[row];
    load(row + gridDim.x, next);
    float2 partial = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = i * step + first;
      if (col < cols) {
        float dy[VEC], xhat[VEC], g[VEC];
        slice_item<T, VEC, kItems>(cur, i, mean, rstd, dy, xhat);
        weighted<T, VEC>(p, col, dy, g);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          partial.x += g[k] * xhat[k];
          partial.y += g[k];
        }
      }
    }
    const float2 c = dx_coefficients(partial, smem, cols, rms);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = i * step + first;
      if (col < cols) {
        float dy[VEC], xhat[VEC], dy_xhat[VEC];
        slice_item<T, VEC, kItems>(cur, i, mean, rstd, dy, xhat);
        store_dx<T, VEC>(p, base, col, dy, xhat, c.x, c.y, rstd);
        if (param_grads) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) dy_xhat[k] = dy[k] * xhat[k];
          add_to_shared<VEC>(sum_w + col, dy_xhat);
          add_to_shared<VEC>(sum_b + col, dy);
        }
      }
    }
    cur = next;
  }
  if (!param_grads) return;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int col = i * step + first;
    if (col < cols) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        partial_w[static_cast<int64_t>(blockIdx.x) * cols + col + k] = sum_w[col + k];
        partial_b[static_cast<int64_t>(blockIdx.x) * cols + col + k] = sum_b[col + k];
      }
    }
  }
}

// dx only, one row per block, nothing cached (rows wider than the fused kernel takes).
template <typename T, int VEC>
__global__ void __launch_bounds__(kWideThreads)
    layer_norm_backward_dx_kernel(BackwardParams<T> p, bool rms) {
  __shared__ float2 smem[32];
  const int64_t row = blockIdx.x;
  const int64_t base = row * p.cols;
  const float mean = p.mean != nullptr ? p.mean[row] : 0.0f;
  const float rstd = p.rstd[row];
  const int step = blockDim.x * VEC;
  float2 partial = make_float2(0.0f, 0.0f);
  for (int col = threadIdx.x * VEC; col < p.cols; col += step) {
    float dy[VEC], xhat[VEC], g[VEC];
    load_grad<T, VEC>(p, base, col, mean, rstd, dy, xhat);
    weighted<T, VEC>(p, col, dy, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      partial.x += g[k] * xhat[k];
      partial.y += g[k];
    }
  }
  const float2 c = dx_coefficients(partial, smem, p.cols, rms);
  for (int col = threadIdx.x * VEC; col < p.cols; col += step) {
    float dy[VEC], xhat[VEC];
    load_grad<T, VEC>(p, base, col, mean, rstd, dy, xhat);
    store_dx<T, VEC>(p, base, col, dy, xhat, c.x, c.y, rstd);
  }
}

// Block (kColTile, kColLanes) sums grad_y * xhat and grad_y over the rows of chunk blockIdx.y
// for kColTile columns, into partial_w/b[blockIdx.y * cols + col].
template <typename T>
__global__ void __launch_bounds__(kColTile * kColLanes)
    layer_norm_param_partial_kernel(BackwardParams<T> p, int64_t rows_per_chunk,
                                    float* partial_w, float* partial_b) {
  __shared__ float2 lanes[kColLanes][kColTile];
  const int col = blockIdx.x * kColTile + threadIdx.x;
  const int64_t begin = blockIdx.y * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < p.rows ? begin + rows_per_chunk : p.rows;
  float2 acc = make_float2(0.0f, 0.0f);
  if (col < p.cols) {
    for (int64_t row = begin + threadIdx.y; row < end; row += kColLanes) {
      const float mean = p.mean != nullptr ? p.mean[row] : 0.0f;
      const float dy = to_float(p.grad_y[row * p.cols + col]);
      const float xhat = (to_float(p.h[row * p.cols + col]) - mean) * p.rstd[row];
      acc.x += dy * xhat;
      acc.y += dy;
    }
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || col >= p.cols) return;
  for (int lane = 1; lane < kColLanes; ++lane) {
    acc.x += lanes[lane][threadIdx.x].x;
    acc.y += lanes[lane][threadIdx.x].y;
  }
  const int64_t at = static_cast<int64_t>(blockIdx.y) * p.cols + col;
  partial_w[at] = acc.x;
  partial_b[at] = acc.y;
}

// out[col] = sum over parts of partial[part * cols + col], in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kColTile * kSumLanes)
    column_sum_kernel(const float* partial, int64_t parts, int cols, T* out) {
  __shared__ float lanes[kSumLanes][kColTile + 1];
  const int col = blockIdx.x * kColTile + threadIdx.x;
  float acc = 0.0f;
  if (col < cols) {
    for (int64_t part = threadIdx.y; part < parts; part += kSumLanes) acc += partial[part * cols + col];
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
  for (int lane = 1; lane < kSumLanes; ++lane) acc += lanes[lane][threadIdx.x];
  out[col] = from_float<T>(acc);
}

// ---- host side -------------------------------------------------------------------------------

template <typename T>
ForwardParams<T> forward_params(const NormForwardArgs& a) {
  return {static_cast<const T*>(a.x),    static_cast<const T*>(a.residual),
          static_cast<const T*>(a.weight), static_cast<const T*>(a.bias),
          static_cast<T*>(a.y),          static_cast<T*>(a.h),
          a.mean,                        a.rstd,
          a.rows,                        static_cast<int>(a.cols),
          a.eps};
}

template <typename T>
BackwardParams<T> backward_params(const NormBackwardArgs& a) {
  return {static_cast<const T*>(a.grad_y), static_cast<const T*>(a.grad_h),
          static_cast<const T*>(a.h),      static_cast<const T*>(a.weight),
          a.mean,                          a.rstd,
          static_cast<T*>(a.dx),           a.rows,
          static_cast<int>(a.cols)};
}

// The forward compiled for blocks of up to `threads` threads: 256 (three blocks per SM for
// 16-bit vectors) or kForwardThreads (always without vector loads, which would spill at 256).
template <typename T, int VEC>
auto forward_kernel(int threads) {
  if constexpr (VEC > 1) {
    if (threads <= 256) return layer_norm_forward_kernel<T, VEC, 256>;
  }
  return layer_norm_forward_kernel<T, VEC, kForwardThreads>;
}

// One block per group of shape.rows rows, at most as many as the GPU holds at once (the
// kernel is persistent).
template <typename T, int VEC>
void launch_forward(const NormForwardArgs& a, cudaStream_t stream) {
  const RowShape shape = row_shape(a.cols, VEC, kCached / VEC, kForwardThreads);
  const dim3 block(shape.threads, shape.rows);
  const int threads = shape.threads * shape.rows;
  const auto kernel = forward_kernel<T, VEC>(threads);
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  const int64_t resident = static_cast<int64_t>(num_sms()) * (per_sm > 0 ? per_sm : 1);
  const int64_t groups = ceil_div(a.rows, shape.rows);
  const unsigned grid = static_cast<unsigned>(groups < resident ? groups : resident);
  launch_kernel(kernel, grid, block, stream, forward_params<T>(a), a.rms);
}

bool param_grads(const NormBackwardArgs& a) { return a.dweight != nullptr || a.dbias != nullptr; }

// How the backward splits its work; the workspace holds 2 * partials * cols floats.
struct BackwardPlan {
  bool fused;
  int threads;       // per row (fused kernel)
  int64_t partials;  // rows of the dweight/dbias workspace: fused blocks or row chunks
};

// The fused backward compiled for blocks of up to `threads` threads (256 or backward_threads).
template <typename T, int VEC>
auto fused_backward_kernel(int threads) {
  if constexpr (backward_threads(VEC) > 256) {
    if (threads > 256) return layer_norm_backward_fused_kernel<T, VEC, backward_threads(VEC)>;
  }
  return layer_norm_backward_fused_kernel<T, VEC, 256>;
}

template <typename T, int VEC>
BackwardPlan backward_plan(const NormBackwardArgs& a) {
  const int64_t capacity = static_cast<int64_t>(backward_threads(VEC)) * kCached;
  if (a.cols <= capacity) {
    const int threads = row_shape(a.cols, VEC, kCached / VEC, backward_threads(VEC), 0).threads;
    const size_t smem = fused_backward_smem(threads, param_grads(a));
    const auto kernel = fused_backward_kernel<T, VEC>(threads);
    allow_dynamic_smem(kernel, smem);
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
    const int64_t blocks = static_cast<int64_t>(num_sms()) * (per_sm > 0 ? per_sm : 1);
    return {true, threads, blocks < a.rows ? blocks : a.rows};
  }
  const int64_t tiles = ceil_div(a.cols, kColTile);
  const int64_t chunks = ceil_div(4LL * num_sms(), tiles);
  return {false, kWideThreads, chunks < a.rows ? chunks : a.rows};
}

template <typename T, int VEC>
void launch_backward(const NormBackwardArgs& a, cudaStream_t stream) {
  const BackwardPlan plan = backward_plan<T, VEC>(a);
  const BackwardParams<T> p = backward_params<T>(a);
  const bool grads = param_grads(a);
  float* partial_w = grads ? a.workspace : nullptr;
  float* partial_b = grads ? a.workspace + plan.partials * a.cols : nullptr;
  if (plan.fused) {
    launch_kernel_smem(fused_backward_kernel<T, VEC>(plan.threads),
                       static_cast<unsigned>(plan.partials), plan.threads,
                       fused_backward_smem(plan.threads, grads), stream, p, a.rms, partial_w,
                       partial_b);
  } else {
    launch_kernel(layer_norm_backward_dx_kernel<T, VEC>, static_cast<unsigned>(a.rows),
                  kWideThreads, stream, p, a.rms);
    if (grads) {
      const dim3 grid(static_cast<unsigned>(ceil_div(a.cols, kColTile)),
                      static_cast<unsigned>(plan.partials));
      launch_kernel(layer_norm_param_partial_kernel<T>, grid, dim3(kColTile, kColLanes), stream,
                    p, ceil_div(a.rows, plan.partials), partial_w, partial_b);
    }
  }
  const unsigned col_blocks = static_cast<unsigned>(ceil_div(a.cols, kColTile));
  const dim3 sum_block(kColTile, kSumLanes);
  const int cols = static_cast<int>(a.cols);
  if (a.dweight != nullptr) {
    launch_kernel(column_sum_kernel<T>, col_blocks, sum_block, stream, partial_w, plan.partials,
                  cols, static_cast<T*>(a.dweight));
  }
  if (a.dbias != nullptr) {
    launch_kernel(column_sum_kernel<T>, col_blocks, sum_block, stream, partial_b, plan.partials,
                  cols, static_cast<T*>(a.dbias));
  }
}

template <typename T>
bool forward_vectorizable(const NormForwardArgs& a) {
  return vectorizable(a.cols, kVec16<T>, {a.x, a.residual, a.weight, a.bias, a.y, a.h});
}

template <typename T>
bool backward_vectorizable(const NormBackwardArgs& a) {
  return vectorizable(a.cols, kVec16<T>, {a.grad_y, a.grad_h, a.h, a.weight, a.dx});
}

}  // namespace

const char* layer_norm_forward_cuda(const NormForwardArgs& args, void* stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    if (forward_vectorizable<T>(args)) {
      launch_forward<T, kVec16<T>>(args, s);
    } else {
      launch_forward<T, 1>(args, s);
    }
    return launch_error();
  });
}

int64_t layer_norm_backward_workspace_floats(const NormBackwardArgs& args) {
  if (args.dweight == nullptr && args.dbias == nullptr) return 0;
  int64_t partials = 0;
  dispatch_dtype(args.dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    partials = backward_vectorizable<T>(args) ? backward_plan<T, kVec16<T>>(args).partials
                                              : backward_plan<T, 1>(args).partials;
    return nullptr;
  });
  return 2 * partials * args.cols;
}

const char* layer_norm_backward_cuda(const NormBackwardArgs& args, void* stream) {
  return dispatch_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    if (backward_vectorizable<T>(args)) {
      launch_backward<T, kVec16<T>>(args, s);
    } else {
      launch_backward<T, 1>(args, s);
    }
    return launch_error();
  });
}

}  // namespace lk
