// The Hopper conv_bias_act kernels for bfloat16 (one dtype per file, so the
// dtypes compile in parallel).
#include <ATen/cuda/CUDAContext.h>

#include "conv_cutlass_sm90.cuh"

namespace resnet_fast::gpu {

std::string launch_conv_sm90_bf16(const CutlassConvArgs& args) {
  return sm90::launch<cutlass::bfloat16_t>(args, at::cuda::getCurrentCUDAStream());
}

std::string sm90_unsupported_bf16(const CutlassConvArgs& args) { return sm90::unsupported<cutlass::bfloat16_t>(args); }

}  // namespace resnet_fast::gpu
