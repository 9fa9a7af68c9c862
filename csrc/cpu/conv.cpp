// conv_bias_act (and conv_bias_act_, the same written into the residual) on
// the CPU. For float32, and for bfloat16/float16 with a weight prepacked in
// that dtype, the convolution runs in oneDNN with the epilogue fused into it
// as post-ops (bias, residual add, ReLU), which measured faster than aten's
// convolution followed by our separate epilogue pass (the per-layer
// benchmark's "conv+epilogue" row, benchmarks/conv_layers.py). Other
// calls take that second route: aten convolution, then the in-place epilogue.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>


#include "../resnet_fast.h"
#include "cpu_ops.h"

namespace resnet_fast::cpu {

namespace {

bool onednn_fuses(const at::Tensor& x, const at::Tensor& weight) {
  if (!at::hasMKLDNN()) return false;
  if (x.scalar_type() == at::kFloat) return !weight.is_mkldnn() || weight.scalar_type() == at::kFloat;
  // Half precision only with a weight prepacked in that dtype, which
  // prepack_conv_weight makes only where oneDNN has the CPU kernels and for
  // one group: for grouped bfloat16 convolutions oneDNN's fused add+ReLU
  // falls back to an aten kernel that does not support it.
  return weight.is_mkldnn() && weight.scalar_type() == x.scalar_type();
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

// Set by a whole-network forward that has checked its input (see
// activations_known_finite in cpu_ops.h).
thread_local bool known_finite_activations = false;

// A prepacked weight is finite: prepack_conv_weight packs no other.
bool finite_parameters(const at::Tensor& weight, const at::Tensor& bias) {
  return all_finite(bias) && (weight.is_mkldnn() || all_finite(weight));
}

// A layer with a non-finite weight or bias may put NaN or Inf into the
// activations: the network's vouching for them ends there.
void note_parameters(const at::Tensor& weight, const at::Tensor& bias) {
  if (known_finite_activations && !finite_parameters(weight, bias)) known_finite_activations = false;
}

// Whether the ReLU may be fused into oneDNN's convolution, whose ReLU is
// max(v, 0): it turns NaN into 0 where torch.relu (and the reference) keeps
// it. Short of a float32 overflow inside the convolution, a NaN comes only
// from a non-finite operand, so the ReLU is fused only when every operand is
// finite (a sum that overflows just takes the unfused route); the
// activations are scanned unless a network forward vouched for them.
bool may_fuse_relu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& residual, bool relu) {
  if (!relu) {
    note_parameters(weight, bias);
    return false;
  }
  if (!weight.is_mkldnn() && !all_finite(weight)) {  // a prepacked weight is finite (see finite_parameters)
    known_finite_activations = false;
    return false;
  }
  return operands_finite(x, bias, residual);
}

// Some oneDNN builds (torch 2.11's) cannot create the fused residual add when
// the residual's NHWC strides are ambiguous, a single pixel or a single
// channel ("could not create a memory"); there the residual is added after
// the convolution, which costs little at those sizes.
bool onednn_adds(const at::Tensor& residual) { return residual.size(1) > 1 && residual.size(2) * residual.size(3) > 1; }

}  // namespace

bool activations_known_finite() { return known_finite_activations; }
void set_activations_known_finite(bool known) { known_finite_activations = known; }

bool operands_finite(const at::Tensor& x, const at::Tensor& bias, const std::optional<at::Tensor>& residual) {
  if (!all_finite(bias)) {
    known_finite_activations = false;
    return false;
  }
  return known_finite_activations || (all_finite(x) && (!residual.has_value() || all_finite(*residual)));
}

at::Tensor conv_bias_act(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  check_conv_args(x_in, weight, bias, residual, stride, padding, dilation, groups);
  if (weight.is_mkldnn())
    TORCH_CHECK(onednn_fuses(x_in, weight), "resnet_fast: a prepacked (mkldnn) weight needs input of its dtype (",
                weight.scalar_type(), "), got ", x_in.scalar_type());
  if (onednn_fuses(x_in, weight)) {
    const at::Tensor w = weight.is_mkldnn() ? weight : weight.contiguous(at::MemoryFormat::ChannelsLast);
    const bool fuse_residual = residual.has_value() && onednn_adds(*residual);
    const bool fuse_relu =
        may_fuse_relu(x_in, weight, bias, residual, relu) && (fuse_residual || !residual.has_value());
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
  note_parameters(weight, bias);  // this route keeps NaN as it is
  at::Tensor y = conv_nhwc(x_in, weight, stride, padding, dilation, groups);
  bias_act_inplace(y, bias, residual, relu);
  return y;
}

void conv_bias_act_(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, bool relu) {
  check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups);
  TORCH_CHECK(residual.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resnet_fast: conv_bias_act_ writes into residual, which must be channels_last contiguous");
  at::assert_no_overlap(residual, x);
  if (!(onednn_fuses(x, weight) && onednn_adds(residual))) {
    residual.copy_(conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu));
    return;
  }
  // oneDNN's in-place binary add: the convolution accumulates into the
  // residual's memory, which saves the output's allocation and its
  // first-touch writes.
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise_", "binary");
  const at::Tensor w = weight.is_mkldnn() ? weight : weight.contiguous(at::MemoryFormat::ChannelsLast);
  const bool fuse_relu = may_fuse_relu(x, weight, bias, residual, relu);
  const c10::IValue unary_attr = fuse_relu ? c10::IValue(std::string("relu")) : c10::IValue();
  torch::jit::Stack stack = {residual, as_nhwc(x), w, bias.to(x.scalar_type()), padding.vec(), stride.vec(),
                             effective_dilation(weight, dilation), groups, std::string("add"), at::Scalar(1.0),
                             unary_attr, c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  if (relu && !fuse_relu) residual.relu_();
}

}  // namespace resnet_fast::cpu
