// The tensor-core forward and flash-decoding kernels for float16 (see attention_cuda_launch.cuh).
#include "attention_cuda_launch.cuh"

namespace lk::attn {

void forward_f16(const Params& p, const CudaLaunch& launch) { launch_forward<__half>(p, launch); }

}  // namespace lk::attn
