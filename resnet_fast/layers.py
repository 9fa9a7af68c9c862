"""Fused conv + norm (+ residual) (+ ReLU) for the nn.Conv2d / norm module
pairs of a ResNet.

The modules stay exactly torchvision's (nn.Conv2d, nn.BatchNorm2d or
FrozenBatchNorm2d), so module trees and state_dicts are unchanged; only the
forward computation is fused:
  - BatchNorm in training (batch statistics): conv, then bn_act_train.
  - BatchNorm in eval, or frozen BatchNorm: BN folded into the conv weight and
    bias (cached, see FoldCache), then conv_bias_act.
  - any other norm layer: the modules as they are, unfused.
"""
import contextlib
import threading
import warnings
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, plans
from .backends import resolve_backend, split_choice
from .sync_batchnorm import sync_bn_act_train, sync_is_active


def is_frozen_bn(norm: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d (or a look-alike): fixed statistics and
    affine parameters held as buffers."""
    return type(norm).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(norm, name) for name in ("weight", "bias", "running_mean", "running_var", "eps")
    )


# SyncBatchNorm on one rank (or in eval) is plain BatchNorm.
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None or bn.running_var is None


def _cacheable(sources) -> bool:
    """Whether a fold of these tensors may be cached: not while torch.compile
    traces (the compiled graph folds by itself), nor while autograd needs to
    flow into them (fine-tuning with frozen BN), nor for tensors made under
    torch.inference_mode, which have no version counter to reveal an
    in-place change (those are folded on every call)."""
    if torch.compiler.is_compiling():
        return False
    present = [t for t in sources if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    if any(t.is_inference() for t in present):
        _note_uncached_inference_tensors()
        return False
    return True


_inference_note = threading.Event()


def _note_uncached_inference_tensors() -> None:
    if _inference_note.is_set():
        return
    _inference_note.set()
    warnings.warn(
        "resnet_fast: this model's weights were made under torch.inference_mode(), and such tensors have no "
        "version counter to show when they change, so the BatchNorm-folded weights are computed again on every "
        "call instead of cached (slower, same results). Create or load the model outside inference_mode to "
        "cache them; running it inside inference_mode is fine. (Said once.)",
        UserWarning,
        stacklevel=5,
    )


def _tensor_key(t: Optional[Tensor]):
    if t is None:
        return None
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


_FOLD_SOURCES = (("weight", "bias"), ("weight", "bias", "running_mean", "running_var"))


def _fold_sources(conv: nn.Module, norm: nn.Module) -> Tuple[Optional[Tensor], ...]:
    """conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
    norm.running_var, read from the modules' parameter and buffer tables
    (what nn.Module's attribute lookup does, minus its cost: this runs for
    every layer on every call), with getattr for anything kept elsewhere."""
    found = []
    for module, names in zip((conv, norm), _FOLD_SOURCES):
        table = module.__dict__
        parameters, buffers = table["_parameters"], table["_buffers"]
        for name in names:
            if name in parameters:
                found.append(parameters[name])
            elif name in buffers:
                found.append(buffers[name])
            else:
                found.append(getattr(module, name))
    return tuple(found)


class FoldCache:
    """Folded (weight, bias) of one conv + eval-BN pair, reused across forwards,
    the weight prepacked for oneDNN per input shape (CPU inference), the
    weight transformed for the Winograd convolution (CPU inference,
    ops.winograd_weight), and the weight in the Triton convolution's GEMM
    layout (ops.gemm_layout_weight).

    The key holds the storage address, version counter, dtype and device of
    every source tensor, so an optimizer step, an in-place edit,
    load_state_dict or .to() all invalidate it. Edits through `.data` do not
    bump the version counter: clear_fold_caches() after those. When nothing
    is cached, see _cacheable.

    A prepacked weight is fast only for the input shape it was packed for
    (oneDNN reorders it on every call otherwise, measured up to 4x slower than
    no packing), so one is kept per input shape, the most recent
    MAX_PACKED_SHAPES of them.
    """

    MAX_PACKED_SHAPES = 4

    def __init__(self):
        # (source key, (weight, bias), {input shape: packed weight},
        # {"gemm": weight in GEMM layout, "winograd": transformed weight
        # or None}): replaced as a whole when the
        # sources change, so that a reader without the lock sees one
        # consistent entry.
        self._entry: Optional[Tuple[tuple, Tuple[Tensor, Tensor], "OrderedDict[Tuple[int, ...], Tensor]",
                                    Dict[str, Tensor]]] = None
        self._lock = threading.Lock()

    @property
    def _packed(self) -> "OrderedDict[Tuple[int, ...], Tensor]":
        entry = self._entry
        return OrderedDict() if entry is None else entry[2]

    def clear(self) -> None:
        with self._lock:
            self._entry = None

    # Copies and pickles of a model start with an empty cache.
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def folded(self, conv: nn.Conv2d, norm: nn.Module, prepack_for: Optional[Tensor] = None,
               gemm_layout: bool = False, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """(weight, bias) folded, in dtype (default: the conv weight's); with
        prepack_for (an input), the weight comes prepacked for inputs of its
        shape, where prepacking applies; with gemm_layout, in the Triton
        convolution's operand layout."""
        sources = _fold_sources(conv, norm)
        dtype = sources[0].dtype if dtype is None else dtype
        if not _cacheable(sources):
            return _fold(conv, norm, dtype)
        key = tuple([_tensor_key(t) for t in sources]) + (norm.eps, dtype)
        shape = None if prepack_for is None else tuple(prepack_for.shape)
        # The common case of a forward, without the lock: one read of the entry.
        entry = self._entry
        if entry is not None and entry[0] == key:
            if gemm_layout and "gemm" in entry[3]:
                return entry[3]["gemm"], entry[1][1]
            if shape is None and not gemm_layout:
                return entry[1]
            packed = entry[2].get(shape)
            if packed is not None:
                try:
                    entry[2].move_to_end(shape)  # most recently used, kept longest
                except KeyError:  # another thread's shape just pushed it out: fine, it is in hand
                    pass
                return packed, entry[1][1]
        # Made as ordinary tensors without autograd history whatever the mode
        # of the call that fills the cache, so that a later call in any mode
        # (inference_mode, no_grad, autograd through the input) can use them.
        with self._lock, torch.inference_mode(False), torch.no_grad():
            entry = self._entry
            if entry is None or entry[0] != key:
                entry = self._entry = (key, _fold(conv, norm, dtype), OrderedDict(), {})
            weight, bias = entry[1]
            if gemm_layout:
                if "gemm" not in entry[3]:
                    entry[3]["gemm"] = ops.gemm_layout_weight(weight)
                return entry[3]["gemm"], bias
            if shape is None:
                return weight, bias
            return self._packed_for(entry[2], conv, weight, shape), bias

    def winograd(self, conv: nn.Conv2d, norm: nn.Module) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """(weight, weight_winograd, bias): folded in float32, with the weight
        also transformed for ops.conv3x3_winograd_bias_act. None where that
        does not apply (a weight with NaN or Inf) or nothing is cached."""
        weight, bias = self.folded(conv, norm, dtype=torch.float32)
        entry = self._entry
        if entry is None or entry[1][0] is not weight:  # not cacheable, or replaced meanwhile
            return None
        if "winograd" not in entry[3]:
            with self._lock, torch.inference_mode(False), torch.no_grad():
                if "winograd" not in entry[3]:
                    entry[3]["winograd"] = ops.winograd_weight(weight)
        weight_winograd = entry[3]["winograd"]
        return None if weight_winograd is None else (weight, weight_winograd, bias)

    def _packed_for(self, packs: "OrderedDict[Tuple[int, ...], Tensor]", conv: nn.Conv2d, weight: Tensor,
                    shape: Tuple[int, ...]) -> Tensor:
        packed = packs.get(shape)
        if packed is not None:
            packs.move_to_end(shape)
            return packed
        packed = ops.prepack_conv_weight(weight, conv.stride, conv.padding, conv.dilation, conv.groups, shape)
        if packed is None:  # prepacking does not apply (dtype, no oneDNN)
            return weight
        packs[shape] = packed
        if len(packs) > self.MAX_PACKED_SHAPES:
            packs.popitem(last=False)
        return packed


def fold_cache(owner: nn.Module, name: str) -> Optional[FoldCache]:
    """The FoldCache that `owner` keeps for its conv called `name`, or None
    while torch.compile traces (the compiled graph folds by itself). Held as
    a plain attribute: not a buffer, so never in the state_dict."""
    if torch.compiler.is_compiling():
        return None
    caches = owner.__dict__.setdefault("_fold_caches", {})
    cache = caches.get(name)
    if cache is None:
        cache = caches[name] = FoldCache()
    return cache


def clear_fold_caches(module: nn.Module) -> None:
    """Drop every cached folded weight below module.

    Needed only after editing weights or BN buffers through `.data` (or
    another path that bypasses PyTorch's version counter, which the caches
    watch); optimizer steps, in-place edits under torch.no_grad(),
    load_state_dict and .to() are detected without it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for m in module.modules():
        for cache in m.__dict__.get("_fold_caches", {}).values():
            cache.clear()


def _fold(conv: nn.Conv2d, norm: nn.Module, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """conv and norm folded into (weight, bias) of dtype (default: the conv
    weight's), the fold itself computed in float32 (ops.fold_bn)."""
    weight = conv.weight if dtype is None else conv.weight.to(dtype)
    weight, bias = ops.fold_bn(
        weight, norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps, conv.bias
    )
    return weight.contiguous(memory_format=torch.channels_last), bias


def _fusable_conv(conv: nn.Module) -> bool:
    """A plain nn.Conv2d with numeric zero padding: what the fused ops take."""
    return (
        type(conv) is nn.Conv2d
        and not isinstance(conv.padding, str)
        and conv.padding_mode == "zeros"
    )


def conv_norm_act(
    conv: nn.Conv2d,
    norm: nn.Module,
    x: Tensor,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    backend: Optional[str] = None,
    cache: Optional[FoldCache] = None,
    overwrite_residual: bool = False,
) -> Tensor:
    """act(norm(conv(x)) + residual), through the fused ops where they apply
    (any other conv or norm module runs as it is). backend: a backend name,
    or for CUDA tensors "native:<family>" (backends.split_choice); None
    follows the layer's plan, if any. overwrite_residual: the
    caller needs residual no more, and an inference call on the CPU may
    write the result into it (ops.conv_bias_act_)."""
    backend, family = (None, None) if backend is None else split_choice(backend)
    if not _fusable_conv(conv):
        return _unfused(conv, norm, x, residual, relu)
    if sync_is_active(norm):
        return sync_bn_act_train(norm, conv(x), residual, relu)
    if isinstance(norm, _BATCH_NORMS) and _uses_batch_stats(norm):
        return _conv_bn_train(conv, norm, x, residual, relu, backend)
    if isinstance(norm, _BATCH_NORMS) or is_frozen_bn(norm):
        if backend is None:  # a measured choice for this layer, when resnet_fast.tune() made one
            planned = plans.planned_backend(conv, norm, x, residual, relu)
            if planned is not None:
                backend, family = split_choice(planned)
        if family is not None and x.device.type != "cuda":
            raise ValueError(f"resnet_fast: 'native:{family}' names a CUDA convolution family, and x is on "
                             f"{x.device.type}")
        resolved = resolve_backend(backend, x.device)
        if resolved == "native" and x.device.type == "cpu" and not x.requires_grad:
            return _cpu_inference(conv, norm, x, residual, relu, cache, overwrite_residual)
        if cache is None:
            weight, bias = _fold(conv, norm)
        else:
            weight, bias = cache.folded(conv, norm, gemm_layout=resolved == "triton")
        if weight.dtype != x.dtype:
            # Autocast or a model kept in another precision: match the input.
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        with contextlib.nullcontext() if family is None else ops.cuda_conv_family(family):
            return ops.conv_bias_act(
                x, weight, bias, residual, conv.stride, conv.padding, conv.dilation, conv.groups, relu, resolved
            )
    return _unfused(conv, norm, x, residual, relu)


def _cpu_inference(conv: nn.Conv2d, norm: nn.Module, x: Tensor, residual: Optional[Tensor], relu: bool,
                   cache: Optional[FoldCache], overwrite_residual: bool) -> Tensor:
    """conv_norm_act on the CPU's native ops for an x that needs no grad: the
    Winograd convolution where ops.cpu_conv_algorithm picks it, oneDNN's with
    the folded weight prepacked for x's shape otherwise; a half-precision x
    is computed in float32 where ops.cpu_compute_dtype says so."""
    compute_dtype = ops.cpu_compute_dtype(x.dtype)
    if compute_dtype != x.dtype and not _needs_grad(residual):
        wide_residual = None if residual is None else residual.to(compute_dtype)
        # A widened residual is a fresh copy, the result can be written into it.
        overwrite_wide = overwrite_residual or (wide_residual is not None and wide_residual is not residual)
        wide = _cpu_inference(conv, norm, x.to(compute_dtype), wide_residual, relu, cache, overwrite_wide)
        return wide.to(x.dtype)
    if cache is not None and not _needs_grad(residual) and ops.cpu_conv_algorithm(
            x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups) == "winograd":
        transformed = cache.winograd(conv, norm)
        if transformed is not None:
            weight, weight_winograd, bias = transformed
            if overwrite_residual and _may_write_into(residual, weight):
                return ops.conv3x3_winograd_bias_act_(residual, x, weight, weight_winograd, bias, relu)
            return ops.conv3x3_winograd_bias_act(x, weight, weight_winograd, bias, residual, relu)
    if cache is None:
        weight, bias = _fold(conv, norm, x.dtype)
    else:
        weight, bias = cache.folded(conv, norm, x, dtype=x.dtype)
    if overwrite_residual and _may_write_into(residual, weight):
        return ops.conv_bias_act_(
            residual, x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, relu, "native"
        )
    return ops.conv_bias_act(
        x, weight, bias, residual, conv.stride, conv.padding, conv.dilation, conv.groups, relu, "native"
    )


def _needs_grad(t: Optional[Tensor]) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _may_write_into(residual: Optional[Tensor], weight: Tensor) -> bool:
    """Whether conv_bias_act_ can take residual: float32 (where oneDNN
    accumulates into it), NHWC, and nothing autograd would track."""
    return (
        residual is not None
        and not torch.compiler.is_compiling()  # a compiled graph plans its own buffers
        and residual.dtype == torch.float32
        and residual.is_contiguous(memory_format=torch.channels_last)
        and not (torch.is_grad_enabled() and (residual.requires_grad or weight.requires_grad))
    )


def _unfused(conv, norm, x, residual, relu):
    out = norm(conv(x))
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def _conv_bn_train(conv, bn, x, residual, relu, backend):
    if resolve_backend(backend, x.device) == "triton":
        # The whole layer on the Triton kernels: the conv without an epilogue.
        conv_bias = conv.bias if conv.bias is not None else x.new_zeros(conv.out_channels)
        y = ops.conv_bias_act(
            x, conv.weight, conv_bias, None, conv.stride, conv.padding, conv.dilation, conv.groups, False, "triton"
        )
    else:
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    update = bn.training and bn.track_running_stats
    weight = bn.weight if bn.weight is not None else torch.ones(bn.num_features, device=x.device)
    bias = bn.bias if bn.bias is not None else torch.zeros(bn.num_features, device=x.device)
    out, _, _ = ops.bn_act_train(
        y,
        weight,
        bias,
        bn.running_mean if update else None,
        bn.running_var if update else None,
        residual,
        momentum,
        bn.eps,
        relu,
        backend,
    )
    return out
