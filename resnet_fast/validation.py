"""Argument checks of the fused ops, shared by the op layer (resnet_fast.ops)
and the Triton launchers (so a direct torch.ops call is checked too). Every
error names the argument and what was expected; `prefix` says who raised it.
"""
import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREFIX = "resnet_fast:"


def check_activation(t: Tensor, name: str, prefix: str = PREFIX, empty_batch_ok: bool = False) -> None:
    """A dense 4-D floating-point tensor with something in it; with
    empty_batch_ok, a batch of 0 (and otherwise sized) passes too."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{prefix} {name} must be a Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{prefix} {name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != 4:
        raise ValueError(f"{prefix} {name} must be 4-D (N, C, H, W), got {t.dim()}-D of shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{prefix} {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.numel() == 0 and not (empty_batch_ok and t.shape[0] == 0 and min(t.shape[1:]) > 0):
        raise ValueError(f"{prefix} {name} is empty (shape {tuple(t.shape)})")


def check_like(ref: Tensor, t: Tensor, name: str, shape: Optional[Sequence[int]] = None,
               same_dtype: bool = True, prefix: str = PREFIX) -> None:
    """t is a tensor on ref's device, with ref's dtype (or, when not
    same_dtype, any floating dtype) and the given shape."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{prefix} {name} must be a Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{prefix} {name} is on {t.device} but the input is on {ref.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{prefix} {name} has dtype {t.dtype} but the input has {ref.dtype}")
    if not same_dtype and not t.is_floating_point():
        raise TypeError(f"{prefix} {name} must be a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{prefix} {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_channel_vector(ref: Tensor, t: Tensor, name: str, channels: int, prefix: str = PREFIX) -> None:
    """One floating-point value per channel, on ref's device."""
    check_like(ref, t, name, shape=(channels,), same_dtype=False, prefix=prefix)


def effective_dilation(weight_shape, dilation) -> Tuple[int, int]:
    """dilation with 1 along each kernel dimension of size 1, where it changes
    nothing. PyTorch's oneDNN convolutions crash on some channels_last inputs
    with a dilated size-1 kernel dimension (e.g. a 3x1 kernel, dilation 2,
    stride 2, input width 1), so no backend is handed one."""
    return tuple(1 if weight_shape[2 + d] == 1 else int(dilation[d]) for d in range(2))


def taps_meet_only_padding(input_hw, kernel_hw, stride, padding, dilation) -> bool:
    """Whether some kernel tap reads padding at every output position (a 3x3
    kernel with padding 1 over a 1-pixel-wide image: its outer taps)."""
    for size, kernel, s, p, d in zip(input_hw, kernel_hw, stride, padding, dilation):
        outputs = (size + 2 * p - d * (kernel - 1) - 1) // s + 1
        for tap in range(kernel):
            first = tap * d - p  # the input index the tap reads for output 0
            inside = -(first // s) if first < 0 else 0  # the first output for which it reads index >= 0
            if 0 < outputs and (inside >= outputs or first + inside * s >= size):
                return True
    return False


def crop_for_unit_outputs(x: Tensor, weight_shape, stride, padding, dilation):
    """(x, stride, padding) rewritten where an output dimension has size 1
    and a stride > 1: x reduced to the one window (zero-padded explicitly
    where the window reaches into padding), stride 1, padding 0. The same
    result; PyTorch's oneDNN convolutions on channels_last input got it
    wrong otherwise (e.g. stride (1, 2) with a single output column: rows
    of the output were wrong)."""
    stride, padding = list(stride), list(padding)
    for d in range(2):
        extent = dilation[d] * (weight_shape[2 + d] - 1) + 1
        if stride[d] > 1 and (x.shape[2 + d] + 2 * padding[d] - extent) // stride[d] == 0:
            if padding[d]:
                pad = [0, 0, 0, 0]
                pad[2 * (1 - d)] = pad[2 * (1 - d) + 1] = padding[d]
                x = torch.nn.functional.pad(x, pad)
            x = x.narrow(2 + d, 0, extent)
            stride[d], padding[d] = 1, 0
    return x, tuple(stride), tuple(padding)


def conv_output_shape(x_shape, w_shape, stride, padding, dilation, prefix: str = PREFIX) -> Tuple[int, int, int, int]:
    sizes = []
    for d in range(2):
        extent = dilation[d] * (w_shape[2 + d] - 1) + 1
        if x_shape[2 + d] + 2 * padding[d] < extent:
            raise ValueError(
                f"{prefix} input of spatial size {tuple(x_shape[2:])} is smaller than the "
                f"(dilated) kernel {tuple(w_shape[2:])} with padding {tuple(padding)}"
            )
        sizes.append((x_shape[2 + d] + 2 * padding[d] - extent) // stride[d] + 1)
    return (x_shape[0], w_shape[0], sizes[0], sizes[1])


def pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Output size of max pooling along one dimension, as
    torch.nn.functional.max_pool2d counts it: with ceil_mode, a last window
    that would start in the right padding is dropped."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def check_pool_args(x_shape, kernel_size, stride, padding, dilation, ceil_mode,
                    prefix: str = PREFIX) -> Tuple[int, int]:
    """The window of a max pooling (pairs of ints) against an input of
    x_shape; returns the output's spatial size."""
    for name, pair, minimum in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                                ("dilation", dilation, 1)):
        if min(pair) < minimum:
            raise ValueError(f"{prefix} {name} must be at least {minimum}, got {tuple(pair)}")
    if any(2 * p > k for p, k in zip(padding, kernel_size)):
        raise ValueError(f"{prefix} padding {tuple(padding)} must be at most half the kernel size {tuple(kernel_size)}")
    out = tuple(pooled_size(x_shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d], ceil_mode)
                for d in range(2))
    if min(out) < 1:
        raise ValueError(f"{prefix} input of spatial size {tuple(x_shape[2:])} is smaller than the (dilated) "
                         f"window {tuple(kernel_size)} with padding {tuple(padding)}")
    return out


def check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups,
                    prefix: str = PREFIX, empty_batch_ok: bool = False) -> Tuple[int, int, int, int]:
    """Every argument of conv_bias_act; returns the output shape."""
    check_activation(x, "x", prefix, empty_batch_ok)
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"{prefix} weight must be a 4-D tensor (K, C/groups, R, S), got {getattr(weight, 'shape', weight)}")
    check_like(x, weight, "weight", prefix=prefix)
    for name, pair in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(pair) != 2:
            raise ValueError(f"{prefix} {name} must have 2 values, got {list(pair)}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"{prefix} stride and dilation must be >= 1 and padding >= 0, got stride={tuple(stride)}, "
            f"padding={tuple(padding)}, dilation={tuple(dilation)}"
        )
    channels, out_channels = x.shape[1], weight.shape[0]
    if not isinstance(groups, int) or groups < 1 or channels % groups or out_channels % groups:
        raise ValueError(
            f"{prefix} groups={groups} must divide the input channels ({channels}) "
            f"and the output channels ({out_channels})"
        )
    if weight.shape[1] * groups != channels:
        raise ValueError(
            f"{prefix} input has {channels} channels but weight expects {weight.shape[1] * groups} "
            f"({weight.shape[1]} per group x {groups} groups)"
        )
    check_channel_vector(x, bias, "bias", out_channels, prefix)
    out_shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation, prefix)
    if residual is not None:
        check_like(x, residual, "residual", shape=out_shape, prefix=prefix)
    return out_shape


def check_bn_train_args(x, weight, bias, residual, prefix: str = PREFIX, empty_batch_ok: bool = False) -> int:
    """Every argument of bn_act_train; returns the values per channel (N*H*W)."""
    check_activation(x, "x", prefix, empty_batch_ok)
    channels = x.shape[1]
    check_channel_vector(x, weight, "weight", channels, prefix)
    check_channel_vector(x, bias, "bias", channels, prefix)
    if residual is not None:
        check_like(x, residual, "residual", shape=x.shape, prefix=prefix)
    count = x.numel() // channels
    if count < 2 and not (empty_batch_ok and count == 0):
        raise ValueError(
            f"{prefix} batch norm in training needs more than 1 value per channel, got input of shape {tuple(x.shape)}"
        )
    return count


def check_flag(value, name: str, prefix: str = PREFIX) -> None:
    """A plain bool (a truthy tensor or string is a mistake, not a choice)."""
    if not isinstance(value, bool):
        raise TypeError(f"{prefix} {name} must be a bool, got {type(value).__name__}")


def _number(value) -> bool:
    """A real Python number, or a symbolic one while torch.compile traces
    (whose range is checked when the compiled code runs with real values)."""
    return isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(value, bool)


def check_eps(eps, prefix: str = PREFIX) -> None:
    if not _number(eps):
        raise TypeError(f"{prefix} eps must be a float, got {type(eps).__name__}")
    if isinstance(eps, numbers.Real) and not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{prefix} eps must be a positive finite number, got {eps}")


def check_momentum(momentum, prefix: str = PREFIX) -> None:
    if not _number(momentum):
        raise TypeError(f"{prefix} momentum must be a float in [0, 1], got {type(momentum).__name__}")
    if isinstance(momentum, numbers.Real) and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{prefix} momentum must be in [0, 1], got {momentum}")
