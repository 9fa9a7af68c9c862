// CUDA kernels of the resnet_fast ops. conv_bias_act is our implicit-GEMM
// convolution with the epilogue fused (conv_cutlass.h) where it can run, and
// elsewhere cuDNN's convolution (through aten) followed by our fused
// epilogue, in place on its NHWC output; or, where asked for
// (RESNET_FAST_CUDA_CONV / cuda_conv_family "cudnn_fused"), cuDNN's own fused
// operator.
#include <ATen/ops/cudnn_convolution_add_relu.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../resnet_fast.h"
#include "conv_cutlass.h"
#include "cuda_ops.h"

namespace resnet_fast::gpu {

namespace {

// relu(conv(x, weight) + bias + residual) by cuDNN's own fused operators.
at::Tensor conv_bias_relu_cudnn_fused(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const at::Tensor x_nhwc = as_nhwc(x);
  const at::Tensor weight_nhwc = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor bias_like_x = bias.to(x.scalar_type());  // cuDNN takes the bias in the input's dtype
  const at::Tensor out =
      residual.has_value()
          ? at::cudnn_convolution_add_relu(x_nhwc, weight_nhwc, as_nhwc(*residual), /*alpha=*/1.0, bias_like_x, stride,
                                           padding, dilation, groups)
          : at::cudnn_convolution_relu(x_nhwc, weight_nhwc, bias_like_x, stride, padding, dilation, groups);
  return as_nhwc(out);
}

}  // namespace

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  check_cuda(x, "x");
  check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups);
  const at::cuda::CUDAGuard guard(x.device());
  if (use_cudnn_fused(relu))
    return conv_bias_relu_cudnn_fused(x, weight, bias, residual, stride, padding, dilation, groups);
  if (requested_conv_algorithm().algorithm != ConvAlgorithm::kCudnn) {
    const at::Tensor x_nhwc = as_nhwc(x);
    const at::Tensor weight_nhwc = weight.contiguous(at::MemoryFormat::ChannelsLast);
    std::optional<at::Tensor> residual_nhwc;
    if (residual.has_value()) residual_nhwc = as_nhwc(*residual);
    if (!cudnn_reason(x_nhwc, weight_nhwc, residual_nhwc, stride, padding, dilation, groups).has_value())
      return conv_bias_act_cutlass(x_nhwc, weight_nhwc, bias, residual_nhwc, stride, padding, dilation, relu);
  }
  at::Tensor y = conv_nhwc(x, weight, stride, padding, dilation, groups);  // fresh, channels_last
  bias_act_inplace(y, bias, residual, relu);
  return y;
}

}  // namespace resnet_fast::gpu

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("conv_bias_act", &resnet_fast::gpu::conv_bias_act);
  m.impl("bias_act", &resnet_fast::gpu::bias_act);
  m.impl("bias_act_backward", &resnet_fast::gpu::bias_act_backward);
  m.impl("bn_act_train", &resnet_fast::gpu::bn_act_train);
  m.impl("bn_act_backward", &resnet_fast::gpu::bn_act_backward);
}
