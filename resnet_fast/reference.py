"""Pure-PyTorch reference of every resnet_fast op.

These functions define the semantics that every backend must reproduce; the
tests compare each backend against them, and the ``"reference"`` backend runs
them directly (they are differentiable through ordinary autograd). Statistics
are computed in fp32 whatever the input dtype, as the kernels do.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "conv_bias_act",
    "bias_act",
    "bias_act_backward",
    "bn_act_train",
    "bn_act_backward",
    "fold_bn",
]


def _act(z: Tensor, relu: bool) -> Tensor:
    return torch.relu(z) if relu else z


def bias_act(y: Tensor, bias: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """act(y + bias[c] + residual), computed in fp32, returned in y's dtype."""
    z = y.float() + bias.float().view(1, -1, 1, 1)
    if residual is not None:
        z = z + residual.float()
    return _act(z, relu).to(y.dtype)


def conv_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Optional[Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    relu: bool = True,
) -> Tensor:
    """act(conv2d(x, weight) + bias + residual)."""
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    return bias_act(y, bias, residual, relu)


def bias_act_backward(grad_out: Tensor, out: Tensor, relu: bool) -> Tuple[Tensor, Tensor]:
    """(grad_z, grad_bias): the ReLU-masked gradient and its per-channel sum.

    grad_z is empty when relu is False: it would equal grad_out.
    """
    grad_z = torch.where(out > 0, grad_out, torch.zeros_like(grad_out)) if relu else grad_out
    grad_bias = grad_z.float().sum(dim=(0, 2, 3))
    return (grad_z if relu else grad_out.new_empty(0)), grad_bias


def batch_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over N, H, W, in fp32 (two passes)."""
    xf = x.float()
    mean = xf.mean(dim=(0, 2, 3))
    var = (xf - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
    return mean, var


def bn_act_train(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Optional[Tensor],
    eps: float,
    relu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training BatchNorm with batch statistics, + residual, then ReLU.

    Returns (out, save_mean, save_invstd, batch_var); the running-stat update
    is the caller's (resnet_fast.ops.bn_act_train does it).
    """
    mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    scale = weight.float() * invstd
    shift = bias.float() - mean * scale
    z = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if residual is not None:
        z = z + residual.float()
    return _act(z, relu).to(x.dtype), mean, invstd, var


def bn_act_backward(
    grad_out: Tensor,
    x: Tensor,
    out: Tensor,
    weight: Tensor,
    save_mean: Tensor,
    save_invstd: Tensor,
    relu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of bn_act_train: (grad_x, grad_weight, grad_bias, grad_z).

    grad_z (the ReLU-masked gradient, which is also the residual's gradient)
    is empty when relu is False: it would equal grad_out.
    """
    grad_z, _ = bias_act_backward(grad_out, out, relu)
    dz = (grad_z if relu else grad_out).float()
    view = (1, -1, 1, 1)
    xhat = (x.float() - save_mean.view(view)) * save_invstd.view(view)
    grad_bias = dz.sum(dim=(0, 2, 3))
    grad_weight = (dz * xhat).sum(dim=(0, 2, 3))
    count = x.numel() // x.shape[1]
    grad_x = (weight.float() * save_invstd).view(view) * (
        dz - (grad_bias / count).view(view) - xhat * (grad_weight / count).view(view)
    )
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), grad_z


def fold_bn(
    weight: Tensor,
    gamma: Optional[Tensor],
    beta: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    eps: float,
    conv_bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the preceding conv: (weight', bias').

    conv(x, w') + b' == bn(conv(x, w) + conv_bias). Computed in fp32, returned
    in the conv weight's dtype. Differentiable in every input.
    """
    scale = torch.rsqrt(var.float() + eps)
    if gamma is not None:
        scale = scale * gamma.float()
    shift = -mean.float() * scale
    if conv_bias is not None:
        shift = shift + conv_bias.float() * scale
    if beta is not None:
        shift = shift + beta.float()
    folded_weight = weight.float() * scale.view(-1, 1, 1, 1)
    return folded_weight.to(weight.dtype), shift.to(weight.dtype)
