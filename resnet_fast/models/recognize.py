"""Recognising torchvision, timm and resnet_fast ResNets and their blocks in
a module tree, and what in them the fused blocks cannot reproduce.

Classes are recognised by their import path, so neither torchvision nor timm
has to be imported here.
"""
from typing import List, Optional

from torch import nn

from ..layers import is_frozen_bn
from .resnet import BasicBlock, Bottleneck, ResNet

_KINDS = {
    "torchvision.models.resnet.ResNet": "torchvision resnet",
    "torchvision.models.resnet.BasicBlock": "torchvision block",
    "torchvision.models.resnet.Bottleneck": "torchvision block",
    "timm.models.resnet.ResNet": "timm resnet",
    "timm.models.resnet.BasicBlock": "timm block",
    "timm.models.resnet.Bottleneck": "timm block",
}


def class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def kind(module: nn.Module) -> Optional[str]:
    """"ours resnet", "ours block", "torchvision resnet", "torchvision block",
    "timm resnet", "timm block", or None. Exact classes only: a subclass may
    override forward, which a class swap would drop."""
    if type(module) is ResNet:
        return "ours resnet"
    if type(module) in (BasicBlock, Bottleneck):
        return "ours block"
    return _KINDS.get(class_path(module))


def fused_block_class(block: nn.Module):
    """Our block class with the same computation as a torchvision/timm block."""
    return Bottleneck if hasattr(block, "conv3") else BasicBlock


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or type(module) is nn.Identity


def _norm_problem(name: str, norm: nn.Module) -> Optional[str]:
    # A BatchNorm2d subclass would be fused as a plain BatchNorm2d, dropping
    # whatever the subclass adds (timm's BatchNormAct2d, say). Other norm
    # layers (GroupNorm, ...) run as they are.
    if isinstance(norm, nn.BatchNorm2d) and type(norm) is not nn.BatchNorm2d:
        return f"norm layer {name} ({type(norm).__name__}, a BatchNorm2d subclass)"
    if type(norm).__name__ == "FrozenBatchNorm2d" and not is_frozen_bn(norm):
        return f"norm layer {name} ({class_path(norm)})"
    return None


def _activation_problem(name: str, act: nn.Module) -> Optional[str]:
    if type(act) is not nn.ReLU:
        return f"activation {name} ({type(act).__name__}; the fused blocks apply ReLU)"
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def unsupported_block_parts(block: nn.Module, path: str = "") -> List[str]:
    """What in a torchvision or timm BasicBlock/Bottleneck the fused block
    would not compute; empty when it can be swapped."""
    problems: List[Optional[str]] = []
    for name in ("bn1", "bn2", "bn3"):
        if hasattr(block, name):
            problems.append(_norm_problem(_join(path, name), getattr(block, name)))
    ds = block.downsample
    if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d):
        problems.append(_norm_problem(_join(path, "downsample.1"), ds[1]))
    acts = ("relu",) if kind(block) == "torchvision block" else ("act1", "act2", "act3")
    for name in acts:
        if hasattr(block, name):
            problems.append(_activation_problem(_join(path, name), getattr(block, name)))
    described = {
        "se": "attention module",
        "aa": "anti-aliasing",
        "drop_path": "drop_path (stochastic depth)",
        "drop_block": "drop_block",
    }
    for name, what in described.items():
        part = getattr(block, name, None)
        if not _is_identity(part):
            problems.append(f"{what} {_join(path, name)} ({type(part).__name__})")
    return [p for p in problems if p]


def _blocks(model: nn.Module):
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}", None)
        if layer is None:
            continue
        for j, block in enumerate(layer):
            yield f"layer{i}.{j}", block


def unsupported_resnet_parts(model: nn.Module) -> List[str]:
    """What in a torchvision or timm ResNet optimize() cannot reproduce;
    empty when every block (and, for torchvision, the stem) can be swapped."""
    problems: List[Optional[str]] = []
    if type(model.conv1) is not nn.Conv2d:
        problems.append(f"deep stem (conv1 is {type(model.conv1).__name__}, not a single Conv2d)")
    if type(getattr(model, "maxpool", None)) is not nn.MaxPool2d:
        problems.append(f"stem pooling maxpool ({type(getattr(model, 'maxpool', None)).__name__})")
    problems.append(_norm_problem("bn1", model.bn1))
    stem_act = "relu" if kind(model) == "torchvision resnet" else "act1"
    problems.append(_activation_problem(stem_act, getattr(model, stem_act)))
    model_kind = kind(model).split()[0]
    for path, block in _blocks(model):
        block_kind = kind(block)
        if block_kind != f"{model_kind} block":
            problems.append(f"block {path} ({class_path(block)})")
        else:
            problems.extend(unsupported_block_parts(block, path))
    return [p for p in problems if p]


def blocks_of(model: nn.Module):
    """(path, block) of every block in layer1..layer4."""
    return list(_blocks(model))
