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
import functools
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .checks import PREFIX, check_conv_args
from .runtime import (INTERPRET, autotune_enabled, capability, device_guard, dot_precision, ensure_scratch_allocator,
                      launchable, traceable, weight_tma_enabled)

# Below this many input channels per group the flat reduction wastes less.
FLAT_REDUCTION_MAX_CHANNELS = 16


def _config(block_m, block_n, block_k, num_stages, num_warps, group_m=8):
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
    return triton.Config(meta, num_stages=num_stages, num_warps=num_warps)


# One config for the interpreter (it cannot benchmark; small blocks make the
# tests cross tile and channel-block boundaries).
_INTERPRETER_CONFIG = dict(block_m=32, block_n=32, block_k=16, num_stages=1, num_warps=4, group_m=2)

# GPU configs, per architecture family and reduction walk, as
# (BLOCK_M, BLOCK_N, num_stages, num_warps); BLOCK_K is set by the walk and
# the operand width (_gpu_block_k). The first of each list is the one a launch
# uses with autotuning switched off (runtime.autotune_enabled).
#
# sm90 (Hopper): tl.dot becomes wgmma when a warp group (4 warps) owns 64
# rows of the tile, so every tile here has BLOCK_M a multiple of 64 and 4 or
# 8 warps; 3-4 stages of 128-byte-deep operand tiles keep the tensor cores
# fed within 227 KB of shared memory (128x128 at 4 stages takes 128 KB).
# 128x128 serves the 256..2048-channel layers (at 3 stages two blocks fit an
# SM), 64x64 the small grids (layer4 at small batch), 128x32 and 64x16 the
# ResNeXt groups (4..32 output channels per group). 128x256 and 128x128 on
# one warp group spill: the gathered activation tile's addresses take the
# registers the accumulator leaves.
# sm80 (Ampere and everything else): mma.sync tiles in the style of
# Triton's matmul tutorial, plus narrow-N tiles for the ResNeXt groups.
#
# The flat walk (the RGB stem) computes an (r, s, c) index per element: its
# tiles stay at most 128 rows per 8 warps or 64 per 4, 32 deep, which keeps
# it out of local memory (resnet_fast/kernels/triton/KERNELS.md); wider ones
# spill.
GPU_TILES = {
    ("sm90", "channel_blocks"): [
        (128, 128, 4, 8), (128, 128, 3, 8), (128, 64, 4, 4), (64, 128, 4, 4),
        (64, 64, 4, 4), (128, 32, 4, 4), (64, 16, 4, 4),
    ],
    ("sm90", "flat"): [(64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 4, 8)],
    ("sm80", "channel_blocks"): [
        (128, 128, 4, 8), (128, 128, 3, 8), (128, 64, 4, 4), (256, 64, 3, 8), (64, 128, 4, 4),
        (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 5, 2), (128, 16, 4, 4), (64, 16, 4, 2),
    ],
    ("sm80", "flat"): [(64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 4, 8)],
}
# The reduction depth of a tile, in bytes of one operand row: 128 bytes (64
# 16-bit or 32 fp32 values) is one wgmma K step of 16-bit data times four
# and the widest shared-memory swizzle. The flat walk stays at 32 values.
_TILE_DEPTH_BYTES = 128
_FLAT_BLOCK_K = 32


def _gpu_block_k(walk: str, element_bytes: int) -> int:
    return _FLAT_BLOCK_K if walk == "flat" else _TILE_DEPTH_BYTES // element_bytes


def _block_k(walk: str, element_bytes: int) -> int:
    """BLOCK_K of every config this process launches for the walk."""
    return _INTERPRETER_CONFIG["block_k"] if INTERPRET else _gpu_block_k(walk, element_bytes)


def gpu_configs(family: str, walk: str, element_bytes: int) -> List[dict]:
    """The launch configs the autotuner chooses among, as _config keywords."""
    block_k = _gpu_block_k(walk, element_bytes)
    return [dict(block_m=m, block_n=n, block_k=block_k, num_stages=stages, num_warps=warps)
            for m, n, stages, warps in GPU_TILES[(family, walk)]]


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
    DOT_PRECISION: tl.constexpr, WEIGHT_TMA: tl.constexpr,
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
    if WEIGHT_TMA:
        # The weight tile by TMA: rows past the reduction come back as zeros;
        # columns past the group's KG hold the next group's weights, which
        # only reach accumulator columns the store masks off.
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[R * S * CG, K], strides=[K, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
        w_col0 = group * KG + pid_n * BLOCK_N

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
            if WEIGHT_TMA:
                b = w_desc.load([k0, w_col0])
            else:
                b = tl.load(w_cols[None, :] + kk[:, None] * K, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        c_blocks = (CG + BLOCK_K - 1) // BLOCK_K
        # One loop over (tap, channel block) so that the pipeliner sees a
        # single loop to software-pipeline.
        for step in range(0, R * S * c_blocks):
            tap = step // c_blocks
            c0 = (step - tap * c_blocks) * BLOCK_K
            c = c0 + offs_k
            c_ok = c < CG
            ih = ih0 + (tap // S) * dil_h
            iw = iw0 + (tap % S) * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row_start = ((image_rows + ih) * W + iw) * C
            a = tl.load(x_group + row_start[:, None] + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            if WEIGHT_TMA:  # CG is a multiple of BLOCK_K: a tile never spans two taps
                b = w_desc.load([tap * CG + c0, w_col0])
            else:
                b = tl.load(w_cols[None, :] + (tap * CG + c)[:, None] * K, mask=c_ok[:, None] & n_ok[None, :],
                            other=0.0)
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


def config_family(device: torch.device) -> str:
    """Which GPU config set a device gets: "sm90" on compute capability 9.x
    (Hopper), "sm80" on everything else."""
    major, _ = capability(device)
    return "sm90" if major == 9 else "sm80"


@functools.lru_cache(maxsize=None)
def launchable_kernel(family: str, walk: str, element_bytes: int, tuned: bool):
    """The kernel with its configs for one family, walk and operand width:
    all of them autotuned per problem (_TUNING_KEY), or the first alone."""
    if INTERPRET:
        configs = [_config(**_INTERPRETER_CONFIG)]
    else:
        configs = [_config(**c) for c in gpu_configs(family, walk, element_bytes)]
    return triton.autotune(configs=configs if tuned else configs[:1], key=_TUNING_KEY)(_conv_bias_act_kernel)


def weight_tma_refusal(w_gemm: torch.Tensor, walk: str, group_channels: int, group_out_channels: int) -> Optional[str]:
    """Why TMA cannot load this [R, S, C/g, K] weight, or None when it can:
    TMA addresses 16-byte aligned rows of a 16-byte aligned base from
    16-byte aligned columns (each group's first), and a channel-block tile
    must not span two filter taps."""
    element_bytes = w_gemm.element_size()
    if (w_gemm.shape[-1] * element_bytes) % 16:
        return f"a row of {w_gemm.shape[-1]} output channels is not a multiple of 16 bytes"
    if (group_out_channels * element_bytes) % 16:
        return f"groups of {group_out_channels} output channels do not start at 16-byte boundaries"
    if (w_gemm.storage_offset() * element_bytes) % 16:
        return "the weight does not start 16-byte aligned"
    block_k = _block_k(walk, element_bytes)
    if walk == "channel_blocks" and group_channels % block_k:
        return f"{group_channels} input channels per group are not a multiple of the tile depth {block_k}"
    return None


def _use_weight_tma(w_gemm: torch.Tensor, walk: str, group_channels: int, group_out_channels: int, family: str,
                    precision: str, requested: Optional[bool]) -> bool:
    if requested is None:
        # Automatic: on Hopper, for tensor-core products (16-bit or TF32),
        # where TMA can address the weight. Exact fp32 multiplies on FMA
        # units, and fed by TMA it spills kilobytes (KERNELS.md).
        tensor_cores = w_gemm.dtype != torch.float32 or precision != "ieee"
        return (not INTERPRET and family == "sm90" and tensor_cores and weight_tma_enabled()
                and weight_tma_refusal(w_gemm, walk, group_channels, group_out_channels) is None)
    if requested:
        refusal = weight_tma_refusal(w_gemm, walk, group_channels, group_out_channels)
        if refusal is not None:
            raise ValueError(f"{PREFIX} weight_tma=True, but TMA cannot load this weight: {refusal}")
    return requested


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
    weight_tma: Optional[bool] = None,
) -> torch.Tensor:
    """act(conv2d(x, weight, stride, padding, dilation, groups) + bias + residual).

    Any input layout; the output is channels_last in x's dtype. `reduction`
    ("auto", "flat" or "channel_blocks") picks the walk over the reduction,
    `weight_tma` whether the weight is loaded by TMA (None: on Hopper for
    16-bit and TF32 where it can be, unless RESNET_FAST_TRITON_TMA=0); only
    tests override them.
    """
    out_shape = _check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups)
    if reduction not in ("auto", "flat", "channel_blocks"):
        raise ValueError(f"{PREFIX} reduction must be 'auto', 'flat' or 'channel_blocks', got {reduction!r}")
    n, channels, height, width = x.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    _, _, out_h, out_w = out_shape
    group_out_channels = out_channels // groups
    flat = group_channels < FLAT_REDUCTION_MAX_CHANNELS if reduction == "auto" else reduction == "flat"
    walk = "flat" if flat else "channel_blocks"

    x = x.contiguous(memory_format=torch.channels_last)
    # [K, C/g, R, S] -> [R, S, C/g, K]: a GEMM B operand with output channels
    # contiguous; a copy unless the weight is stored so already (as
    # resnet_fast.ops.gemm_layout_weight makes it, and the fold cache keeps it).
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
    family = config_family(out.device)
    precision = dot_precision(x.dtype, x.device)
    tma = _use_weight_tma(w_gemm, walk, group_channels, group_out_channels, family, precision, weight_tma)
    if tma and not INTERPRET:
        ensure_scratch_allocator()
    kernel = launchable_kernel(family, walk, x.element_size(), autotune_enabled())
    with device_guard(out):
        traceable(kernel)[grid](
            x, w_gemm, bias, res, out,
            m, height, width, channels, out_h, out_w, out_channels,
            group_channels, group_out_channels,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            R=kernel_h, S=kernel_w,
            HAS_RESIDUAL=residual is not None, RELU=relu, FLAT_REDUCTION=flat,
            DOT_PRECISION=precision, WEIGHT_TMA=tma,
        )
    return out
