// Feed-forward epilogues (math in kernels.h and common.h): the activation after the first GEMM
// and its backward in one pass, swiglu's silu(gate) * up and its backward in one pass. The GEMMs
// run in cuBLAS through at::addmm/at::mm (csrc/bindings.cpp). Grid-stride elementwise kernels
// with 16-byte vectors when every pointer allows them.
#include "cuda_utils.cuh"
#include "kernels.h"

namespace lk {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

// Visits the VEC-element vectors of [0, n) with a grid-stride loop.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_vector(int64_t n, F&& f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n;
       i += stride) {
    f(i);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    activation_forward_kernel(const T* pre, T* out, int64_t n, Activation act) {
  for_each_vector<VEC>(n, [&](int64_t i) {
    float v[VEC];
    load_vec<T, VEC>(pre + i, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = activation(act, v[k]);
    store_vec<T, VEC>(out + i, v);
  });
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    activation_backward_kernel(const T* pre, const T* grad_out, T* out, T* grad_pre, int64_t n,
                               Activation act) {
  for_each_vector<VEC>(n, [&](int64_t i) {
    float x[VEC], g[VEC], y[VEC];
    load_vec<T, VEC>(pre + i, x);
    load_vec<T, VEC>(grad_out + i, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      y[k] = activation(act, x[k]);
      g[k] *= activation_grad(act, x[k]);
    }
    store_vec<T, VEC>(out + i, y);
    store_vec<T, VEC>(grad_pre + i, g);
  });
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(const T* gate, const T* up, T* out, int64_t n) {
  for_each_vector<VEC>(n, [&](int64_t i) {
    float g[VEC], u[VEC];
    load_vec<T, VEC>(gate + i, g);
    load_vec<T, VEC>(up + i, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = silu(g[k]) * u[k];
    store_vec<T, VEC>(out + i, g);
  });
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const T* gate, const T* up, const T* grad_out, T* out, T* grad_gate,
                           T* grad_up, int64_t n) {
  for_each_vector<VEC>(n, [&](int64_t i) {
    float g[VEC], u[VEC], d[VEC], y[VEC], dg[VEC], du[VEC];
    load_vec<T, VEC>(gate + i, g);
    load_vec<T, VEC>(up + i, u);
    load_vec<T, VEC>(grad_out + i, d);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float s = silu(g[k]);
      y[k] = s * u[k];
      dg[k] = d[k] * u[k] * silu_grad(g[k]);
      du[k] = d[k] * s;
    }
    store_vec<T, VEC>(out + i, y);
    store_vec<T, VEC>(grad_gate + i, dg);
    store_vec<T, VEC>(grad_up + i, du);
  });
}

unsigned grid_for(int64_t n, int vec) {
  const int64_t wanted = ceil_div(ceil_div(n, vec), kThreads);
  const int64_t cap = static_cast<int64_t>(num_sms()) * kBlocksPerSm;
  return static_cast<unsigned>(wanted < cap ? wanted : cap);
}

// Launches kernel<T, VEC> with VEC = 16 bytes when n and every pointer allow it, else 1.
template <typename T, typename Launch>
const char* launch_elementwise(int64_t n, std::initializer_list<const void*> ptrs, Launch&& launch) {
  if (vectorizable(n, kVec16<T>, ptrs)) {
    launch(std::integral_constant<int, kVec16<T>>{}, grid_for(n, kVec16<T>));
  } else {
    launch(std::integral_constant<int, 1>{}, grid_for(n, 1));
  }
  return launch_error();
}

}  // namespace

const char* activation_forward_cuda(const ActivationForwardArgs& a, void* stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_elementwise<T>(a.n, {a.pre, a.out}, [&](auto vec, unsigned grid) {
      launch_kernel(activation_forward_kernel<T, decltype(vec)::value>, grid, kThreads,
                    static_cast<cudaStream_t>(stream), static_cast<const T*>(a.pre),
                    static_cast<T*>(a.out), a.n, a.act);
    });
  });
}

const char* activation_backward_cuda(const ActivationBackwardArgs& a, void* stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_elementwise<T>(a.n, {a.pre, a.grad_out, a.out, a.grad_pre},
                                 [&](auto vec, unsigned grid) {
      launch_kernel(activation_backward_kernel<T, decltype(vec)::value>, grid, kThreads,
                    static_cast<cudaStream_t>(stream), static_cast<const T*>(a.pre),
                    static_cast<const T*>(a.grad_out), static_cast<T*>(a.out),
                    static_cast<T*>(a.grad_pre), a.n, a.act);
    });
  });
}

const char* swiglu_forward_cuda(const SwigluForwardArgs& a, void* stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_elementwise<T>(a.n, {a.gate, a.up, a.out}, [&](auto vec, unsigned grid) {
      launch_kernel(swiglu_forward_kernel<T, decltype(vec)::value>, grid, kThreads,
                    static_cast<cudaStream_t>(stream), static_cast<const T*>(a.gate),
                    static_cast<const T*>(a.up), static_cast<T*>(a.out), a.n);
    });
  });
}

const char* swiglu_backward_cuda(const SwigluBackwardArgs& a, void* stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_elementwise<T>(a.n, {a.gate, a.up, a.grad_out, a.out, a.grad_gate, a.grad_up},
                                 [&](auto vec, unsigned grid) {
      launch_kernel(swiglu_backward_kernel<T, decltype(vec)::value>, grid, kThreads,
                    static_cast<cudaStream_t>(stream), static_cast<const T*>(a.gate),
                    static_cast<const T*>(a.up), static_cast<const T*>(a.grad_out),
                    static_cast<T*>(a.out), static_cast<T*>(a.grad_gate),
                    static_cast<T*>(a.grad_up), a.n);
    });
  });
}

}  // namespace lk
