"""Convolution as one matrix product, for CPU training where the image is
small and the weight large: ResNet's last stages at training sizes (512
channels over 4x4 or 7x7 pixels, 1x1 convolutions of 1024-2048 channels).

There, aten's oneDNN convolution is bound by the weight, not the
arithmetic: its weight gradient comes out in a blocked layout and is
reordered into the parameter's, which for a 512-channel 3x3 weight takes
longer than the products themselves (8 images at 4x4 pixels: 7-40 ms,
where the one product [512, 128] x [128, 4608] takes 1.6 ms on a 2-core
AVX-512 CPU), and its forward and input gradient run at half the matrix
unit's speed. Laid out channels_last, the input's patches ("im2col": one
row of the taps' channels per output pixel) are a strided view of the
padded input, so each product costs one copy of those patches at most,
which is small exactly where this route is taken (few pixels).

conv2d is differentiable (GemmConv2d); its backward computes the input
gradient as the patches' gradient folded back onto the image (col2im: one
strided add per kernel tap).

A channels_last weight larger than 1x1 at stride 1 takes the products
tap by tap instead (_TapSpan): each tap's [K, C] slice is a plain matrix
of such a weight, and each tap multiplies only the output pixels whose
input for it lies inside the image. At 4x4 pixels a 3x3 kernel's patches
are 30% padding, which the patches' product multiplies and this one
skips, and no patches are copied; forward and backward of a 512-channel
3x3 layer measured 1.08x (8 images at 4x4), 1.16x (8 at 7x7) and 1.21x
(16 at 4x4) the patches' speed on a 2-core AMD Zen 4, alternating in one
process.
"""
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_memory import empty_for_step
from .validation import conv_output_shape

Pair = Tuple[int, int]


def _two(value) -> Pair:
    """An int or a pair (stride, padding and dilation as modules and the op schemas hold them) as a pair."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


# The route is taken for at most MAX_PIXELS output pixels (batch x output
# height x width) and a weight of at least MIN_WEIGHT_ELEMENTS (3x3 and
# larger kernels) or MIN_WEIGHT_ELEMENTS_1X1 (1x1, whose patches are the
# input itself). Measured on a 2-core AVX-512 CPU, forward and backward
# together against aten's: a 512-channel 3x3 at 128 pixels 2.9-8.6x, 256 to
# 512 channels 3x3 stride 2 1.7x, 1x1 of 256 to 2048 channels at 128 to
# 392 pixels 1.2-2.7x; a 256-channel 3x3 (0.6M weights) 0.85-0.97x at 49
# to 392 pixels, a 512-channel 3x3 at 1568 pixels 1.0x.
MAX_PIXELS = 512
MIN_WEIGHT_ELEMENTS = 1 << 20
MIN_WEIGHT_ELEMENTS_1X1 = 1 << 17


# Measured where aten's CPU kernels are AVX-512 ones. On a 2-core AVX2 CPU
# oneDNN's 1x1 convolution gradients measured 5-20% faster than the same
# matrix products, so there the route stays off unless asked for.
_MEASURED_CPU = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def enabled() -> bool:
    """Whether the route may run: on AVX-512 CPUs unless
    RESNET_FAST_CPU_GEMM_CONV=0 in the environment, elsewhere only with
    RESNET_FAST_CPU_GEMM_CONV=1."""
    setting = os.environ.get("RESNET_FAST_CPU_GEMM_CONV", "")
    return setting == "1" or (setting != "0" and _MEASURED_CPU)


def applies(x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair, groups: int) -> bool:
    """Whether a training convolution of x by weight (no bias) takes this
    route: CPU float32, one group, a large weight over few output pixels,
    outside torch.compile (which plans its own convolutions) and CPU
    autocast (where aten's convolution runs in the autocast dtype)."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() == 4 and weight.dim() == 4):
        return False
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and groups == 1):
        return False
    one_by_one = tuple(weight.shape[2:]) == (1, 1)
    if weight.numel() < (MIN_WEIGHT_ELEMENTS_1X1 if one_by_one else MIN_WEIGHT_ELEMENTS):
        return False
    if not enabled() or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    out_h, out_w = _out_hw(x, weight, _two(stride), _two(padding), _two(dilation))
    return 0 < x.shape[0] * out_h * out_w <= MAX_PIXELS


def _channels_innermost(weight: Tensor) -> bool:
    """The order of the taps in the patches and the weight matrix: each
    tap's channels together (R, S, C), the memory order of a channels_last
    weight (and of every 1x1 one), or each channel's taps together
    (C, R, S), that of a contiguous weight. Either way the weight is read,
    and its gradient written, in its own memory order: permuting a
    512-channel 3x3 weight took 2.2 ms, twice per step, and its gradient
    1.4 ms more, where each product takes 4-5 ms (2-core AMD Zen 4)."""
    return weight.is_contiguous(memory_format=torch.channels_last)


def _patches(x: Tensor, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair, out_hw: Pair,
             channels_innermost: bool) -> Tensor:
    """[N * OH * OW, R * S * C]: row p holds the R x S taps of the C
    channels that output pixel p reads, in _channels_innermost's order."""
    n, c = x.shape[:2]
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    nhwc = padded.permute(0, 2, 3, 1).contiguous()
    sn, sh, sw, sc = nhwc.stride()
    pixels = (n, out_hw[0], out_hw[1]), (sn, sh * stride[0], sw * stride[1])
    taps = (kernel[0], kernel[1]), (sh * dilation[0], sw * dilation[1])
    if channels_innermost:
        view = nhwc.as_strided(pixels[0] + taps[0] + (c,), pixels[1] + taps[1] + (sc,))
    else:
        view = nhwc.as_strided(pixels[0] + (c,) + taps[0], pixels[1] + (sc,) + taps[1])
    return view.reshape(n * out_hw[0] * out_hw[1], kernel[0] * kernel[1] * c)


def _weight_matrix(weight: Tensor, channels_innermost: bool) -> Tensor:
    """[K, R * S * C], the taps in _patches' order."""
    k = weight.shape[0]
    return (weight.permute(0, 2, 3, 1) if channels_innermost else weight).reshape(k, -1)


def _out_hw(x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    return conv_output_shape(x.shape, weight.shape, stride, padding, dilation)[2:]


def _as_image(rows: Tensor, n: int, out_hw: Pair) -> Tensor:
    """[N * OH * OW, K] rows as an (N, K, OH, OW) channels_last tensor."""
    return rows.view(n, out_hw[0], out_hw[1], -1).permute(0, 3, 1, 2)


def _in_layout_of(rows: Tensor, weight: Tensor, channels_innermost: bool) -> Tensor:
    """[K, R * S * C] rows (in _patches' order) as a tensor of weight's
    shape, in the rows' own memory: channels_last or contiguous, weight's
    own layout (the gradient layout autograd and DDP's buckets expect) but
    for a weight of other strides, whose gradient is contiguous."""
    if channels_innermost:
        return rows.as_strided(weight.shape, weight.stride())
    return rows.view(weight.shape)


class _TapSpan:
    """The output pixels along one dimension whose input for kernel tap
    `tap` lies inside the image (the others read padding): outputs
    [first, end), reading inputs first_input, first_input + stride, ..."""

    __slots__ = ("first", "end", "first_input", "stride")

    def __init__(self, tap: int, out_size: int, in_size: int, stride: int, padding: int, dilation: int):
        offset = tap * dilation - padding  # output o reads input o * stride + offset
        self.first = max(0, -(offset // stride))
        self.end = max(self.first, min(out_size, (in_size - 1 - offset) // stride + 1))
        self.first_input, self.stride = self.first * stride + offset, stride

    def outputs(self) -> slice:
        return slice(self.first, self.end)

    def inputs(self) -> slice:
        return slice(self.first_input, self.first_input + (self.end - self.first - 1) * self.stride + 1, self.stride)

    def __len__(self) -> int:
        return self.end - self.first


def _by_taps(weight: Tensor, stride: Pair) -> bool:
    """Whether the products run tap by tap (the module's docstring): a
    channels_last weight (each tap's [K, C] a plain matrix) larger than 1x1,
    at stride 1. At stride 2 each tap's pixels are a strided copy, and a
    512-channel 3x3 layer from 256 channels at 8x8 measured 0.94-0.99x the
    patches' speed that way."""
    return _channels_innermost(weight) and weight.shape[2] * weight.shape[3] > 1 and stride == (1, 1)


def _tap_spans(x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair,
               out_hw: Pair) -> list:
    """(row, column, rows' span, columns' span) of every tap that reads some
    pixel of the image."""
    spans = []
    for i in range(weight.shape[2]):
        rows = _TapSpan(i, out_hw[0], x.shape[2], stride[0], padding[0], dilation[0])
        for j in range(weight.shape[3]):
            cols = _TapSpan(j, out_hw[1], x.shape[3], stride[1], padding[1], dilation[1])
            if len(rows) and len(cols):
                spans.append((i, j, rows, cols))
    return spans


def _forward_by_taps(x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair,
                     out_hw: Pair) -> Tensor:
    """conv2d as one product per tap, [pixels the tap reads, C] x [C, K],
    each added into its outputs; a tap that every output reads (the centre
    of a 'same' convolution) writes the result first, with no zero fill."""
    n, c = x.shape[:2]
    k = weight.shape[0]
    image, taps = x.permute(0, 2, 3, 1), weight.permute(0, 2, 3, 1)  # NHWC; [K, R, S, C]
    spans = _tap_spans(x, weight, stride, padding, dilation, out_hw)
    spans.sort(key=lambda span: (len(span[2]), len(span[3])) != out_hw)  # a tap read by every output first
    out = None
    for i, j, rows, cols in spans:
        product = (image[:, rows.inputs(), cols.inputs()].reshape(-1, c) @ taps[:, i, j].t())
        product = product.view(n, len(rows), len(cols), k)
        if out is None and (len(rows), len(cols)) == out_hw:
            out = product
        else:
            if out is None:
                out = x.new_zeros(n, *out_hw, k)
            out[:, rows.outputs(), cols.outputs()] += product
    if out is None:  # no output reads the image: every one is padding's
        out = x.new_zeros(n, *out_hw, k)
    return out.permute(0, 3, 1, 2)


def _backward_by_taps(grad_out: Tensor, x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair,
                      needs: Tuple[bool, bool]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """_forward_by_taps' gradients, tap by tap: each tap's slice of the
    weight gradient written in place (its [K, C] matrix of a channels_last
    gradient), and the input gradient as each tap's product added into the
    pixels it read."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    out_hw = tuple(grad_out.shape[2:])
    image, taps, grads = x.permute(0, 2, 3, 1), weight.permute(0, 2, 3, 1), grad_out.permute(0, 2, 3, 1)
    spans = _tap_spans(x, weight, stride, padding, dilation, out_hw)
    # A tap that reads every pixel (stride 1) first: its product starts the input gradient.
    spans.sort(key=lambda span: (len(span[2]), len(span[3]), span[2].stride, span[3].stride) != (h, w, 1, 1))
    grad_taps = None
    if needs[1]:
        grad_taps = empty_for_step(weight, (k, *weight.shape[2:], c))  # [K, R, S, C]
        read = {(i, j) for i, j, _, _ in spans}
        for i in range(weight.shape[2]):
            for j in range(weight.shape[3]):
                if (i, j) not in read:  # a tap that only ever reads padding
                    grad_taps[:, i, j].zero_()
    grad_image = None
    for i, j, rows, cols in spans:
        g = grads[:, rows.outputs(), cols.outputs()].reshape(-1, k)
        if needs[1]:
            torch.mm(g.t(), image[:, rows.inputs(), cols.inputs()].reshape(-1, c), out=grad_taps[:, i, j])
        if needs[0]:
            part = (g @ taps[:, i, j]).view(n, len(rows), len(cols), c)
            if grad_image is None and (len(rows), len(cols), rows.stride, cols.stride) == (h, w, 1, 1):
                grad_image = part
            else:
                if grad_image is None:
                    grad_image = x.new_zeros(n, h, w, c)
                grad_image[:, rows.inputs(), cols.inputs()] += part
    if needs[0] and grad_image is None:  # no pixel is read
        grad_image = x.new_zeros(n, h, w, c)
    return (None if grad_image is None else grad_image.permute(0, 3, 1, 2),
            None if grad_taps is None else grad_taps.permute(0, 3, 1, 2))


def forward(x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    stride, padding, dilation = _two(stride), _two(padding), _two(dilation)
    out_hw = _out_hw(x, weight, stride, padding, dilation)
    channels_innermost = _channels_innermost(weight)
    if _by_taps(weight, stride):
        out = _forward_by_taps(x, weight, stride, padding, dilation, out_hw)
    else:
        cols = _patches(x, weight.shape[2:], stride, padding, dilation, out_hw, channels_innermost)
        out = _as_image(cols @ _weight_matrix(weight, channels_innermost).t(), x.shape[0], out_hw)
    # channels_last where x or the weight is, as aten's CPU convolution gives
    # it (a weight that is both, as a 1x1 one, counts as contiguous).
    weight_channels_last = channels_innermost and not weight.is_contiguous()
    return out if x.is_contiguous(memory_format=torch.channels_last) or weight_channels_last else out.contiguous()


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair,
             needs: Tuple[bool, bool]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad x, grad weight), each only where needs asks; channels_last."""
    stride, padding, dilation = _two(stride), _two(padding), _two(dilation)
    if _by_taps(weight, stride):
        return _backward_by_taps(grad_out, x, weight, stride, padding, dilation, needs)
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    out_hw = tuple(grad_out.shape[2:])
    grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, k)  # [N * OH * OW, K]
    channels_innermost = _channels_innermost(weight)
    grad_x = grad_weight = None
    if needs[1]:
        cols = _patches(x, (r, s), stride, padding, dilation, out_hw, channels_innermost)
        product = torch.mm(grad_rows.t(), cols, out=empty_for_step(weight, (k, cols.shape[1])))
        grad_weight = _in_layout_of(product, weight, channels_innermost)
    if needs[0]:
        # Computed transposed ([R * S * C, N * OH * OW], read back as a view):
        # MKL ran this product 6-9% faster that way round for 512-channel
        # 3x3 weights on a 2-core AVX-512 CPU (AMD Zen 4), level for 1x1.
        grad_cols = (_weight_matrix(weight, channels_innermost).t() @ grad_rows.t()).t()
        grad_cols = grad_cols.view(n, *out_hw, r, s, c) if channels_innermost else grad_cols.view(n, *out_hw, c, r, s)
        padded = x.new_zeros(n, h + 2 * padding[0], w + 2 * padding[1], c)
        for i in range(r):
            for j in range(s):
                top, left = i * dilation[0], j * dilation[1]
                tap = grad_cols[:, :, :, i, j] if channels_innermost else grad_cols[..., i, j]
                padded[:, top:top + stride[0] * (out_hw[0] - 1) + 1:stride[0],
                       left:left + stride[1] * (out_hw[1] - 1) + 1:stride[1]] += tap
        grad_x = padded[:, padding[0]:padding[0] + h, padding[1]:padding[1] + w].permute(0, 3, 1, 2)
    return grad_x, grad_weight


class GemmConv2d(torch.autograd.Function):
    """conv2d(x, weight) (no bias, one group) by the products above."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (stride, padding, dilation)
        return forward(x, weight, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv_args
        if torch.is_grad_enabled():  # create_graph=True: through aten's differentiable convolution
            return (*_differentiable_grads(grad_out, x, weight, stride, padding, dilation, ctx.needs_input_grad[:2]),
                    None, None, None)
        grad_x, grad_weight = backward(grad_out, x, weight, stride, padding, dilation, ctx.needs_input_grad[:2])
        return grad_x, grad_weight, None, None, None


def _differentiable_grads(grad_out, x, weight, stride, padding, dilation, needs):
    """(grad x, grad weight) with their own graph: F.conv2d recomputed on
    fresh views of the inputs, differentiated with create_graph."""
    with torch.enable_grad():
        views = (x.view_as(x), weight.view_as(weight))
        wanted = [v for v, needed in zip(views, needs) if needed]
        out = F.conv2d(views[0], views[1], None, stride, padding, dilation)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    return tuple(next(grads) if needed else None for needed in needs)


def conv2d(x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    return GemmConv2d.apply(x, weight, stride, padding, dilation)
