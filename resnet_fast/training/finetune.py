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

from torch import nn

from ..models.frozen import freeze_batchnorm

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def parse_freeze(spec: str) -> str:
    if spec in ("none", "bn", "backbone"):
        return spec
    if spec.startswith("upto:") and spec[len("upto:"):] in STAGES:
        return spec
    raise ValueError(
        f"--freeze {spec!r}: expected none, bn, backbone, or upto:STAGE with STAGE one of {', '.join(STAGES)}"
    )


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
            model.bn1 = freeze_batchnorm(model.bn1)
        else:
            layer = getattr(model, stage)
            layer.requires_grad_(False)
            freeze_batchnorm(layer)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
