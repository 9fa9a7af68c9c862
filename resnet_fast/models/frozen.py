"""Fine-tuning set-ups of detection backbones: BatchNorm frozen into
torchvision's FrozenBatchNorm2d, and only the last few layers trainable."""
from torch import nn

# The parameter-name prefixes that each `trainable_layers` value leaves
# trainable, deepest first, as torchvision's resnet_fpn_backbone counts them.
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")
MAX_TRAINABLE_LAYERS = len(_TRAINABLE_ORDER)


def _frozen_copy(bn: nn.Module) -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d  # optional dependency

    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{bn} keeps no running statistics (track_running_stats=False): there is nothing to freeze it to"
        )
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    frozen.running_mean.copy_(bn.running_mean.detach())
    frozen.running_var.copy_(bn.running_var.detach())
    if bn.affine:
        frozen.weight.copy_(bn.weight.detach())
        frozen.bias.copy_(bn.bias.detach())
    return frozen


def _is_plain_batchnorm(module: nn.Module) -> bool:
    # Exactly these types: a subclass (e.g. BatchNorm + activation) does more
    # than FrozenBatchNorm2d would.
    return type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d / nn.SyncBatchNorm below `module` with
    torchvision.ops.FrozenBatchNorm2d holding the same statistics and affine
    parameters (device and dtype kept), in place.

    Returns `module`, or the frozen replacement when `module` itself is a
    BatchNorm (as nn.SyncBatchNorm.convert_sync_batchnorm does). The fused
    layers run FrozenBatchNorm2d on the folded, differentiable path.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if _is_plain_batchnorm(module):
        return _frozen_copy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _is_plain_batchnorm(child):
                setattr(parent, name, _frozen_copy(child))
    return module


def set_trainable_layers(model: nn.Module, trainable_layers: int) -> nn.Module:
    """Leave only the last `trainable_layers` (0..5) of a ResNet trainable,
    counted as torchvision's resnet_fpn_backbone counts them: layer4,
    layer3, layer2, layer1, then conv1 (5 also keeps bn1 trainable). Every
    other parameter gets requires_grad=False. Returns model."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not (
        0 <= trainable_layers <= MAX_TRAINABLE_LAYERS
    ):
        raise ValueError(f"trainable_layers must be an int in [0, {MAX_TRAINABLE_LAYERS}], got {trainable_layers!r}")
    trainable = list(_TRAINABLE_ORDER[:trainable_layers])
    if trainable_layers == MAX_TRAINABLE_LAYERS:
        trainable.append("bn1")
    for name, parameter in model.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable):
            parameter.requires_grad_(False)
    return model
