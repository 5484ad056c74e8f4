// The float32 SIMT attention forward kernels (see attention_cuda_launch.cuh).
#include "attention_cuda_launch.cuh"

namespace lk::attn {

void forward_f32(const Params& p, const CudaLaunch& launch) { launch_forward<float>(p, launch); }

}  // namespace lk::attn
