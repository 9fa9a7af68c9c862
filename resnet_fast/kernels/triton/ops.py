"""The Triton kernels as PyTorch operators, namespace resnet_fast_triton, with
the arguments of csrc/ops.cpp's schemas and the shared autograd formulas
(resnet_fast.autograd_formulas) for the two forward ops.

Importing this module registers the operators. On a GPU each one is a
torch.library.triton_op whose launches go through wrap_triton, so
torch.compile traces into the kernels. Under TRITON_INTERPRET=1 the kernels
are Python functions that must see real data, which tracing cannot give
them; there each op is an opaque torch.library.custom_op whose fake kernel
is the same launcher with its launches skipped (runtime.launchable).

Either way the schema is inferred from the launcher's type annotations:
triton_op ignores an explicit schema= on some torch releases (2.11), so the
annotations are what every release reads. tests/test_triton.py holds the
inferred schemas to the compiled extension's.
"""
from typing import List, Optional

import torch
from torch.library import custom_op, triton_op

from .batch_norm import bn_act_backward as launch_bn_act_backward
from .batch_norm import bn_act_train as launch_bn_act_train
from .conv import conv_bias_act as launch_conv_bias_act
from .epilogue import bias_act_backward as launch_bias_act_backward
from .runtime import INTERPRET
from ... import autograd_formulas

NAMESPACE = "resnet_fast_triton"


def _define(name: str, launcher):
    qualname = f"{NAMESPACE}::{name}"
    if INTERPRET:
        op = custom_op(qualname, launcher, mutates_args=())
        op.register_fake(launcher)
        return op
    return triton_op(qualname, launcher, mutates_args=())


# The launchers are plain, annotated functions of the schema's arguments, so
# each is the op's implementation; conv's keeps its extra `reduction` keyword
# out of the schema through this wrapper.
def _conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    relu: bool,
) -> torch.Tensor:
    return launch_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu)


LAUNCHERS = {
    "conv_bias_act": _conv_bias_act,
    "bias_act_backward": launch_bias_act_backward,
    "bn_act_train": launch_bn_act_train,
    "bn_act_backward": launch_bn_act_backward,
}
conv_bias_act, bias_act_backward, bn_act_train, bn_act_backward = (
    _define(name, launcher) for name, launcher in LAUNCHERS.items()
)


# Autograd: the formulas every backend shares, through this namespace's kernels.
autograd_formulas.register(NAMESPACE)
