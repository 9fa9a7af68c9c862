"""Exporting models that run on resnet_fast: ONNX through the reference
decomposition.

torch.export.export needs nothing special: the fused ops are registered
operators with fake kernels, so an exported program holds them as
torch.ops.resnet_fast.* calls (run it where resnet_fast is installed).
ONNX has no such operators, so export_onnx switches every resnet_fast
module to the "reference" backend for the export: plain conv2d + bias
(+ residual) + ReLU on the BatchNorm-folded weights, which ONNX expresses
directly.
"""
import contextlib
import os
from typing import Any, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .backends import BACKENDS
from .models.resnet import ResNet, _FusedBlock

_UNSET = object()


@contextlib.contextmanager
def using_backend(module: nn.Module, backend: Optional[str]) -> Iterator[nn.Module]:
    """Within the block, every resnet_fast ResNet and block in `module` runs on
    `backend`; their own settings come back afterwards."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    saved = []
    for m in module.modules():
        if isinstance(m, ResNet):
            saved.append((m, "_backend", m.__dict__.get("_backend", _UNSET)))
            m.__dict__["_backend"] = backend
        elif isinstance(m, _FusedBlock):
            saved.append((m, "backend", m.__dict__.get("backend", _UNSET)))
            m.__dict__["backend"] = backend
    try:
        yield module
    finally:
        for m, name, value in reversed(saved):
            if value is _UNSET:
                m.__dict__.pop(name, None)
            else:
                m.__dict__[name] = value


def _as_args(example: Union[Tensor, Tuple[Any, ...]]) -> Tuple[Any, ...]:
    if isinstance(example, Tensor):
        return (example,)
    if isinstance(example, tuple):
        return example
    raise TypeError(f"example must be a Tensor or a tuple of forward arguments, got {type(example).__name__}")


def export_onnx(model: nn.Module, example: Union[Tensor, Tuple[Any, ...]],
                path: Union[str, "os.PathLike[str]"], **onnx_kwargs: Any):
    """Write the eval-mode `model` (any module holding resnet_fast ResNets)
    to an ONNX file at `path`, traced with `example` (an input tensor, or a
    tuple of forward arguments). Extra keyword arguments go to
    torch.onnx.export (e.g. dynamic_shapes, opset_version). Returns
    torch.onnx.export's result (an ONNXProgram).

    Needs the onnx and onnxscript packages. BatchNorm is folded into the
    conv weights; the file holds plain Conv/Add/Relu nodes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            "export_onnx exports the eval-mode model, but these modules are in training mode: "
            + ", ".join(training[:5]) + ("..." if len(training) > 5 else "") + "; call model.eval() first"
        )
    args = _as_args(example)
    onnx_kwargs.setdefault("dynamo", True)
    with using_backend(model, "reference"), torch.no_grad():
        return torch.onnx.export(model, args, os.fspath(path), **onnx_kwargs)
