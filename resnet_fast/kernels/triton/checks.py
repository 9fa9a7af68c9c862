"""Argument checks shared by the launchers, so that a direct call through
torch.ops.resnet_fast_triton fails with a message instead of a bad launch."""
from typing import Optional, Sequence

import torch

from .runtime import INTERPRET

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREFIX = "resnet_fast_triton:"


def check_activation(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{PREFIX} {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{PREFIX} {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{PREFIX} {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{PREFIX} {name} is empty (shape {tuple(t.shape)})")
    if not INTERPRET and t.device.type not in ("cuda", "meta"):
        raise ValueError(
            f"{PREFIX} {name} is on {t.device}; the Triton kernels run on CUDA tensors "
            "(or on CPU tensors under TRITON_INTERPRET=1)"
        )


def check_like(
    ref: torch.Tensor,
    t: torch.Tensor,
    name: str,
    shape: Optional[Sequence[int]] = None,
    same_dtype: bool = True,
) -> None:
    """t is on ref's device, has ref's dtype (when asked) and the given shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{PREFIX} {name} must be a Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{PREFIX} {name} is on {t.device} but the input is on {ref.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{PREFIX} {name} has dtype {t.dtype} but the input has {ref.dtype}")
    if not same_dtype and not t.is_floating_point():
        raise TypeError(f"{PREFIX} {name} must be a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{PREFIX} {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_channel_vector(ref: torch.Tensor, t: torch.Tensor, name: str, channels: int) -> None:
    check_like(ref, t, name, shape=(channels,), same_dtype=False)
