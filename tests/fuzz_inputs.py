"""Hypothesis strategies and tensor builders for the fuzz tests
(tests/test_fuzz.py): op geometries, dtypes and memory layouts.

Strategies draw shapes and a seed; the tensors come from torch's generator
seeded with it, so a failing example (printed by hypothesis) rebuilds the
same tensors.
"""
import torch
from hypothesis import strategies as st

from conftest import channels_last

LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NON_FINITE = (float("nan"), float("inf"), float("-inf"))

seeds = st.integers(0, 2**31 - 1)
layouts = st.sampled_from(LAYOUTS)
dtypes = st.sampled_from(DTYPES)


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in the given memory layout (4-D tensors)."""
    if layout == "channels_last":
        return channels_last(t)
    if layout == "sliced":
        # A strided view with a storage offset, inside a NaN-filled buffer:
        # a kernel that reads outside the view sees NaN.
        n, c, h, w = t.shape
        buffer = torch.full((n, c + 1, h, 2 * w), float("nan"), dtype=t.dtype)
        view = buffer[:, 1:, :, ::2]
        view.copy_(t)
        return view
    if layout == "transposed":  # H and W strides swapped
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous()


def randn(gen: torch.Generator, shape, dtype=torch.float32, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype)


def plant(gen: torch.Generator, t: torch.Tensor, value: float, count: int) -> torch.Tensor:
    """A contiguous copy of t with `value` written at `count` random positions."""
    t = t.contiguous().clone()
    t.view(-1)[torch.randint(0, t.numel(), (count,), generator=gen)] = value
    return t


@st.composite
def conv_geometries(draw, max_batch=3, max_group_channels=5, max_extra_size=8, kernels=(1, 3, 5, 7), max_padding=3):
    """Shapes and arguments of one convolution: any groups dividing both
    channel counts, square or oblong kernels, stride, padding and dilation,
    and spatial sizes from the smallest the (dilated) kernel allows."""
    groups = draw(st.sampled_from((1, 1, 2, 3, 4)))
    channels = groups * draw(st.integers(1, max_group_channels))
    out_channels = groups * draw(st.integers(1, 4))
    kernel = (draw(st.sampled_from(kernels)), draw(st.sampled_from(kernels)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, max_padding)), draw(st.integers(0, max_padding)))
    size = []
    for d in range(2):
        smallest = max(1, dilation[d] * (kernel[d] - 1) + 1 - 2 * padding[d])
        size.append(draw(st.integers(smallest, smallest + max_extra_size)))
    return dict(
        x_shape=(draw(st.integers(1, max_batch)), channels, *size),
        w_shape=(out_channels, channels // groups, *kernel),
        stride=stride, padding=padding, dilation=dilation, groups=groups,
    )


@st.composite
def activation_shapes(draw, max_batch=3, max_channels=9, max_size=7, min_count=1):
    """(N, C, H, W) with at least min_count values per channel."""
    n, c = draw(st.integers(1, max_batch)), draw(st.integers(1, max_channels))
    h, w = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    if n * h * w < min_count:
        w = -(-min_count // (n * h))
    return (n, c, h, w)
