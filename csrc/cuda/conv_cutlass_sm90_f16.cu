// The Hopper conv_bias_act kernels for float16 (one dtype per file, so the
// dtypes compile in parallel).
#include <ATen/cuda/CUDAContext.h>

#include "conv_cutlass_sm90.cuh"

namespace resnet_fast::gpu {

std::string launch_conv_sm90_f16(const CutlassConvArgs& args) {
  return sm90::launch<cutlass::half_t>(args, at::cuda::getCurrentCUDAStream());
}

std::string sm90_unsupported_f16(const CutlassConvArgs& args) { return sm90::unsupported<cutlass::half_t>(args); }

}  // namespace resnet_fast::gpu
