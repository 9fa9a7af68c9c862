// conv_bias_act on the CPU. The convolution runs in oneDNN with the epilogue
// fused into it as post-ops (bias, residual add, ReLU), which measured faster
// than aten's convolution followed by our separate epilogue pass (see
// benchmarks/cpu_conv_paths.py). Other dtypes take the second
// route: aten convolution, then the in-place epilogue.
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>

#include "../resnet_fast.h"
#include "cpu_ops.h"

namespace resnet_fast::cpu {

namespace {

bool onednn_fuses(const at::Tensor& x) {
  // Only fp32: for bfloat16 oneDNN's fused add+ReLU falls back to an aten
  // kernel that does not support it for some shapes (grouped convolutions).
  return at::hasMKLDNN() && x.scalar_type() == at::kFloat;
}

// mkldnn::_convolution_pointwise[.binary] through the dispatcher (boxed, so
// this file does not depend on the exact C++ signature of aten's private ops).
at::Tensor onednn_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const c10::List<std::optional<at::Scalar>> no_scalars;
  torch::jit::Stack stack;
  if (residual.has_value()) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary");
    // The binary form takes "no unary op" as None, not "none".
    const c10::IValue unary_attr = relu ? c10::IValue(std::string("relu")) : c10::IValue();
    stack = {x, as_nhwc(*residual), weight, bias, padding.vec(), stride.vec(), dilation.vec(), groups,
             std::string("add"), at::Scalar(1.0), unary_attr, no_scalars, c10::IValue()};
    op.callBoxed(&stack);
  } else {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
    stack = {x, weight, bias, padding.vec(), stride.vec(), dilation.vec(), groups, std::string(relu ? "relu" : "none"),
             no_scalars, std::string("")};
    op.callBoxed(&stack);
  }
  return stack[0].toTensor();
}

// oneDNN's fused ReLU is max(v, 0), which turns NaN into 0 where torch.relu
// (and the reference) keeps it. A NaN can only come from a non-finite operand,
// so the ReLU is fused only when every operand is finite: a sum is finite only
// then (or after an overflow, which just takes the unfused route). A prepacked
// weight is finite (prepack_conv_weight packs no other).
bool finite_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const std::optional<at::Tensor>& residual) {
  const auto finite = [](const at::Tensor& t) { return std::isfinite(t.sum(at::kFloat).item<float>()); };
  return finite(bias) && (weight.is_mkldnn() || finite(weight)) && (!residual.has_value() || finite(*residual)) &&
         finite(x);
}

}  // namespace

at::Tensor conv_bias_act(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  check_conv_args(x_in, weight, bias, residual, stride, padding, dilation, groups);
  if (weight.is_mkldnn())
    TORCH_CHECK(onednn_fuses(x_in), "resnet_fast: a prepacked (mkldnn) weight needs float32 input, got ",
                x_in.scalar_type());
  if (onednn_fuses(x_in)) {
    const at::Tensor w = weight.is_mkldnn() ? weight : weight.contiguous(at::MemoryFormat::ChannelsLast);
    // Some oneDNN builds (torch 2.11's) cannot create the fused residual add
    // when the residual's NHWC strides are ambiguous, a single pixel or a
    // single channel ("could not create a memory"); there the residual is
    // added after the convolution, which costs little at those sizes.
    const bool fuse_residual =
        residual.has_value() && residual->size(1) > 1 && residual->size(2) * residual->size(3) > 1;
    const bool fuse_relu =
        relu && (fuse_residual || !residual.has_value()) && finite_operands(x_in, weight, bias, residual);
    // oneDNN picks its output layout from the input's strides, which are
    // ambiguous for some shapes (C == 1, H == W == 1): the contract is NHWC.
    at::Tensor out = onednn_conv(as_nhwc(x_in), w, bias.to(x_in.scalar_type()),
                                 fuse_residual ? residual : std::nullopt, stride, padding,
                                 effective_dilation(weight, dilation), groups, fuse_relu)
                         .contiguous(at::MemoryFormat::ChannelsLast);
    if (residual.has_value() && !fuse_residual) out.add_(*residual);
    if (relu && !fuse_relu) out.relu_();
    return out;
  }
  at::Tensor y = conv_nhwc(x_in, weight, stride, padding, dilation, groups);
  bias_act_inplace(y, bias, residual, relu);
  return y;
}

}  // namespace resnet_fast::cpu
