"""Argument checks of the Triton launchers, so that a direct call through
torch.ops.resnet_fast_triton fails with a message instead of a bad launch:
the op layer's checks (resnet_fast.validation) under this backend's name,
plus where the kernels can run."""
from functools import partial

import torch

from ...validation import check_bn_train_args as _check_bn_train_args
from ...validation import check_activation as _check_activation
from ...validation import check_channel_vector as _check_channel_vector
from ...validation import check_conv_args as _check_conv_args
from ...validation import check_like as _check_like
from ...validation import conv_output_shape as _conv_output_shape
from .runtime import INTERPRET

PREFIX = "resnet_fast_triton:"

check_like = partial(_check_like, prefix=PREFIX)
check_channel_vector = partial(_check_channel_vector, prefix=PREFIX)
conv_output_shape = partial(_conv_output_shape, prefix=PREFIX)


def check_activation(t: torch.Tensor, name: str) -> None:
    _check_activation(t, name, PREFIX)
    if not INTERPRET and t.device.type not in ("cuda", "meta"):
        raise ValueError(
            f"{PREFIX} {name} is on {t.device}; the Triton kernels run on CUDA tensors "
            "(or on CPU tensors under TRITON_INTERPRET=1)"
        )


def check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups):
    check_activation(x, "x")
    return _check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups, prefix=PREFIX)


def check_bn_train_args(x, weight, bias, residual) -> int:
    check_activation(x, "x")
    return _check_bn_train_args(x, weight, bias, residual, prefix=PREFIX)
