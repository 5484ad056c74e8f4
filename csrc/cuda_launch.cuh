// The CUDA-only parts of the row-wise kernels: the CUDA headers and the kernel launch.
// cuda_utils.cuh includes this header unless LK_CUDA_EMULATION is defined; the CPU emulator
// (tests/cuda_emulation) then provides the same names, so that it runs the real kernels
// through their real host entry points.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lk {

// kernel<<<grid, block, 0, stream>>>(args...).
template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
}

}  // namespace lk
