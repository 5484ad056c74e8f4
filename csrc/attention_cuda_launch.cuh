// The CUDA side of the attention launch plans (attention_launch.cuh): the launcher and one entry
// per pass and dtype, each defined in a translation unit of its own (attention_{fwd,bwd}_{f16,
// bf16,f32}.cu), so that the build compiles the kernels in parallel: in one file they took about
// 65 s, the longest unit now takes 26 s (sm_90, this machine). attention_cuda.cu, the host entry
// points, calls them. No ATen headers here.
#pragma once

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include "attention_launch.cuh"
#include "check.h"

namespace lk::attn {

// Launches kernel<<<grid, threads, smem, stream>>>(args...), raising the kernel's shared memory
// limit when it needs over 48 KB; smem_limit is the device's opt-in limit per block.
struct CudaLaunch {
  cudaStream_t stream;
  size_t smem_limit;

  template <typename... KernelArgs, typename... Args>
  void operator()(void (*kernel)(KernelArgs...), dim3 grid, int threads, size_t smem,
                  Args... args) const {
    if (grid.x == 0 || grid.y == 0) return;
    LK_CHECK(smem <= smem_limit, "llm_kernels::attention: this head dim needs ", smem,
             " bytes of shared memory per block, the GPU allows ", smem_limit,
             "; use backend='triton' or 'torch' for it");
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    kernel<<<grid, threads, smem, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// out and lse of p (launch_forward): tensor cores for float16 / bfloat16, SIMT for float32.
void forward_f16(const Params& p, const CudaLaunch& launch);
void forward_bf16(const Params& p, const CudaLaunch& launch);
void forward_f32(const Params& p, const CudaLaunch& launch);

// delta, dq, dk, dv of p (launch_backward), likewise.
void backward_f16(const Params& p, const CudaLaunch& launch);
void backward_bf16(const Params& p, const CudaLaunch& launch);
void backward_f32(const Params& p, const CudaLaunch& launch);

}  // namespace lk::attn
