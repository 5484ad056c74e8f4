// The tensor-core backward kernels for float16 (see attention_cuda_launch.cuh).
#include "attention_cuda_launch.cuh"

namespace lk::attn {

void backward_f16(const Params& p, const CudaLaunch& launch) { launch_backward<__half>(p, launch); }

}  // namespace lk::attn
