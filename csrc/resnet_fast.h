// Shared declarations of the resnet_fast extension: input checks used by every
// device, and the NHWC view that all kernels work on.
#pragma once

#include <ATen/ATen.h>

namespace resnet_fast {

// Every kernel sees a 4-D tensor as an [M = N*H*W, C] row-major matrix: the
// channels_last memory order. Inputs in any other layout are copied once.
inline at::Tensor as_nhwc(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

inline int64_t rows_of(const at::Tensor& t) { return t.numel() / t.size(1); }

inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "resnet_fast: ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kDouble,
              "resnet_fast: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.numel() > 0, "resnet_fast: ", name, " is empty (shape ", t.sizes(), ")");
}

inline void check_same(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "resnet_fast: ", name, " is on ", t.device(),
              " but the input is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "resnet_fast: ", name, " has dtype ",
              t.scalar_type(), " but the input has ", ref.scalar_type());
}

inline void check_same_shape(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  check_same(ref, t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "resnet_fast: ", name, " has shape ", t.sizes(),
              ", expected ", ref.sizes());
}

// A per-channel vector of C values on the input's device (any float dtype).
inline void check_channel_vector(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "resnet_fast: ", name, " is on ", t.device(),
              " but the input is on ", ref.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(1), "resnet_fast: ", name,
              " must have shape [", ref.size(1), "] (one value per channel), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "resnet_fast: ", name,
              " must be floating point, got ", t.scalar_type());
}

// The dilation with 1 along every kernel dimension of size 1, where dilation
// changes nothing: oneDNN crashes on some channels_last convolutions with a
// dilated size-1 kernel dimension (e.g. a 3x1 kernel, dilation 2, stride 2,
// input width 1), so no convolution is handed one.
inline std::vector<int64_t> effective_dilation(const at::Tensor& weight, at::IntArrayRef dilation) {
  std::vector<int64_t> result(dilation.begin(), dilation.end());
  for (size_t d = 0; d < result.size() && d + 2 < static_cast<size_t>(weight.dim()); ++d)
    if (weight.size(2 + d) == 1) result[d] = 1;
  return result;
}

// a / b rounded up, for positive a and b.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output size of a convolution along one spatial dimension.
inline int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// The CUDA convolution family this thread prefers for conv_bias_act
// (resnet_fast.ops.cuda_conv_family; per-layer plans set it around a
// layer). A preference: where its family cannot run a convolution, the
// automatic choice does; RESNET_FAST_CUDA_CONV, when set, overrides it.
enum class CudaConvFamily : int { kAuto, kCutlassSm90, kCutlassSm80, kCudnn, kCudnnFused };
CudaConvFamily preferred_cuda_conv_family();

// Validation shared by every device's implementation of each op.
void check_bias_act_args(const at::Tensor& y, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual);
void check_bn_train_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual);
void check_bn_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                            const at::Tensor& weight, const at::Tensor& save_mean,
                            const at::Tensor& save_invstd);
// Every argument of conv_bias_act: shapes, channel counts, groups, residual
// shape against the convolution's output shape.
// values: two integers (an int[2] of a schema), each at least minimum.
void check_pair(at::IntArrayRef values, const char* name, int64_t minimum);

void check_conv_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
// The convolution without bias, in NHWC (aten: oneDNN on the CPU, cuDNN on
// CUDA), for a caller that then applies the epilogue; call check_conv_args
// first.
at::Tensor conv_nhwc(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

}  // namespace resnet_fast
