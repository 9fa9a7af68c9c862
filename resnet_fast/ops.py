"""The operator contract: the public fused ops and their backends.

Every model layer calls these functions, never a kernel directly. Each op
validates its arguments once here, then runs on the chosen backend:
"reference" (resnet_fast.reference, plain autograd), "native" (the
resnet_fast::* operators of the compiled extension, with fake kernels and
autograd formulas registered below so that torch.compile and autograd see
them as ordinary ops) or "triton" (the resnet_fast_triton::* operators of
resnet_fast.kernels.triton, same schemas and autograd formulas).
"""
import contextlib
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import autograd_formulas, reference
from .backends import native_loaded, resolve_backend
from .validation import (
    check_activation,
    check_bn_train_args,
    check_channel_vector,
    check_conv_args,
    check_eps,
    check_flag,
    check_like,
    check_momentum,
    check_pool_args,
    conv_output_shape,
    crop_for_unit_outputs,
    effective_dilation,
    pooled_size,
)

__all__ = ["conv_bias_act", "conv_bias_act_", "conv3x3_winograd_bias_act", "conv3x3_winograd_bias_act_",
           "cpu_compute_dtype", "cpu_conv_algorithm", "cpu_winograd_enabled", "cuda_conv_algorithm",
           "cuda_conv_family", "bias_act", "bn_act_train", "fold_bn", "gemm_layout_weight", "global_avg_pool_nhwc",
           "max_pool2d_nhwc", "prepack_conv_weight", "winograd_weight"]

IntOrPair = Union[int, Sequence[int]]


# Each kernel backend's operators (same schemas, csrc/ops.cpp).
_NAMESPACES = {"native": "resnet_fast", "triton": "resnet_fast_triton"}


# ----------------------------------------------------------------- validation

def _pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"resnet_fast: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def check_no_shared_memory(residual: Tensor, x: Tensor, op: str) -> None:
    """An op that writes into residual while it reads x needs them apart."""
    if residual.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise ValueError(f"resnet_fast: {op} writes into residual, which shares memory with x")


# ------------------------------------------------------------------- the ops

def conv_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    relu: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """y = act(conv2d(x, weight) + bias + residual), in one pass over y.

    The eval-mode (and frozen-BN) layer: BatchNorm folded into weight and
    bias (see fold_bn). Differentiable in x, weight, bias and residual.
    Output is channels_last; an empty batch gives an empty output (computed
    by the reference). weight may be a prepacked oneDNN weight
    (prepack_conv_weight) on the native CPU backend, for inference.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    check_flag(relu, "relu")
    if isinstance(weight, Tensor) and weight.is_mkldnn:
        return autograd_formulas.call(
            "resnet_fast", "conv_bias_act", x, weight, bias, residual, stride, padding, dilation, groups, relu
        )
    check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups, empty_batch_ok=True)
    dilation = effective_dilation(weight.shape, dilation)
    x, stride, padding = crop_for_unit_outputs(x, weight.shape, stride, padding, dilation)
    backend = resolve_backend(backend, x.device)
    if backend == "reference" or x.shape[0] == 0:  # aten has every rule for an empty batch
        return reference.conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu)
    return autograd_formulas.call(
        _NAMESPACES[backend], "conv_bias_act", x, weight, bias, residual, stride, padding, dilation, groups, relu
    )


def conv_bias_act_(
    residual: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    relu: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """conv_bias_act(x, weight, bias, residual, ...) written into residual,
    which is returned: for inference, where the caller owns residual and
    needs it no more. On the native CPU backend the convolution accumulates
    into residual's memory, which saves allocating and first touching an
    output; elsewhere the result is computed as conv_bias_act does and
    copied in. residual must be channels_last contiguous and must not share
    memory with x. Not differentiable.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    check_flag(relu, "relu")
    if not isinstance(residual, Tensor):
        raise TypeError(f"resnet_fast: residual must be a Tensor (conv_bias_act_ writes into it), got {type(residual).__name__}")
    if isinstance(weight, Tensor) and weight.is_mkldnn:
        if isinstance(x, Tensor):
            check_no_shared_memory(residual, x, "conv_bias_act_")
        torch.ops.resnet_fast.conv_bias_act_(residual, x, weight, bias, stride, padding, dilation, groups, relu)
        return residual
    check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups, empty_batch_ok=True)
    if not residual.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("resnet_fast: conv_bias_act_ writes into residual, which must be channels_last contiguous "
                         "(residual.contiguous(memory_format=torch.channels_last))")
    check_no_shared_memory(residual, x, "conv_bias_act_")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (residual, x, weight, bias)):
        raise RuntimeError("resnet_fast: conv_bias_act_ is for inference and has no gradient; use conv_bias_act, "
                           "or call it under torch.no_grad() / torch.inference_mode()")
    if resolve_backend(backend, x.device) != "native" or x.device.type != "cpu" or x.shape[0] == 0:
        out = conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend)
        return residual.copy_(out)
    dilation = effective_dilation(weight.shape, dilation)
    x, stride, padding = crop_for_unit_outputs(x, weight.shape, stride, padding, dilation)
    torch.ops.resnet_fast.conv_bias_act_(residual, x, weight, bias, stride, padding, dilation, groups, relu)
    return residual


def conv3x3_winograd_bias_act(
    x: Tensor,
    weight: Tensor,
    weight_winograd: Tensor,
    bias: Tensor,
    residual: Optional[Tensor] = None,
    relu: bool = True,
) -> Tensor:
    """conv_bias_act(x, weight, bias, residual, stride=1, padding=1, relu=relu)
    for a 3x3 weight, by Winograd's F(4x4, 3x3): 4x fewer multiply-adds than
    direct convolution (plus its transforms), for CPU inference in float32 (native extension;
    not differentiable). weight_winograd is winograd_weight(weight), made
    once per weight. The result differs from direct convolution by rounding
    only (relative error about 1e-6, some 5x direct convolution's). Operands
    with NaN or Inf take the direct convolution, whose answer the
    reference gives (the transforms would spread them across a tile).
    """
    _check_winograd_args(x, weight, weight_winograd, bias, residual, relu)
    if x.shape[0] == 0:
        return reference.conv_bias_act(x, weight, bias, residual, (1, 1), (1, 1), (1, 1), 1, relu)
    return torch.ops.resnet_fast.conv3x3_winograd_bias_act(x, weight, weight_winograd, bias, residual, relu)


def conv3x3_winograd_bias_act_(
    residual: Tensor,
    x: Tensor,
    weight: Tensor,
    weight_winograd: Tensor,
    bias: Tensor,
    relu: bool = True,
) -> Tensor:
    """conv3x3_winograd_bias_act(x, weight, weight_winograd, bias, residual,
    relu) written into residual, which is returned (as conv_bias_act_ is):
    for inference, where the caller needs residual no more. residual must be
    channels_last contiguous and must not share memory with x."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"resnet_fast: residual must be a Tensor (conv3x3_winograd_bias_act_ writes into it), got "
                        f"{type(residual).__name__}")
    _check_winograd_args(x, weight, weight_winograd, bias, residual, relu)
    if not residual.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("resnet_fast: conv3x3_winograd_bias_act_ writes into residual, which must be channels_last "
                         "contiguous (residual.contiguous(memory_format=torch.channels_last))")
    check_no_shared_memory(residual, x, "conv3x3_winograd_bias_act_")
    if x.shape[0] > 0:
        torch.ops.resnet_fast.conv3x3_winograd_bias_act_(residual, x, weight, weight_winograd, bias, relu)
    return residual


def _check_winograd_args(x, weight, weight_winograd, bias, residual, relu) -> None:
    check_flag(relu, "relu")
    if isinstance(weight, Tensor) and (weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3)):
        raise ValueError(f"resnet_fast: the Winograd convolution takes a 3x3 weight (K, C, 3, 3), got "
                         f"{tuple(weight.shape)}")
    check_conv_args(x, weight, bias, residual, (1, 1), (1, 1), (1, 1), 1, empty_batch_ok=True)
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"resnet_fast: the Winograd convolution runs on CPU float32 tensors, got {x.dtype} on "
                         f"{x.device}; use conv_bias_act")
    if not isinstance(weight_winograd, Tensor):
        raise TypeError(f"resnet_fast: weight_winograd must be a Tensor (winograd_weight(weight)), got "
                        f"{type(weight_winograd).__name__}")
    expected = (36, weight.shape[1], weight.shape[0])
    if tuple(weight_winograd.shape) != expected:
        raise ValueError(f"resnet_fast: weight_winograd must have shape {expected} (winograd_weight(weight)), got "
                         f"{tuple(weight_winograd.shape)}")
    operands = (x, weight, weight_winograd, bias, residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands):
        raise RuntimeError("resnet_fast: the Winograd convolution is for inference and has no gradient; use "
                           "conv_bias_act, or call it under torch.no_grad() / torch.inference_mode()")
    if not native_loaded():
        raise RuntimeError("resnet_fast: the Winograd convolution needs the compiled extension, which did not load")


def max_pool2d_nhwc(
    x: Tensor,
    kernel_size: IntOrPair,
    stride: Optional[IntOrPair] = None,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    ceil_mode: bool = False,
    *,
    out: Optional[Tensor] = None,
) -> Tensor:
    """torch.nn.functional.max_pool2d(x, ...) (stride None: kernel_size) for
    CPU inference (native extension; not differentiable): the same values,
    NaN where a window holds one, as a channels_last tensor, without the
    indices aten's CPU kernel computes whether asked for or not.

    out: written instead of a new tensor and returned; the result's shape
    and x's dtype, channels_last contiguous (a slice of a batch's result
    along the batch, say), not overlapping x."""
    check_activation(x, "x", empty_batch_ok=True)
    kernel_size = _pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None else _pair(stride, "stride")
    padding, dilation = _pair(padding, "padding"), _pair(dilation, "dilation")
    check_flag(ceil_mode, "ceil_mode")
    check_pool_args(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    if x.device.type != "cpu":
        raise ValueError(f"resnet_fast: max_pool2d_nhwc runs on CPU tensors, got one on {x.device}; use "
                         "torch.nn.functional.max_pool2d")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("resnet_fast: max_pool2d_nhwc is for inference and has no gradient; use "
                           "torch.nn.functional.max_pool2d, or call it under torch.no_grad() / torch.inference_mode()")
    if not native_loaded():
        raise RuntimeError("resnet_fast: max_pool2d_nhwc needs the compiled extension, which did not load")
    if out is not None:
        _check_pool_out(out, x, kernel_size, stride, padding, dilation, ceil_mode)
        if x.shape[0] > 0:
            torch.ops.resnet_fast.max_pool2d_nhwc_into(out, x, kernel_size, stride, padding, dilation, ceil_mode)
        return out
    if x.shape[0] == 0:
        pooled = torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
        return pooled.contiguous(memory_format=torch.channels_last)
    return torch.ops.resnet_fast.max_pool2d_nhwc(x, kernel_size, stride, padding, dilation, ceil_mode)


def global_avg_pool_nhwc(x: Tensor) -> Tensor:
    """torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1) for CPU
    inference (native extension; not differentiable): the mean over H and W,
    [N, C] in x's dtype, accumulated in float32; NaN and Inf propagate as in
    the mean."""
    check_activation(x, "x", empty_batch_ok=True)
    if x.device.type != "cpu":
        raise ValueError(f"resnet_fast: global_avg_pool_nhwc runs on CPU tensors, got one on {x.device}; use "
                         "torch.nn.functional.adaptive_avg_pool2d")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("resnet_fast: global_avg_pool_nhwc is for inference and has no gradient; use "
                           "torch.nn.functional.adaptive_avg_pool2d, or call it under torch.no_grad() / "
                           "torch.inference_mode()")
    if not native_loaded():
        raise RuntimeError("resnet_fast: global_avg_pool_nhwc needs the compiled extension, which did not load")
    if x.shape[0] == 0:
        return x.new_empty((0, x.shape[1]))
    return torch.ops.resnet_fast.global_avg_pool_nhwc(x)


def _check_pool_out(out, x: Tensor, kernel_size, stride, padding, dilation, ceil_mode) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"resnet_fast: max_pool2d_nhwc out must be a Tensor, got {type(out).__name__}")
    shape = (x.shape[0], x.shape[1], *(pooled_size(x.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d],
                                                   ceil_mode) for d in range(2)))
    if tuple(out.shape) != shape:
        raise ValueError(f"resnet_fast: max_pool2d_nhwc out must have the result's shape {shape}, got {tuple(out.shape)}")
    if out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"resnet_fast: max_pool2d_nhwc out must be {x.dtype} on {x.device} like x, got {out.dtype} "
                         f"on {out.device}")
    if not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("resnet_fast: max_pool2d_nhwc out must be channels_last contiguous")
    if torch.is_grad_enabled() and out.requires_grad:
        raise RuntimeError("resnet_fast: max_pool2d_nhwc cannot write into a tensor that requires grad")


def winograd_weight(weight: Tensor) -> Optional[Tensor]:
    """weight (K, C, 3, 3) transformed for conv3x3_winograd_bias_act: a
    [36, C, K] float32 tensor, 4x the weight's size. None where that route
    does not apply: not a 3x3 CPU float32 weight, no native extension, or a
    weight with NaN or Inf (the Winograd route fuses its ReLU trusting the
    weight to be finite)."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"resnet_fast: weight must be a 4-D tensor (K, C, R, S), got {getattr(weight, 'shape', weight)}")
    if not native_loaded() or tuple(weight.shape[2:]) != (3, 3):
        return None
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.isfinite(weight).all():
        return None
    return torch.ops.resnet_fast.winograd_weight(weight.detach())


# Winograd needs this many 4x4 output tiles per thread: with fewer, reading
# its transformed weight (4x the weight) costs more than the multiplications
# it saves. Measured on a 2-core AVX2 CPU: a 256-channel 14x14 layer at
# batch 1, 16 tiles, ran at 0.6x oneDNN; 49 tiles of 128 channels at 1.7x.
# On a 2-core AVX-512 Xeon the same 16 tiles ran at 1.2x oneDNN on their
# own, yet a ResNet-18 and a ResNet-50 at batch 1 were 5-10% slower with
# them on Winograd (8 tiles a thread): inside a network the transformed
# weight no longer stays in cache.
WINOGRAD_MIN_TILES_PER_THREAD = 16


def cpu_conv_algorithm(
    x: Tensor,
    weight: Tensor,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> str:
    """Which convolution the model layers run on the CPU for inference
    (native backend): "winograd" (conv3x3_winograd_bias_act) for a float32
    input x and a 3x3 convolution of stride 1, padding 1, dilation 1 and one
    group whose output has at least WINOGRAD_MIN_TILES_PER_THREAD 4x4 tiles
    per thread (torch.get_num_threads()); "direct" (oneDNN's convolution,
    prepacked) otherwise, or always with RESNET_FAST_CPU_WINOGRAD=0 in the
    environment. Only shapes and x's device and dtype are read: the layers
    fold and transform the weight in float32, whatever the module's dtype
    (see cpu_compute_dtype)."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)):
        raise TypeError(f"resnet_fast: x and weight must be Tensors, got {type(x).__name__} and {type(weight).__name__}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if not (x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and stride == (1, 1)
            and padding == (1, 1) and dilation == (1, 1) and groups == 1):
        return "direct"
    if not cpu_winograd_enabled():
        return "direct"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "direct"
    n, _, h, w = x.shape
    tiles = n * ((h + 3) // 4) * ((w + 3) // 4)
    return "winograd" if tiles >= WINOGRAD_MIN_TILES_PER_THREAD * torch.get_num_threads() else "direct"


def cpu_winograd_enabled() -> bool:
    """Whether the Winograd convolution may run: the compiled extension
    loaded, and RESNET_FAST_CPU_WINOGRAD is not 0 in the environment."""
    return native_loaded() and os.environ.get("RESNET_FAST_CPU_WINOGRAD", "1") != "0"


# Whether oneDNN has convolution kernels for each half-precision dtype on
# this CPU (AVX-512 or AMX, natively or emulated), by its own test, asked once
# at import (and so never while torch.compile traces). Where it has none,
# aten's half-precision convolution takes a reference loop, measured 12x
# slower than float32 on a 2-core AVX2 CPU (64 channels at 56x56).
def _onednn_half_kernels() -> Dict[torch.dtype, bool]:
    queries = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    found = {}
    for dtype, name in queries.items():
        query = getattr(torch.ops.mkldnn, name, None) if torch.backends.mkldnn.is_available() else None
        try:
            found[dtype] = bool(query()) if query is not None else False
        except RuntimeError:  # a build without the query
            found[dtype] = False
    return found


_ONEDNN_HALF_KERNELS = _onednn_half_kernels()


def cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the model layers compute a CPU inference convolution in,
    for activations of `dtype`: float32 for bfloat16 and float16 where
    oneDNN has no kernels for them on this CPU (input and residual widened,
    weights folded in float32, each layer's output rounded back to dtype, so
    the activations between layers stay in dtype); dtype itself otherwise.
    RESNET_FAST_CPU_HALF_IN_FLOAT32=1 (or 0) in the environment makes it
    float32 (or dtype) for both half-precision dtypes."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"resnet_fast: dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _ONEDNN_HALF_KERNELS:
        return dtype
    forced = os.environ.get("RESNET_FAST_CPU_HALF_IN_FLOAT32", "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"resnet_fast: RESNET_FAST_CPU_HALF_IN_FLOAT32 must be 0 or 1 (or unset), got {forced!r}")
    if forced:
        return torch.float32 if forced == "1" else dtype
    return dtype if _ONEDNN_HALF_KERNELS[dtype] else torch.float32


def cuda_conv_algorithm(
    x: Tensor,
    weight: Tensor,
    residual: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    capability: Optional[int] = None,
    relu: bool = True,
) -> str:
    """Which convolution conv_bias_act(backend="native") runs for these
    arguments on CUDA tensors, under the current RESNET_FAST_CUDA_CONV and
    cuda_conv_family: the implicit GEMM, named with its kernel ("cutlass
    sm90 (128x128x64 tiles, wgmma, TMA im2col)" on Hopper; "cutlass sm80
    (128x128 tiles)", "cutlass sm80 (128x64 tiles)", or for inputs of at
    most 4 channels "cutlass sm80 (128x64 tiles, 3 input channels
    zero-padded to 4)" of the SM80 family), "cudnn fused (...)" for cuDNN's
    own fused op, or "cudnn: " and why. Only dtypes, sizes and addresses are
    read, so the tensors may be on any device; `capability` (major * 10 +
    minor, e.g. 90) is the GPU to decide for, by default x's (none for a CPU
    tensor). Needs the extension built with its CUDA kernels."""
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    dilation = effective_dilation(weight.shape, dilation)
    x, stride, padding = crop_for_unit_outputs(x, weight.shape, stride, padding, dilation)
    try:
        query = torch.ops.resnet_fast_cuda.conv_algorithm
    except (AttributeError, RuntimeError):
        raise RuntimeError("resnet_fast: the compiled extension has no CUDA kernels, so no CUDA convolution "
                           "to choose") from None
    return query(x, weight, residual, list(stride), list(padding), list(dilation), groups, capability, relu)


@contextlib.contextmanager
def cuda_conv_family(family: Optional[str]) -> Iterator[None]:
    """Within this block, conv_bias_act(backend="native") on CUDA tensors
    prefers one convolution family on this thread: "cutlass_sm90" or
    "cutlass_sm80" (our implicit GEMM's Hopper or SM80 kernels), "cudnn"
    (cuDNN's convolution + our epilogue) or "cudnn_fused" (cuDNN's own fused
    conv + bias (+ residual) + ReLU); None chooses by itself. A preference:
    where the family cannot run a convolution (its dtype, channels,
    alignment or GPU; no ReLU for cudnn_fused), the automatic choice does.
    RESNET_FAST_CUDA_CONV, when set, overrides it. Per-layer plans of
    resnet_fast.tune() use it; CPU tensors and the other backends ignore it."""
    if not native_loaded():
        raise RuntimeError("resnet_fast: the compiled extension did not load, so it has no CUDA convolution to choose")
    from . import _C

    previous = _C.set_cuda_conv_family(family)
    try:
        yield
    finally:
        _C.set_cuda_conv_family(previous)


def bias_act(
    y: Tensor, bias: Tensor, residual: Optional[Tensor] = None, relu: bool = True, backend: Optional[str] = None
) -> Tensor:
    """act(y + bias[c] + residual): the fused conv epilogue on its own."""
    check_activation(y, "y", empty_batch_ok=True)
    check_channel_vector(y, bias, "bias", y.shape[1])
    if residual is not None:
        check_like(y, residual, "residual", shape=y.shape)
    check_flag(relu, "relu")
    if backend == "triton":
        raise NotImplementedError(
            "resnet_fast: bias_act has no Triton kernel of its own (the Triton conv_bias_act fuses it); "
            "use backend='native' or 'reference'"
        )
    backend = resolve_backend(backend, y.device)
    if backend == "reference" or y.shape[0] == 0:
        return reference.bias_act(y, bias, residual, relu)
    return torch.ops.resnet_fast.bias_act(y, bias, residual, relu)


def bn_act_train(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Training BatchNorm (batch statistics) + residual + ReLU, in one op.

    Returns (out, save_mean, save_invstd). When given, running_mean and
    running_var are updated in place exactly as nn.BatchNorm2d does (not at
    all for an empty batch, whose save_mean and save_invstd are zeros):
    running = (1 - momentum) * running + momentum * batch_stat, with the
    unbiased batch variance. `momentum` is the update factor itself (the
    module passes 1 / num_batches_tracked for momentum=None).
    Differentiable in x, weight, bias and residual.
    """
    count = check_bn_train_args(x, weight, bias, residual, empty_batch_ok=True)
    check_momentum(momentum)
    check_eps(eps)
    check_flag(relu, "relu")
    channels = x.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError("resnet_fast: give both running_mean and running_var, or neither")
    if running_mean is not None:
        check_channel_vector(x, running_mean, "running_mean", channels)
        check_channel_vector(x, running_var, "running_var", channels)
    backend = resolve_backend(backend, x.device)
    if count == 0:
        # As nn.BatchNorm2d: an empty output (still connected to the
        # parameters for autograd) and the running statistics untouched.
        out = reference.bias_act(x * weight.view(1, -1, 1, 1).to(x.dtype), bias, residual, relu)
        no_stats = x.new_zeros(channels, dtype=torch.float32)
        return out, no_stats, no_stats.clone()
    if backend == "reference":
        out, mean, invstd, var = reference.bn_act_train(x, weight, bias, residual, eps, relu)
    else:
        out, mean, invstd, var = autograd_formulas.call(
            _NAMESPACES[backend], "bn_act_train", x, weight, bias, residual, eps, relu
        )
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, momentum, count)
    return out, mean, invstd


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float,
                         count: float) -> None:
    """running = (1 - momentum) * running + momentum * batch statistic, as
    nn.BatchNorm2d updates its buffers, with the unbiased variance
    var * count / (count - 1) (count: the values per channel). Buffers of
    the statistics' dtype (float32) are scaled and added to in place: four
    small ops, where the formula's eight (five allocating) took 40-140 us
    of a training forward's layer on a 2-core CPU, about what the fused
    BatchNorm + ReLU saves there against eager's."""
    unbiased_factor = count / (count - 1)
    with torch.no_grad():
        if running_mean.dtype == mean.dtype and running_var.dtype == var.dtype:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var, alpha=momentum * unbiased_factor)
        else:  # bfloat16 or float64 buffers: computed in the wider dtype, rounded once
            wide = torch.promote_types(running_mean.dtype, mean.dtype)
            running_mean.copy_(momentum * mean.to(wide) + (1 - momentum) * running_mean.to(wide))
            running_var.copy_(momentum * unbiased_factor * var.to(wide) + (1 - momentum) * running_var.to(wide))


def fold_bn(
    weight: Tensor,
    gamma: Optional[Tensor],
    beta: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    eps: float = 1e-5,
    conv_bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Fold eval-mode BatchNorm into the conv before it: (weight', bias').

    Computed in fp32 and cast back to the weight's dtype; differentiable.
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"resnet_fast: weight must be a floating-point tensor, got {getattr(weight, 'dtype', weight)!r}")
    if weight.dim() != 4:
        raise ValueError(f"resnet_fast: weight must be 4-D (K, C/groups, R, S), got {weight.dim()}-D")
    out_channels = weight.shape[0]
    for name, t in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var), ("conv_bias", conv_bias)):
        if t is None and name in ("mean", "var"):
            raise TypeError(f"resnet_fast: {name} must be a Tensor (the running statistic), got None")
        if t is not None:
            check_channel_vector(weight, t, name, out_channels)
    check_eps(eps)
    return reference.fold_bn(weight, gamma, beta, mean, var, eps, conv_bias)


def gemm_layout_weight(weight: Tensor) -> Tensor:
    """weight [K, C/groups, R, S] stored as an [R, S, C/groups, K]-contiguous
    tensor (same shape and values): the GEMM operand of the Triton
    convolution, which reads such a weight in place and copies any other
    layout on every call. A weight reused across calls is worth keeping so;
    the other backends take it too (the CUDA kernels copy it to channels_last)."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"resnet_fast: weight must be a 4-D tensor (K, C/groups, R, S), got {getattr(weight, 'shape', weight)}")
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def prepack_conv_weight(
    weight: Tensor,
    stride: IntOrPair,
    padding: IntOrPair,
    dilation: IntOrPair,
    groups: int,
    input_size: Optional[Sequence[int]] = None,
) -> Optional[Tensor]:
    """weight reordered into oneDNN's blocked layout for CPU inference, or
    None where that does not apply (not a CPU weight in float32, or in
    bfloat16/float16 where oneDNN has kernels for it on this CPU and the
    convolution has one group; no oneDNN, no native extension, or a weight
    with NaN or Inf: the native kernels fuse ReLU only for finite operands,
    and a packed weight is not checked again). A packed weight takes inputs
    of its own dtype.

    input_size, the shape of a typical input, lets oneDNN choose the layout
    its kernel for that shape wants; without it some layers run slower than
    with the plain weight. Other input shapes still work.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"resnet_fast: weight must be a 4-D tensor (K, C/groups, R, S), got {getattr(weight, 'shape', weight)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"resnet_fast: groups={groups} must be a positive int dividing the output channels ({weight.shape[0]})")
    if not (native_loaded() and torch.backends.mkldnn.is_available()):
        return None
    half = weight.dtype in _ONEDNN_HALF_KERNELS
    if weight.device.type != "cpu" or not (weight.dtype == torch.float32 or (
            half and _ONEDNN_HALF_KERNELS[weight.dtype] and groups == 1)):
        return None
    if not torch.isfinite(weight).all():
        return None
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight.detach(),
        padding,
        stride,
        effective_dilation(weight.shape, dilation),
        groups,
        None if input_size is None else list(input_size),
    )


# ------------------------------------------- fake kernels and autograd (native)

def _channels_last_like(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _register_native() -> None:
    lib = "resnet_fast::"

    @torch.library.register_fake(lib + "conv_bias_act")
    def _(x, weight, bias, residual, stride, padding, dilation, groups, relu):
        return _channels_last_like(conv_output_shape(x.shape, weight.shape, stride, padding, dilation), x)

    @torch.library.register_fake(lib + "conv_bias_act_")
    def _(residual, x, weight, bias, stride, padding, dilation, groups, relu):
        return None

    @torch.library.register_fake(lib + "winograd_weight")
    def _(weight):
        return weight.new_empty((36, weight.shape[1], weight.shape[0]))

    @torch.library.register_fake(lib + "conv3x3_winograd_bias_act")
    def _(x, weight, weight_winograd, bias, residual, relu):
        return _channels_last_like((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), x)

    @torch.library.register_fake(lib + "conv3x3_winograd_bias_act_")
    def _(residual, x, weight, weight_winograd, bias, relu):
        return None

    @torch.library.register_fake(lib + "max_pool2d_nhwc")
    def _(x, kernel_size, stride, padding, dilation, ceil_mode):
        shape = [pooled_size(x.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d], ceil_mode)
                 for d in range(2)]
        return _channels_last_like((x.shape[0], x.shape[1], *shape), x)

    @torch.library.register_fake(lib + "max_pool2d_nhwc_into")
    def _(out, x, kernel_size, stride, padding, dilation, ceil_mode):
        return None

    @torch.library.register_fake(lib + "global_avg_pool_nhwc")
    def _(x):
        return x.new_empty((x.shape[0], x.shape[1]))

    @torch.library.register_fake(lib + "bias_act")
    def _(y, bias, residual, relu):
        return _channels_last_like(y.shape, y)

    @torch.library.register_fake(lib + "bias_act_backward")
    def _(grad_out, out, relu):
        grad_z = _channels_last_like(grad_out.shape, grad_out) if relu else grad_out.new_empty(0)
        return grad_z, grad_out.new_empty(grad_out.shape[1], dtype=torch.float32)

    @torch.library.register_fake(lib + "bn_act_train")
    def _(x, weight, bias, residual, eps, relu):
        stat = x.new_empty(x.shape[1], dtype=torch.float32)
        return _channels_last_like(x.shape, x), stat, stat.clone(), stat.clone()

    @torch.library.register_fake(lib + "bn_act_backward")
    def _(grad_out, x, out, weight, save_mean, save_invstd, relu):
        grad_z = _channels_last_like(x.shape, grad_out) if relu else grad_out.new_empty(0)
        per_channel = weight.new_empty(x.shape[1])
        return _channels_last_like(x.shape, x), per_channel, per_channel.clone(), grad_z

    autograd_formulas.register("resnet_fast")


if native_loaded():
    _register_native()
