// The tensor-core forward and flash-decoding kernels for bfloat16 (see attention_cuda_launch.cuh).
#include "attention_cuda_launch.cuh"

namespace lk::attn {

void forward_bf16(const Params& p, const CudaLaunch& launch) {
  launch_forward<__nv_bfloat16>(p, launch);
}

}  // namespace lk::attn
