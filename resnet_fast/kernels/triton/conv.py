"""conv_bias_act: act(conv2d(x, w) + bias + residual) as one implicit GEMM.

The GEMM is  out[M, K] = A[M, R*S*C/groups] @ B[R*S*C/groups, K/groups]  per
group, where a row of out is one output pixel (n, p, q) of the NHWC output
and A is never materialised: each tile of A is gathered from the NHWC input
(a C-contiguous row per pixel and filter tap), with zeros for the padding.
The bias, the residual and the ReLU are applied to the fp32 accumulator,
which is cast and stored once.

Two ways to walk the reduction, chosen per call:
  channel blocks  (r, s) taps x blocks of BLOCK_K input channels. Each A
                  tile row is contiguous in memory. Used when a group has
                  at least 16 input channels (every conv of a ResNet but
                  the stem and narrow ResNeXt groups).
  flat            the R*S*C/groups reduction index split into (r, s, c) per
                  element, so BLOCK_K spans several taps. Used for few input
                  channels (the 7x7 stem has C=3, where channel blocks would
                  multiply zeros 13 times out of 16).
"""
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .checks import PREFIX, check_conv_args
from .runtime import INTERPRET, autotune_enabled, device_guard, dot_precision, launchable, traceable

# Below this many input channels per group the flat reduction wastes less.
FLAT_REDUCTION_MAX_CHANNELS = 16


def _config(block_m, block_n, block_k, num_stages, num_warps, group_m=8):
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
    return triton.Config(meta, num_stages=num_stages, num_warps=num_warps)


# One config for the interpreter (it cannot benchmark; small blocks make the
# tests cross tile and channel-block boundaries), and one per reduction walk
# for GPU runs with autotuning switched off (runtime.autotune_enabled). The
# flat walk's per-element index arithmetic needs more registers: at 128 rows
# per 4 warps it spills under triton 3.6 (resnet_fast/kernels/triton/KERNELS.md),
# at 64 it does not.
_INTERPRETER_CONFIG = dict(block_m=32, block_n=32, block_k=16, num_stages=1, num_warps=4, group_m=2)
DEFAULT_GPU_CONFIGS = {
    "channel_blocks": dict(block_m=128, block_n=64, block_k=32, num_stages=4, num_warps=4),
    "flat": dict(block_m=64, block_n=64, block_k=32, num_stages=4, num_warps=4),
}
# Tutorial/Inductor-style GEMM tiles for sm80/sm90, plus narrow-N tiles for
# ResNeXt groups (K/groups is 4..32 there) and the 64-channel layers.
_GPU_CONFIGS = [
    _config(128, 128, 32, 4, 8),
    _config(128, 128, 64, 3, 8),
    _config(256, 64, 32, 3, 8),
    _config(**DEFAULT_GPU_CONFIGS["channel_blocks"]),
    _config(128, 64, 64, 3, 4),
    _config(64, 128, 32, 4, 4),
    _config(**DEFAULT_GPU_CONFIGS["flat"]),
    _config(64, 64, 64, 3, 4),
    _config(128, 32, 32, 4, 4),
    _config(64, 32, 32, 5, 2),
    _config(128, 16, 32, 4, 4),
    _config(64, 16, 64, 4, 2),
]
_TUNING_KEY = ["M", "C", "K", "KG", "H", "W", "stride_h", "stride_w", "dil_h", "R", "S", "FLAT_REDUCTION"]


@triton.jit
def _conv_bias_act_kernel(
    x_ptr,  # [N, H, W, C] contiguous
    w_ptr,  # [R, S, CG, K] contiguous: row (r*S + s)*CG + c of a [R*S*CG, K] matrix
    bias_ptr,  # [K]
    res_ptr,  # [N, P, Q, K] contiguous (read only when HAS_RESIDUAL)
    out_ptr,  # [N, P, Q, K] contiguous
    M, H, W, C, P, Q, K,
    CG, KG,  # input and output channels per group
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, FLAT_REDUCTION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Tile order: GROUP_M row tiles sweep all column tiles together, so the
    # input rows they gather stay in L2 (as in Triton's matmul tutorial).
    pid = tl.program_id(0)
    group = tl.program_id(1)
    # Ceiling divisions spelled out (see reduction.py on triton's @jit library).
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (KG + BLOCK_N - 1) // BLOCK_N
    tiles_per_band = GROUP_M * tiles_n
    first_m = (pid // tiles_per_band) * GROUP_M
    band_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_band) % band_m
    pid_n = (pid % tiles_per_band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel within the group
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < KG

    # Output pixel -> image and the input corner its filter window starts at.
    q = offs_m % Q
    p = (offs_m // Q) % P
    image = offs_m // (P * Q)
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    image_rows = image.to(tl.int64) * H  # int64 before the products that can pass 2**31
    x_group = x_ptr + group * CG
    w_cols = w_ptr + group * KG + offs_n

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    if FLAT_REDUCTION:
        reduction = R * S * CG
        for k0 in range(0, reduction, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < reduction
            c = kk % CG
            tap = kk // CG
            ih = ih0[:, None] + (tap // S)[None, :] * dil_h
            iw = iw0[:, None] + (tap % S)[None, :] * dil_w
            a_mask = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_group + ((image_rows[:, None] + ih) * W + iw) * C + c[None, :], mask=a_mask, other=0.0)
            b = tl.load(w_cols[None, :] + kk[:, None] * K, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        c_blocks = (CG + BLOCK_K - 1) // BLOCK_K
        # One loop over (tap, channel block) so that the pipeliner sees a
        # single loop to software-pipeline.
        for step in range(0, R * S * c_blocks):
            tap = step // c_blocks
            c = (step - tap * c_blocks) * BLOCK_K + offs_k
            c_ok = c < CG
            ih = ih0 + (tap // S) * dil_h
            iw = iw0 + (tap % S) * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row_start = ((image_rows + ih) * W + iw) * C
            a = tl.load(x_group + row_start[:, None] + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + (tap * CG + c)[:, None] * K, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # Epilogue, in fp32: + bias, + residual, ReLU; one store.
    cols = group * KG + offs_n
    acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_offsets = offs_m.to(tl.int64)[:, None] * K + cols[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # not maximum(): NaN must stay NaN
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# Launchable variants of the one kernel: autotuned, and a fixed config per walk.
_conv_tuned = triton.autotune(
    configs=[_config(**_INTERPRETER_CONFIG)] if INTERPRET else _GPU_CONFIGS, key=_TUNING_KEY
)(_conv_bias_act_kernel)
_conv_fixed = {
    flat: triton.autotune(
        configs=[_config(**(_INTERPRETER_CONFIG if INTERPRET else DEFAULT_GPU_CONFIGS[walk]))], key=_TUNING_KEY
    )(_conv_bias_act_kernel)
    for flat, walk in ((True, "flat"), (False, "channel_blocks"))
}


def _check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups):
    out_shape = check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups)
    if INTERPRET and x.dtype == torch.bfloat16:
        raise NotImplementedError(
            f"{PREFIX} bfloat16 convolution needs a GPU: the Triton interpreter does not simulate bf16 tl.dot"
        )
    return out_shape


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    reduction: str = "auto",
) -> torch.Tensor:
    """act(conv2d(x, weight, stride, padding, dilation, groups) + bias + residual).

    Any input layout; the output is channels_last in x's dtype. `reduction`
    ("auto", "flat" or "channel_blocks") picks the walk over the reduction;
    only tests override the automatic choice.
    """
    out_shape = _check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups)
    if reduction not in ("auto", "flat", "channel_blocks"):
        raise ValueError(f"{PREFIX} reduction must be 'auto', 'flat' or 'channel_blocks', got {reduction!r}")
    n, channels, height, width = x.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    _, _, out_h, out_w = out_shape
    group_out_channels = out_channels // groups
    flat = group_channels < FLAT_REDUCTION_MAX_CHANNELS if reduction == "auto" else reduction == "flat"

    x = x.contiguous(memory_format=torch.channels_last)
    # [K, C/g, R, S] -> [R, S, C/g, K]: a GEMM B operand with output channels
    # contiguous. One small copy per call.
    w_gemm = weight.permute(2, 3, 1, 0).contiguous()
    bias = bias.contiguous()
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    # Without a residual the kernel never reads res_ptr; x stands in.
    res = residual.contiguous(memory_format=torch.channels_last) if residual is not None else x
    m = n * out_h * out_w

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(group_out_channels, meta["BLOCK_N"]), groups)

    if not launchable(out):  # computing metadata only (fake kernel under the interpreter)
        return out
    kernel = _conv_tuned if autotune_enabled() else _conv_fixed[flat]
    with device_guard(out):
        traceable(kernel)[grid](
            x, w_gemm, bias, res, out,
            m, height, width, channels, out_h, out_w, out_channels,
            group_channels, group_out_channels,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            R=kernel_h, S=kernel_w,
            HAS_RESIDUAL=residual is not None, RELU=relu, FLAT_REDUCTION=flat,
            DOT_PRECISION=dot_precision(x.dtype, x.device),
        )
    return out
