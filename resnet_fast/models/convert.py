"""Turning an existing torchvision ResNet into a resnet_fast one."""
import copy
from typing import Optional

import torch
from torch import nn

from .resnet import BasicBlock, Bottleneck, ResNet

_TOP_LEVEL_MODULES = ("conv1", "bn1", "relu", "maxpool", "avgpool", "fc")


def _block_kind(model: nn.Module):
    name = type(model.layer1[0]).__name__
    if name == "BasicBlock":
        return BasicBlock
    if name == "Bottleneck":
        return Bottleneck
    raise TypeError(f"unsupported ResNet block {type(model.layer1[0]).__qualname__}: expected BasicBlock or Bottleneck")


def _match_memory_formats(ours: nn.Module, model: nn.Module) -> None:
    """Parameters and buffers stored channels_last where model's are (after
    model.to(memory_format=torch.channels_last)): load_state_dict copies
    values, not layouts, and a weight in the other layout than the
    activations costs a copy on every training step."""
    with torch.no_grad():
        for mine, theirs in zip(ours.modules(), model.modules()):
            for name, t in list(mine._parameters.items()) + list(mine._buffers.items()):
                source = theirs._parameters.get(name, theirs._buffers.get(name))
                if t is None or source is None or t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last):
                    continue
                if source.is_contiguous(memory_format=torch.channels_last) and not source.is_contiguous():
                    t.data = t.data.contiguous(memory_format=torch.channels_last)


def from_torchvision(model: nn.Module, backend: Optional[str] = None) -> ResNet:
    """A resnet_fast ResNet with the same architecture, weights, buffers,
    device, dtype and train/eval mode as the torchvision ResNet `model`.

    `model` itself is left unchanged. Top-level modules the user replaced
    (e.g. a new `fc` head or a 1-channel `conv1`) are carried over as they are.
    """
    required = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc", "groups", "base_width", "_norm_layer")
    missing = [name for name in required if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a torchvision ResNet: it has no {', '.join(missing)}")
    block = _block_kind(model)
    layers = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    # A layer built with replace_stride_with_dilation has stride 1 in its
    # first block where it would otherwise have 2.
    dilate = [getattr(model, f"layer{i}")[0].stride == 1 for i in (2, 3, 4)]
    ours = ResNet(
        block, layers, num_classes=1, groups=model.groups, width_per_group=model.base_width,
        replace_stride_with_dilation=dilate, norm_layer=model._norm_layer, backend=backend,
    )
    for name in _TOP_LEVEL_MODULES:
        setattr(ours, name, copy.deepcopy(getattr(model, name)))
    reference = next(model.parameters())
    ours.to(device=reference.device, dtype=reference.dtype)
    ours.load_state_dict(model.state_dict(), strict=True)
    _match_memory_formats(ours, model)
    ours.train(model.training)
    for mine, theirs in zip(ours.modules(), model.modules()):
        mine.training = theirs.training
    return ours
