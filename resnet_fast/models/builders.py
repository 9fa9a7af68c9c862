"""The torchvision ResNet builders: resnet18 ... wide_resnet101_2."""
from typing import Any, Optional, Sequence, Type, Union

from .frozen import set_trainable_layers
from .resnet import BasicBlock, Bottleneck, ResNet
from .pretrained import ResolvedWeights, resolve_weights
from .weights import WeightsSource, load_weights

__all__ = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]


def _resnet(
    arch: str,
    block: Type[Union[BasicBlock, Bottleneck]],
    layers: Sequence[int],
    weights: Optional[WeightsSource],
    progress: bool,
    overrides: dict,
    kwargs: Any,
) -> ResNet:
    """Build a ResNet. `weights`, as torchvision takes them and more: a
    torchvision weights enum, its name ("DEFAULT", "IMAGENET1K_V2",
    "ResNet50_Weights.IMAGENET1K_V2"), a URL, a hub name ("timm/<model>"), a
    path to a state_dict file (.pth, .pt, .safetensors) or a state_dict.
    Files not yet in torch.hub's cache are downloaded (with a progress bar
    when `progress`). Weights with categories set num_classes.

    Besides ResNet's own arguments (torchvision's, `backend`,
    `features_only`, `out_indices`), `trainable_layers` (0..5) leaves only
    the last that many layers trainable, as torchvision's detection
    backbones take it (see set_trainable_layers)."""
    trainable_layers = kwargs.pop("trainable_layers", None)
    for key, value in overrides.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{key}={kwargs[key]} conflicts with this architecture's {key}={value}")
        kwargs[key] = value
    resolved = resolve_weights(weights, arch, progress) if weights is not None else None
    if resolved is not None and resolved.categories is not None:
        _set_num_classes_from(resolved, weights, arch, kwargs)
    model = ResNet(block, layers, **kwargs)
    if resolved is not None:
        load_weights(model, resolved.source)
    if trainable_layers is not None:
        set_trainable_layers(model, trainable_layers)
    return model


def _set_num_classes_from(resolved: ResolvedWeights, weights: Any, arch: str, kwargs: dict) -> None:
    """num_classes is the number of the weights' categories, as in torchvision."""
    classes = len(resolved.categories)
    named = resolved.torchvision_weights if resolved.torchvision_weights is not None else weights
    given = kwargs.setdefault("num_classes", classes)
    if given != classes:
        raise ValueError(
            f"num_classes={given} does not fit the {arch} weights {named!s}, whose head has {classes} classes "
            f"(meta['categories']). For a new head, load them and replace it (model.fc = nn.Linear(...)), or build "
            f"{arch}(num_classes={given}) and load_weights(model, weights, exclude=('fc.',))"
        )


def resnet18(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], weights, progress, {}, kwargs)


def resnet34(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], weights, progress, {}, kwargs)


def resnet50(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], weights, progress, {}, kwargs)


def resnet101(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], weights, progress, {}, kwargs)


def resnet152(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], weights, progress, {}, kwargs)


def resnext50_32x4d(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], weights, progress, {"groups": 32, "width_per_group": 4}, kwargs)


def resnext101_32x8d(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnext101_32x8d", Bottleneck, [3, 4, 23, 3], weights, progress, {"groups": 32, "width_per_group": 8}, kwargs)


def resnext101_64x4d(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnext101_64x4d", Bottleneck, [3, 4, 23, 3], weights, progress, {"groups": 64, "width_per_group": 4}, kwargs)


def wide_resnet50_2(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], weights, progress, {"width_per_group": 128}, kwargs)


def wide_resnet101_2(*, weights: Optional[WeightsSource] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("wide_resnet101_2", Bottleneck, [3, 4, 23, 3], weights, progress, {"width_per_group": 128}, kwargs)
