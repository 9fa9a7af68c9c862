"""optimize(): put the fused kernels under the torchvision and timm ResNets
of any model, in place; to_torchvision(): the way back.

How: the class of each recognised module is swapped in place (the way
torch.nn.utils.parametrize changes a module's class), because resnet_fast's
ResNet, BasicBlock and Bottleneck have exactly torchvision's attributes and
submodules. Nothing is copied: the same Parameter and buffer objects stay
(an optimizer built before keeps working), as do hooks, device, dtype,
train/eval flags and state_dict keys; only the forward changes.

- a torchvision ResNet becomes a resnet_fast ResNet (fused stem too);
- a torchvision or timm BasicBlock/Bottleneck anywhere else becomes ours:
  the blocks of a timm ResNet (the timm model and its API stay, its stem
  runs as timm's modules), and those inside torchvision's
  IntermediateLayerGetter (detection and segmentation backbones) or timm's
  features_only wrappers, whose stem modules run as they are.
"""
import warnings
from typing import List, Optional

from torch import nn

from ..backends import BACKENDS
from .recognize import (
    blocks_of,
    fused_block_class,
    kind,
    unsupported_block_parts,
    unsupported_resnet_parts,
)
from .resnet import ORIGINAL_CLASS as _ORIGINAL_CLASS
from .resnet import ResNet


class _Walk:
    def __init__(self, caller: str):
        self.caller = caller
        self.changed = 0
        self.already = 0
        self.left_unchanged = 0

    def leave(self, what: str, path: str, problems: List[str]) -> None:
        self.left_unchanged += 1
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems) - 4} more)" if len(problems) > 4 else "")
        warnings.warn(
            f"resnet_fast.{self.caller}: left {what} at {path or '<root>'} unchanged: unsupported {shown}",
            UserWarning,
            stacklevel=4,
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _swap_class(module: nn.Module, new_class: type) -> None:
    module.__dict__.setdefault(_ORIGINAL_CLASS, type(module))
    module.__class__ = new_class


def _fuse_block(block: nn.Module, backend: Optional[str]) -> None:
    _swap_class(block, fused_block_class(block))
    if backend is not None:
        block.backend = backend


def _optimize(module: nn.Module, path: str, backend: Optional[str], walk: _Walk) -> None:
    module_kind = kind(module)
    if module_kind in ("ours resnet", "ours block"):
        walk.already += 1
        return
    if module_kind in ("torchvision resnet", "timm resnet"):
        problems = unsupported_resnet_parts(module)
        if problems:
            walk.leave(module_kind.replace(" resnet", " ResNet"), path, problems)
            return
        for _, block in blocks_of(module):
            _fuse_block(block, backend)
        if module_kind == "torchvision resnet":
            _swap_class(module, ResNet)
            module.backend = backend
        walk.changed += 1
        return
    if module_kind in ("torchvision block", "timm block"):
        problems = unsupported_block_parts(module, path)
        if problems:
            walk.leave(module_kind.replace(" block", f" {type(module).__name__}"), path, problems)
            return
        _fuse_block(module, backend)
        walk.changed += 1
        return
    for name, child in module.named_children():
        _optimize(child, _join(path, name), backend, walk)


def optimize(module: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Run every torchvision or timm ResNet in `module` (the module itself or
    any submodule: a detector's or segmenter's backbone, a timm
    features_only model) on the fused kernels, in place, and return module.

    Weights, buffers, train/eval state, device and dtype are kept (they are
    the same objects); outputs stay the same up to float rounding. Calling it
    again changes nothing. A ResNet with parts the fused blocks cannot
    compute (deep stem, anti-aliasing, attention, stochastic depth, another
    activation, a BatchNorm subclass) is left unchanged with a warning
    naming the parts. A module with no ResNet in it raises ValueError and
    is not changed. `backend` is set on what is converted (None: best available).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    walk = _Walk("optimize")
    _optimize(module, "", backend, walk)
    if walk.changed + walk.already + walk.left_unchanged == 0:
        raise ValueError(
            f"resnet_fast.optimize: found no torchvision or timm ResNet (nor any of their "
            f"BasicBlock/Bottleneck blocks) in {type(module).__name__}; nothing was changed"
        )
    return module


# ------------------------------------------------------------------ inverse

def _restore(module: nn.Module, default_class: type) -> None:
    module.__class__ = module.__dict__.pop(_ORIGINAL_CLASS, default_class)
    for name in ("backend", "_backend"):
        module.__dict__.pop(name, None)
    for m in module.modules():  # folded-weight caches and recorded forwards (plain attributes)
        m.__dict__.pop("_fold_caches", None)
        m.__dict__.pop("_cpu_replays", None)


def _unfuse_block(block: nn.Module) -> None:
    from torchvision.models import resnet as tv  # optional dependency

    _restore(block, tv.Bottleneck if hasattr(block, "conv3") else tv.BasicBlock)


def _to_torchvision(module: nn.Module, path: str, walk: _Walk) -> None:
    module_kind = kind(module)
    if module_kind == "ours resnet":
        if module.features_only:
            walk.leave("features_only ResNet", path, ["features_only (it has no avgpool/fc)"])
            return
        from torchvision.models import resnet as tv

        for _, block in blocks_of(module):
            _unfuse_block(block)
        _restore(module, tv.ResNet)
        walk.changed += 1
        return
    if module_kind == "ours block":
        _unfuse_block(module)
        walk.changed += 1
        return
    for name, child in module.named_children():
        _to_torchvision(child, _join(path, name), walk)


def to_torchvision(module: nn.Module) -> nn.Module:
    """The inverse of optimize(), in place: every resnet_fast ResNet and block
    in `module` becomes the class it had before optimize() (timm blocks
    become timm's again), or torchvision's ResNet/BasicBlock/Bottleneck when
    it was built by resnet_fast. Weights, buffers and modes are the same
    objects. Returns module; raises ValueError, changing nothing, when
    there is no resnet_fast module in it. features_only models are left as
    they are, with a warning (they have no torchvision equivalent).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    walk = _Walk("to_torchvision")
    _to_torchvision(module, "", walk)
    if walk.changed + walk.left_unchanged == 0:
        raise ValueError(
            f"resnet_fast.to_torchvision: found no resnet_fast ResNet or block in {type(module).__name__}; "
            "nothing was changed"
        )
    return module
