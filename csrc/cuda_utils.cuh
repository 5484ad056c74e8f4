// Device helpers for the row-wise CUDA kernels: dtype conversion, 16-byte vector access,
// reductions over the threads of one row, launch shapes and error reporting. No torch headers.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "common.h"
#ifndef LK_CUDA_EMULATION
#include "cuda_launch.cuh"  // CUDA headers, launch_kernel
#endif

namespace lk {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC elements moved as one aligned access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The VEC elements at p as they are stored (16-bit types: two to a register); p is VEC-aligned.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// out[k] = float(pack.v[k]) for k < VEC.
template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Pack<T, VEC>& pack, float (&out)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(pack.v[k]);
}

// out[k] = float(p[k]) for k < VEC; p is VEC-aligned.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  unpack<T, VEC>(load_pack<T, VEC>(p), out);
}

// p[k] = T(in[k]) for k < VEC; p is VEC-aligned.
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// Elements per 16-byte vector of T.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// True when every non-null pointer is 16-byte aligned and rows of `cols` elements keep it so.
inline bool vectorizable(int64_t cols, int vec, std::initializer_list<const void*> ptrs) {
  if (cols % vec != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, v.max, offset),
                       __shfl_xor_sync(0xffffffffu, v.sum, offset)};
    v = merge(v, other);
  }
  return v;
}

// Associative combines for row_reduce: op(a, b) and its warp-wide version.
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
  __device__ float warp(float v) const { return warp_sum(v); }
};

struct Sum2Op {
  __device__ float2 operator()(float2 a, float2 b) const { return make_float2(a.x + b.x, a.y + b.y); }
  __device__ float2 warp(float2 v) const { return make_float2(warp_sum(v.x), warp_sum(v.y)); }
};

struct MergeOp {
  __device__ MaxSum operator()(MaxSum a, MaxSum b) const { return merge(a, b); }
  __device__ MaxSum warp(MaxSum v) const { return warp_merge(v); }
};

// Blocks are (threads per row, rows per block); blockDim.x is a multiple of 32, so a warp never
// spans two rows. row_reduce combines `v` over the blockDim.x threads of this thread's row
// (threadIdx.y), in a fixed order, and returns the result to all of them. Every thread of the
// block must call it (it synchronizes); `smem` holds at least 32 values of V.
template <typename V, typename Op>
__device__ __forceinline__ V row_reduce(V v, V* smem, Op op) {
  v = op.warp(v);
  if (blockDim.x == 32) return v;
  const int warps = blockDim.x / 32;
  V* row_smem = smem + threadIdx.y * warps;
  __syncthreads();  // the previous reduction has finished reading smem
  if (threadIdx.x % 32 == 0) row_smem[threadIdx.x / 32] = v;
  __syncthreads();
  V total = row_smem[0];
  for (int w = 1; w < warps; ++w) total = op(total, row_smem[w]);
  return total;
}

// Launch shape of a row kernel: `threads` per row (a power of two in [32, max_threads]) so that
// each thread handles about `items` vectors, and `rows` per block to reach min_block_threads.
struct RowShape {
  int threads;
  int rows;
};

inline RowShape row_shape(int64_t cols, int vec, int items, int max_threads,
                          int min_block_threads = 128) {
  const int64_t wanted = ceil_div(ceil_div(cols, vec), items);
  int threads = 32;
  while (threads < wanted && threads < max_threads) threads *= 2;
  const int rows = threads >= min_block_threads ? 1 : min_block_threads / threads;
  return {threads, rows};
}

// Streaming multiprocessors of the current device.
inline int num_sms() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}

// nullptr after a successful launch, else the CUDA error string.
inline const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Calls f(T{}) with T the CUDA element type of `dtype`.
template <typename F>
const char* dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    default:
      return f(__nv_bfloat16{});
  }
}

}  // namespace lk
