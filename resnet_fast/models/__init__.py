"""torchvision's ResNet family on fused kernels."""
from .builders import (
    resnet18, resnet34, resnet50, resnet101, resnet152,
    resnext50_32x4d, resnext101_32x8d, resnext101_64x4d,
    wide_resnet50_2, wide_resnet101_2,
)
from .convert import from_torchvision
from .features import FeatureInfo
from .frozen import freeze_batchnorm, set_trainable_layers
from .optimize import optimize, to_torchvision
from .resnet import BasicBlock, Bottleneck, ResNet
from .weights import load_weights, read_state_dict

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
    "from_torchvision", "load_weights", "read_state_dict",
    "FeatureInfo", "freeze_batchnorm", "set_trainable_layers", "optimize", "to_torchvision",
]
