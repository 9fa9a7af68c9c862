// Argument validation shared by the CPU and CUDA implementations, so both
// reject bad input with the same messages.
#include "resnet_fast.h"

namespace resnet_fast {

void check_bias_act_args(const at::Tensor& y, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual) {
  check_activation(y, "y");
  check_channel_vector(y, bias, "bias");
  if (residual.has_value()) check_same_shape(y, *residual, "residual");
}

void check_bn_train_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual) {
  check_activation(x, "x");
  check_channel_vector(x, weight, "weight");
  check_channel_vector(x, bias, "bias");
  if (residual.has_value()) check_same_shape(x, *residual, "residual");
  TORCH_CHECK(rows_of(x) > 1, "resnet_fast: batch norm in training needs more than 1 value per channel, got input of shape ",
              x.sizes());
}

void check_bn_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                            const at::Tensor& weight, const at::Tensor& save_mean,
                            const at::Tensor& save_invstd) {
  check_activation(x, "x");
  check_same_shape(x, grad_out, "grad_out");
  check_same_shape(x, out, "out");
  check_channel_vector(x, weight, "weight");
  check_channel_vector(x, save_mean, "save_mean");
  check_channel_vector(x, save_invstd, "save_invstd");
  TORCH_CHECK(save_mean.scalar_type() == at::kFloat && save_invstd.scalar_type() == at::kFloat,
              "resnet_fast: save_mean and save_invstd must be float32 (as bn_act_train returns them)");
}

namespace {

void check_conv_weight(const at::Tensor& x, const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(weight.dim() == 4, "resnet_fast: weight must be 4-D (K, C/groups, R, S), got ", weight.dim(), "-D");
  TORCH_CHECK(weight.device() == x.device(), "resnet_fast: weight is on ", weight.device(),
              " but the input is on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "resnet_fast: weight has dtype ", weight.scalar_type(),
              " but the input has ", x.scalar_type());
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && weight.size(0) % groups == 0,
              "resnet_fast: groups=", groups, " must divide the input channels (", x.size(1),
              ") and the output channels (", weight.size(0), ")");
  TORCH_CHECK(weight.size(1) * groups == x.size(1), "resnet_fast: input has ", x.size(1),
              " channels but weight expects ", weight.size(1) * groups, " (", weight.size(1),
              " per group x ", groups, " groups)");
}

}  // namespace

void check_pair(at::IntArrayRef values, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2 && values[0] >= minimum && values[1] >= minimum, "resnet_fast: ", name,
              " must be two integers >= ", minimum, ", got ", values);
}

void check_conv_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_activation(x, "x");
  check_conv_weight(x, weight, groups);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "resnet_fast: bias must have shape [",
              weight.size(0), "] (one value per output channel), got ", bias.sizes());
  TORCH_CHECK(bias.device() == x.device(), "resnet_fast: bias is on ", bias.device(), " but the input is on ",
              x.device());
  std::vector<int64_t> out_shape{x.size(0), weight.size(0)};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = dilation[d] * (weight.size(2 + d) - 1) + 1;
    const int64_t size = conv_output_size(x.size(2 + d), weight.size(2 + d), stride[d], padding[d], dilation[d]);
    TORCH_CHECK(x.size(2 + d) + 2 * padding[d] >= extent, "resnet_fast: input of spatial size ",
                x.sizes().slice(2), " is smaller than the (dilated) kernel ", weight.sizes().slice(2),
                " with padding ", padding);
    out_shape.push_back(size);
  }
  if (residual.has_value()) {
    check_same(x, *residual, "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), "resnet_fast: residual has shape ",
                residual->sizes(), " but the convolution's output has shape ", at::IntArrayRef(out_shape));
  }
}

at::Tensor conv_nhwc(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return at::convolution(as_nhwc(x), weight.contiguous(at::MemoryFormat::ChannelsLast), std::nullopt,
                         stride, padding, effective_dilation(weight, dilation), /*transposed=*/false,
                         /*output_padding=*/{0, 0}, groups)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace resnet_fast
