"""Transfer learning: a new classification head, and freezing part of the
network.

Freezing modes (`--freeze`):
  none           everything trains, BatchNorm uses batch statistics;
  bn             every BatchNorm becomes FrozenBatchNorm2d (fixed statistics
                 and affine parameters, the fused folded path), the rest trains;
  backbone       only the head trains: everything else is frozen, BN included;
  upto:layerN    the stem and layer1..layerN are frozen (BN included); the
                 later layers and the head train (N in 1..4; `upto:stem` is the
                 stem alone).
"""
from typing import List

import torch
from torch import nn

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def parse_freeze(spec: str) -> str:
    if spec in ("none", "bn", "backbone"):
        return spec
    if spec.startswith("upto:") and spec[len("upto:"):] in STAGES:
        return spec
    raise ValueError(
        f"--freeze {spec!r}: expected none, bn, backbone, or upto:STAGE with STAGE one of {', '.join(STAGES)}"
    )


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A freshly initialised fc for num_classes outputs, on the old head's
    device and dtype."""
    old = model.fc
    model.fc = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(
        device=old.weight.device, dtype=old.weight.dtype
    )


def _frozen_copy(bn: nn.BatchNorm2d) -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        if bn.weight is not None:
            frozen.weight.copy_(bn.weight)
        if bn.bias is not None:
            frozen.bias.copy_(bn.bias)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    return frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d below `module` replaced by FrozenBatchNorm2d with its
    running statistics and affine parameters (same state_dict keys)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _frozen_copy(child))
        else:
            freeze_batchnorm(child)
    return module


def _frozen_stages(mode: str) -> List[str]:
    if mode == "backbone":
        return list(STAGES)
    if mode.startswith("upto:"):
        return list(STAGES[:STAGES.index(mode[len("upto:"):]) + 1])
    return []


def apply_freeze(model: nn.Module, mode: str) -> None:
    """Freeze part of `model` in place as `mode` says (see the module doc)."""
    mode = parse_freeze(mode)
    if mode == "bn":
        freeze_batchnorm(model)
        return
    for stage in _frozen_stages(mode):
        if stage == "stem":
            model.conv1.requires_grad_(False)
            if isinstance(model.bn1, nn.BatchNorm2d):
                model.bn1 = _frozen_copy(model.bn1)
        else:
            layer = getattr(model, stage)
            layer.requires_grad_(False)
            freeze_batchnorm(layer)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
