"""The torchvision ResNet builders: resnet18 ... wide_resnet101_2."""
from typing import Any, Optional, Sequence, Type, Union

from .frozen import set_trainable_layers
from .resnet import BasicBlock, Bottleneck, ResNet
from .weights import WeightsSource, load_weights

__all__ = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]


def _resnet(
    block: Type[Union[BasicBlock, Bottleneck]],
    layers: Sequence[int],
    weights: Optional[WeightsSource],
    progress: bool,
    overrides: dict,
    kwargs: Any,
) -> ResNet:
    """Build a ResNet. `weights`: a path to a state_dict file (.pth, .pt,
    .safetensors), a state_dict, or a torchvision weights enum whose file is
    already in torch.hub's local cache. `progress` is accepted for
    torchvision compatibility (nothing is downloaded).

    Besides ResNet's own arguments (torchvision's, `backend`,
    `features_only`, `out_indices`), `trainable_layers` (0..5) leaves only
    the last that many layers trainable, as torchvision's detection
    backbones take it (see set_trainable_layers)."""
    trainable_layers = kwargs.pop("trainable_layers", None)
    for key, value in overrides.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{key}={kwargs[key]} conflicts with this architecture's {key}={value}")
        kwargs[key] = value
    meta = getattr(weights, "meta", None)
    if isinstance(meta, dict) and "categories" in meta:
        kwargs.setdefault("num_classes", len(meta["categories"]))
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    if trainable_layers is not None:
        set_trainable_layers(model, trainable_layers)
    return model


def resnet18(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, {}, kwargs)


def resnet34(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, {}, kwargs)


def resnet50(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, {}, kwargs)


def resnet101(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, {}, kwargs)


def resnet152(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, {}, kwargs)


def resnext50_32x4d(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, {"groups": 32, "width_per_group": 4}, kwargs)


def resnext101_32x8d(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, {"groups": 32, "width_per_group": 8}, kwargs)


def resnext101_64x4d(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, {"groups": 64, "width_per_group": 4}, kwargs)


def wide_resnet50_2(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, {"width_per_group": 128}, kwargs)


def wide_resnet101_2(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, {"width_per_group": 128}, kwargs)
