#include <torch/library.h>

#include "cpu_ops.h"

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("conv_bias_act", &resnet_fast::cpu::conv_bias_act);
  m.impl("conv_bias_act_", &resnet_fast::cpu::conv_bias_act_);
  m.impl("bias_act", &resnet_fast::cpu::bias_act);
  m.impl("bias_act_backward", &resnet_fast::cpu::bias_act_backward);
  m.impl("bn_act_train", &resnet_fast::cpu::bn_act_train);
  m.impl("bn_act_backward", &resnet_fast::cpu::bn_act_backward);
  m.impl("winograd_weight", &resnet_fast::cpu::winograd_weight);
  m.impl("conv3x3_winograd_bias_act", &resnet_fast::cpu::conv3x3_winograd_bias_act);
  m.impl("conv3x3_winograd_bias_act_", &resnet_fast::cpu::conv3x3_winograd_bias_act_);
  m.impl("max_pool2d_nhwc", &resnet_fast::cpu::max_pool2d_nhwc);
  m.impl("max_pool2d_nhwc_into", &resnet_fast::cpu::max_pool2d_nhwc_into);
  m.impl("global_avg_pool_nhwc", &resnet_fast::cpu::global_avg_pool_nhwc);
  m.impl("all_finite", &resnet_fast::cpu::all_finite);
}

// A weight prepacked into oneDNN's blocked layout (a MkldnnCPU tensor) makes
// the call dispatch here; only the conv_bias_act ops take one.
TORCH_LIBRARY_IMPL(resnet_fast, MkldnnCPU, m) {
  m.impl("conv_bias_act", &resnet_fast::cpu::conv_bias_act);
  m.impl("conv_bias_act_", &resnet_fast::cpu::conv_bias_act_);
}
