// The implicit-GEMM conv_bias_act for bfloat16 (one dtype per file, so the
// dtypes compile in parallel).
#include <cutlass/bfloat16.h>

#include "conv_cutlass.cuh"

namespace resnet_fast::gpu {

std::string launch_conv_cutlass_bf16(const CutlassConvArgs& args, CutlassKernel kernel) {
  return run_conv_cutlass<cutlass::bfloat16_t, cutlass::bfloat16_t>(args, kernel);
}

}  // namespace resnet_fast::gpu
