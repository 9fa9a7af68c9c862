// The implicit-GEMM conv_bias_act for float16 (one dtype per file, so the
// dtypes compile in parallel).
#include <cutlass/half.h>

#include "conv_cutlass.cuh"

namespace resnet_fast::gpu {

std::string launch_conv_cutlass_f16(const CutlassConvArgs& args, CutlassKernel kernel) {
  return run_conv_cutlass<cutlass::half_t, cutlass::half_t>(args, kernel);
}

}  // namespace resnet_fast::gpu
