"""The Triton kernels as PyTorch operators, namespace resnet_fast_triton, with
the schemas of csrc/ops.cpp and the shared autograd formulas
(resnet_fast.autograd_formulas) for the two forward ops.

Importing this module registers the operators. On a GPU each one is a
torch.library.triton_op whose launches go through wrap_triton, so
torch.compile traces into the kernels. Under TRITON_INTERPRET=1 the kernels
are Python functions that must see real data, which tracing cannot give
them; there each op is an opaque torch.library.custom_op whose fake kernel
is the same launcher with its launches skipped (runtime.launchable).
"""
import torch
from torch.library import custom_op, triton_op

from .batch_norm import bn_act_backward as launch_bn_act_backward
from .batch_norm import bn_act_train as launch_bn_act_train
from .conv import conv_bias_act as launch_conv_bias_act
from .epilogue import bias_act_backward as launch_bias_act_backward
from .runtime import INTERPRET
from ... import autograd_formulas

NAMESPACE = "resnet_fast_triton"

SCHEMAS = {
    "conv_bias_act": "(Tensor x, Tensor weight, Tensor bias, Tensor? residual, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, bool relu) -> Tensor",
    "bias_act_backward": "(Tensor grad_out, Tensor out, bool relu) -> (Tensor grad_z, Tensor grad_bias)",
    "bn_act_train": "(Tensor x, Tensor weight, Tensor bias, Tensor? residual, float eps, bool relu) "
    "-> (Tensor out, Tensor save_mean, Tensor save_invstd, Tensor batch_var)",
    "bn_act_backward": "(Tensor grad_out, Tensor x, Tensor out, Tensor weight, Tensor save_mean, "
    "Tensor save_invstd, bool relu) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_z)",
}


def _define(name: str, launcher):
    qualname = f"{NAMESPACE}::{name}"
    if INTERPRET:
        op = custom_op(qualname, launcher, mutates_args=(), schema=SCHEMAS[name])
        op.register_fake(launcher)
        return op
    return triton_op(qualname, launcher, mutates_args=(), schema=SCHEMAS[name])


# The launchers are plain functions of the schema's arguments (conv's extra
# `reduction` keyword keeps its default), so each is the op's implementation.
def _conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    return launch_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu)


conv_bias_act = _define("conv_bias_act", _conv_bias_act)
bias_act_backward = _define("bias_act_backward", launch_bias_act_backward)
bn_act_train = _define("bn_act_train", launch_bn_act_train)
bn_act_backward = _define("bn_act_backward", launch_bn_act_backward)


# Autograd: the formulas every backend shares, through this namespace's kernels.
autograd_formulas.register(NAMESPACE)
