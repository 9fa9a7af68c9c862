"""Fused conv + norm (+ residual) (+ ReLU) for the nn.Conv2d / norm module
pairs of a ResNet.

The modules stay exactly torchvision's (nn.Conv2d, nn.BatchNorm2d or
FrozenBatchNorm2d), so module trees and state_dicts are unchanged; only the
forward computation is fused:
  - BatchNorm in training (batch statistics): conv, then bn_act_train.
  - BatchNorm in eval, or frozen BatchNorm: BN folded into the conv weight and
    bias (cached, see FoldCache), then conv_bias_act.
  - any other norm layer: the modules as they are, unfused.
"""
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_gemm_conv, cpu_replay, ops, plans
from .backends import resolve_backend, split_choice
from .cpu_inference import cpu_inference
from .folding import FoldCache, fold_conv_norm
from .sync_batchnorm import sync_bn_act_train, sync_is_active


def is_frozen_bn(norm: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d (or a look-alike): fixed statistics and
    affine parameters held as buffers."""
    return type(norm).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(norm, name) for name in ("weight", "bias", "running_mean", "running_var", "eps")
    )


# SyncBatchNorm on one rank (or in eval) is plain BatchNorm.
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    if bn.training:
        return True
    # The buffer table first: nn.Module's attribute lookup is slow, and this runs for every layer on every call.
    buffers = bn._buffers
    running_mean = buffers["running_mean"] if "running_mean" in buffers else bn.running_mean
    running_var = buffers["running_var"] if "running_var" in buffers else bn.running_var
    return running_mean is None or running_var is None



def _fusable_conv(conv: nn.Module) -> bool:
    """A plain nn.Conv2d with numeric zero padding: what the fused ops take."""
    return (
        type(conv) is nn.Conv2d
        and not isinstance(conv.padding, str)
        and conv.padding_mode == "zeros"
    )


def conv_norm_act(
    conv: nn.Conv2d,
    norm: nn.Module,
    x: Tensor,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    backend: Optional[str] = None,
    cache: Optional[FoldCache] = None,
    overwrite_residual: bool = False,
) -> Tensor:
    """act(norm(conv(x)) + residual), through the fused ops where they apply
    (any other conv or norm module runs as it is). backend: a backend name,
    or for CUDA tensors "native:<family>" (backends.split_choice); None
    follows the layer's plan, if any. overwrite_residual: the
    caller needs residual no more, and an inference call on the CPU may
    write the result into it (ops.conv_bias_act_)."""
    cpu_replay.layer_begins()
    backend, family = (None, None) if backend is None else split_choice(backend)
    if not _fusable_conv(conv):
        return _unfused(conv, norm, x, residual, relu)
    if sync_is_active(norm):
        return sync_bn_act_train(norm, conv(x), residual, relu)
    if isinstance(norm, _BATCH_NORMS) and _uses_batch_stats(norm):
        return _conv_bn_train(conv, norm, x, residual, relu, backend)
    if isinstance(norm, _BATCH_NORMS) or is_frozen_bn(norm):
        if backend is None:  # a measured choice for this layer, when resnet_fast.tune() made one
            planned = plans.planned_backend(conv, norm, x, residual, relu)
            if planned is not None:
                backend, family = split_choice(planned)
        device = x.device
        if family is not None and device.type != "cuda":
            raise ValueError(f"resnet_fast: 'native:{family}' names a CUDA convolution family, and x is on "
                             f"{device.type}")
        resolved = resolve_backend(backend, device)
        if resolved == "native" and device.type == "cpu" and not x.requires_grad:
            return cpu_inference(conv, norm, x, residual, relu, cache, overwrite_residual)
        if cache is None:
            weight, bias = fold_conv_norm(conv, norm)
        else:
            weight, bias = cache.folded(conv, norm, gemm_layout=resolved == "triton")
        if weight.dtype != x.dtype:
            # Autocast or a model kept in another precision: match the input.
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        with contextlib.nullcontext() if family is None else ops.cuda_conv_family(family):
            return ops.conv_bias_act(
                x, weight, bias, residual, conv.stride, conv.padding, conv.dilation, conv.groups, relu, resolved
            )
    return _unfused(conv, norm, x, residual, relu)


def _unfused(conv, norm, x, residual, relu):
    out = norm(conv(x))
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def _conv_bn_train(conv, bn, x, residual, relu, backend):
    resolved = resolve_backend(backend, x.device)
    if resolved == "triton":
        # The whole layer on the Triton kernels: the conv without an epilogue.
        conv_bias = conv.bias if conv.bias is not None else x.new_zeros(conv.out_channels)
        y = ops.conv_bias_act(
            x, conv.weight, conv_bias, None, conv.stride, conv.padding, conv.dilation, conv.groups, False, "triton"
        )
    elif resolved == "native" and conv.bias is None and cpu_gemm_conv.applies(
            x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups):
        y = cpu_gemm_conv.conv2d(x, conv.weight, conv.stride, conv.padding, conv.dilation)
    else:
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    update = bn.training and bn.track_running_stats
    weight = bn.weight if bn.weight is not None else torch.ones(bn.num_features, device=x.device)
    bias = bn.bias if bn.bias is not None else torch.zeros(bn.num_features, device=x.device)
    out, _, _ = ops.bn_act_train(
        y,
        weight,
        bias,
        bn.running_mean if update else None,
        bn.running_var if update else None,
        residual,
        momentum,
        bn.eps,
        relu,
        backend,
    )
    return out
