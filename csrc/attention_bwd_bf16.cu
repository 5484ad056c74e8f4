// The tensor-core backward kernels for bfloat16 (see attention_cuda_launch.cuh).
#include "attention_cuda_launch.cuh"

namespace lk::attn {

void backward_bf16(const Params& p, const CudaLaunch& launch) {
  launch_backward<__nv_bfloat16>(p, launch);
}

}  // namespace lk::attn
