// The implicit-GEMM conv_bias_act for float32 tensors on TF32 tensor cores
// (only when PyTorch's cuDNN TF32 switch allows it; one kernel per file, so
// the dtypes compile in parallel).
#include <cutlass/tfloat32.h>

#include "conv_cutlass.cuh"

namespace resnet_fast::gpu {

std::string launch_conv_cutlass_tf32(const CutlassConvArgs& args) {
  return run_conv_cutlass<cutlass::tfloat32_t, float>(args);
}

}  // namespace resnet_fast::gpu
