// The float32 SIMT attention backward kernels (see attention_cuda_launch.cuh).
#include "attention_cuda_launch.cuh"

namespace lk::attn {

void backward_f32(const Params& p, const CudaLaunch& launch) { launch_backward<float>(p, launch); }

}  // namespace lk::attn
