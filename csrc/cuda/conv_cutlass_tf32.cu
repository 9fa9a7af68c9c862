// The implicit-GEMM conv_bias_act for float32 tensors on TF32 tensor cores
// (only when PyTorch's cuDNN TF32 switch allows it; one dtype per file, so
// the dtypes compile in parallel).
#include "conv_cutlass.cuh"

namespace resnet_fast::gpu {

std::string launch_conv_cutlass_tf32(const CutlassConvArgs& args, CutlassKernel kernel) {
  // float, not tfloat32_t, as the operand type: CUTLASS then rounds each
  // operand to TF32 (to nearest) before the mma; tfloat32_t would truncate.
  return run_conv_cutlass<float, float>(args, kernel);
}

}  // namespace resnet_fast::gpu
