// The CUDA-only parts of the row-wise kernels: the CUDA headers and the kernel launch.
// cuda_utils.cuh includes this header unless LK_CUDA_EMULATION is defined; the CPU emulator
// (tests/cuda_emulation) then provides the same names, so that it runs the real kernels
// through their real host entry points.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Declares `name`, the block's dynamic shared memory as an array of `type` (16-byte aligned). A
// macro: a function returning the pointer changes the code nvcc generates for the kernels.
#define LK_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]

namespace lk {

// kernel<<<grid, block, 0, stream>>>(args...).
template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
}

// Lets `kernel` launch with `smem` bytes of dynamic shared memory (over 48 KB must be opted
// into; the occupancy calculator also needs it).
template <typename... KernelArgs>
void allow_dynamic_smem(void (*kernel)(KernelArgs...), size_t smem) {
  if (smem > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
  }
}

// kernel<<<grid, block, smem, stream>>>(args...), with `smem` allowed first.
template <typename... KernelArgs, typename... Args>
void launch_kernel_smem(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                        cudaStream_t stream, Args... args) {
  allow_dynamic_smem(kernel, smem);
  kernel<<<grid, block, smem, stream>>>(args...);
}

}  // namespace lk
