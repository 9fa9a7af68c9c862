"""Training BatchNorm + residual + ReLU, forward and backward, on NHWC
tensors seen as [M, C] matrices (see reduction.py for the tiling).

Forward, three launches:
  1. per chunk of rows: count, mean and sum of squared deviations (M2) of
     each channel; each BLOCK_M-row tile is reduced exactly (its mean first,
     then deviations from it) and merged into the chunk's running values with
     Chan's parallel formula, never as E[x^2] - E[x]^2;
  2. per channel: the chunk partials merged in chunk order (Chan again), then
     mean, biased variance, invstd and the affine scale/shift;
  3. out = act(x * scale + shift + residual), one pass.
Backward, three launches: masked gradient and its per-channel sums
(epilogue.relu_grad_partial_sums_kernel), the chunk sums combined into
grad_weight / grad_bias, then grad_x.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import check_activation, check_bn_train_args, check_channel_vector, check_like
from .epilogue import check_grad_pair, relu_grad_partial_sums_kernel
from .reduction import nhwc_tile, plan_rows, sum_rows
from .runtime import device_guard, launchable, traceable


@triton.jit
def _partial_stats_kernel(
    x_ptr,  # [M, C]
    part_mean_ptr,  # [num_chunks, C] fp32
    part_m2_ptr,  # [num_chunks, C] fp32
    M, C, rows_per_chunk,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    row_start = chunk * rows_per_chunk
    row_end = min(row_start + rows_per_chunk, M)
    count = 0.0
    mean = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    m2 = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tile_count = tl.minimum(row_end - start, BLOCK_M).to(tl.float32)
        tile_mean = sum_rows(x) / tile_count
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = sum_rows(deviation * deviation)
        # Chan et al.: merge (count, mean, m2) with the tile's.
        total = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / total)
        m2 += tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    tl.store(part_mean_ptr + chunk * C + cols, mean, mask=c_ok)
    tl.store(part_m2_ptr + chunk * C + cols, m2, mask=c_ok)


@triton.jit
def _finalize_stats_kernel(
    part_mean_ptr, part_m2_ptr,  # [num_chunks, C] fp32
    weight_ptr, bias_ptr,  # [C]
    mean_ptr, invstd_ptr, var_ptr,  # [C] fp32 outputs
    scale_ptr, shift_ptr,  # [C] fp32: the affine map the apply pass uses
    M, C, rows_per_chunk, num_chunks, eps,
    BLOCK_CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    count = 0.0
    mean = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    m2 = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    for first in range(0, num_chunks, BLOCK_CHUNKS):  # fixed order: deterministic
        chunks = first + tl.arange(0, BLOCK_CHUNKS)
        chunk_ok = chunks < num_chunks
        mask = chunk_ok[:, None] & c_ok[None, :]
        offsets = chunks[:, None] * C + cols[None, :]
        chunk_mean = tl.load(part_mean_ptr + offsets, mask=mask, other=0.0)
        chunk_m2 = tl.load(part_m2_ptr + offsets, mask=mask, other=0.0)
        chunk_count = tl.where(chunk_ok, tl.minimum(M - chunks * rows_per_chunk, rows_per_chunk), 0).to(tl.float32)
        # These BLOCK_CHUNKS partials as one: the pooled mean, and M2 plus
        # each partial's spread around it (exact, no cancellation).
        step_count = sum_rows(chunk_count)
        step_mean = sum_rows(chunk_count[:, None] * chunk_mean) / step_count
        spread = chunk_mean - step_mean[None, :]
        step_m2 = sum_rows(chunk_m2 + chunk_count[:, None] * spread * spread)
        total = count + step_count
        delta = step_mean - mean
        mean += delta * (step_count / total)
        m2 += step_m2 + delta * delta * (count * step_count / total)
        count = total
    var = m2 / count
    invstd = 1.0 / tl.sqrt_rn(var + eps)  # correctly rounded, unlike rsqrt.approx
    scale = tl.load(weight_ptr + cols, mask=c_ok, other=0.0).to(tl.float32) * invstd
    shift = tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(tl.float32) - mean * scale
    tl.store(mean_ptr + cols, mean, mask=c_ok)
    tl.store(invstd_ptr + cols, invstd, mask=c_ok)
    tl.store(var_ptr + cols, var, mask=c_ok)
    tl.store(scale_ptr + cols, scale, mask=c_ok)
    tl.store(shift_ptr + cols, shift, mask=c_ok)


@triton.jit
def _apply_kernel(
    x_ptr, res_ptr, out_ptr,  # [M, C]
    scale_ptr, shift_ptr,  # [C] fp32
    M, C,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, c_ok, mask, offsets = nhwc_tile(M, C, BLOCK_M, BLOCK_C)
    scale = tl.load(scale_ptr + cols, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=c_ok, other=0.0)
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        z = tl.where(z < 0, 0.0, z)  # not maximum(): NaN must stay NaN
    tl.store(out_ptr + offsets, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finalize_grads_kernel(
    part_dz_ptr, part_dzx_ptr,  # [num_chunks, C] fp32: sums of dz and dz * (x - mean)
    weight_ptr, invstd_ptr,  # [C]
    grad_weight_ptr, grad_bias_ptr,  # [C], weight's dtype
    coef_scale_ptr, coef_mean_dz_ptr, coef_mean_dzxhat_ptr,  # [C] fp32, for the grad_x pass
    M, C, num_chunks,
    BLOCK_CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    sum_dz = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    sum_dzx = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    for first in range(0, num_chunks, BLOCK_CHUNKS):  # fixed order: deterministic
        chunks = first + tl.arange(0, BLOCK_CHUNKS)
        mask = (chunks < num_chunks)[:, None] & c_ok[None, :]
        offsets = chunks[:, None] * C + cols[None, :]
        sum_dz += sum_rows(tl.load(part_dz_ptr + offsets, mask=mask, other=0.0))
        sum_dzx += sum_rows(tl.load(part_dzx_ptr + offsets, mask=mask, other=0.0))
    invstd = tl.load(invstd_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    grad_weight = sum_dzx * invstd  # sum(dz * xhat)
    tl.store(grad_weight_ptr + cols, grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=c_ok)
    tl.store(grad_bias_ptr + cols, sum_dz.to(grad_bias_ptr.dtype.element_ty), mask=c_ok)
    tl.store(coef_scale_ptr + cols, weight * invstd, mask=c_ok)
    tl.store(coef_mean_dz_ptr + cols, sum_dz / M, mask=c_ok)
    tl.store(coef_mean_dzxhat_ptr + cols, grad_weight / M, mask=c_ok)


@triton.jit
def _grad_input_kernel(
    dz_ptr, x_ptr, grad_x_ptr,  # [M, C]
    mean_ptr, invstd_ptr,  # [C]
    coef_scale_ptr, coef_mean_dz_ptr, coef_mean_dzxhat_ptr,  # [C] fp32
    M, C,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, c_ok, mask, offsets = nhwc_tile(M, C, BLOCK_M, BLOCK_C)
    mean = tl.load(mean_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    coef_scale = tl.load(coef_scale_ptr + cols, mask=c_ok, other=0.0)
    mean_dz = tl.load(coef_mean_dz_ptr + cols, mask=c_ok, other=0.0)
    mean_dzxhat = tl.load(coef_mean_dzxhat_ptr + cols, mask=c_ok, other=0.0)
    dz = tl.load(dz_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    xhat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * invstd[None, :]
    grad_x = coef_scale[None, :] * (dz - mean_dz[None, :] - xhat * mean_dzxhat[None, :])
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _empty_nhwc_like(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device, memory_format=torch.channels_last)


def _fp32_vectors(count: int, channels: int, device: torch.device):
    return [torch.empty(channels, dtype=torch.float32, device=device) for _ in range(count)]


def bn_act_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: Optional[torch.Tensor],
    eps: float,
    relu: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, save_mean, save_invstd, batch_var) as resnet_fast.reference.bn_act_train;
    out is channels_last in x's dtype, the statistics fp32 [C]."""
    rows = check_bn_train_args(x, weight, bias, residual)
    channels = x.shape[1]
    tiling = plan_rows(rows, channels)
    channel_tiles = triton.cdiv(channels, tiling.block_c)
    x = x.contiguous(memory_format=torch.channels_last)
    res = residual.contiguous(memory_format=torch.channels_last) if residual is not None else x
    weight, bias = weight.contiguous(), bias.contiguous()
    part_mean, part_m2 = (
        torch.empty((tiling.num_chunks, channels), dtype=torch.float32, device=x.device) for _ in range(2)
    )
    mean, invstd, var, scale, shift = _fp32_vectors(5, channels, x.device)
    out = _empty_nhwc_like(x)
    if not launchable(x):  # computing metadata only (fake kernel under the interpreter)
        return out, mean, invstd, var
    with device_guard(x):
        traceable(_partial_stats_kernel)[(tiling.num_chunks, channel_tiles)](
            x, part_mean, part_m2, rows, channels, tiling.rows_per_chunk,
            BLOCK_M=tiling.block_m, BLOCK_C=tiling.block_c, num_warps=tiling.num_warps,
        )
        traceable(_finalize_stats_kernel)[(channel_tiles,)](
            part_mean, part_m2, weight, bias, mean, invstd, var, scale, shift,
            rows, channels, tiling.rows_per_chunk, tiling.num_chunks, eps,
            BLOCK_CHUNKS=tiling.block_chunks, BLOCK_C=tiling.block_c,
        )
        traceable(_apply_kernel)[(triton.cdiv(rows, tiling.block_m), channel_tiles)](
            x, res, out, scale, shift, rows, channels,
            HAS_RESIDUAL=residual is not None, RELU=relu,
            BLOCK_M=tiling.block_m, BLOCK_C=tiling.block_c, num_warps=tiling.num_warps,
        )
    return out, mean, invstd, var


def bn_act_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
    relu: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_z) as resnet_fast.reference.bn_act_backward:
    grad_x channels_last in x's dtype, grad_weight/grad_bias in weight's dtype,
    grad_z channels_last in grad_out's dtype (empty, shape [0], without the ReLU)."""
    check_grad_pair(grad_out, out)
    check_activation(x, "x")
    check_like(x, grad_out, "grad_out", shape=x.shape, same_dtype=False)
    channels = x.shape[1]
    for name, t in (("weight", weight), ("save_mean", save_mean), ("save_invstd", save_invstd)):
        check_channel_vector(x, t, name, channels)
    rows = x.numel() // channels
    tiling = plan_rows(rows, channels)
    channel_tiles = triton.cdiv(channels, tiling.block_c)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    out = out.contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    weight, save_mean, save_invstd = weight.contiguous(), save_mean.contiguous(), save_invstd.contiguous()
    grad_z = _empty_nhwc_like(grad_out) if relu else grad_out.new_empty(0)
    part_dz, part_dzx = (
        torch.empty((tiling.num_chunks, channels), dtype=torch.float32, device=x.device) for _ in range(2)
    )
    grad_weight = torch.empty(channels, dtype=weight.dtype, device=x.device)
    grad_bias = torch.empty(channels, dtype=weight.dtype, device=x.device)
    coef_scale, coef_mean_dz, coef_mean_dzxhat = _fp32_vectors(3, channels, x.device)
    grad_x = _empty_nhwc_like(x)
    if not launchable(x):  # computing metadata only (fake kernel under the interpreter)
        return grad_x, grad_weight, grad_bias, grad_z
    with device_guard(x):
        traceable(relu_grad_partial_sums_kernel)[(tiling.num_chunks, channel_tiles)](
            grad_out, out, x, save_mean, grad_z if relu else grad_out, part_dz, part_dzx,
            rows, channels, tiling.rows_per_chunk,
            RELU=relu, WITH_X=True, BLOCK_M=tiling.block_m, BLOCK_C=tiling.block_c,
            num_warps=tiling.num_warps,
        )
        traceable(_finalize_grads_kernel)[(channel_tiles,)](
            part_dz, part_dzx, weight, save_invstd, grad_weight, grad_bias,
            coef_scale, coef_mean_dz, coef_mean_dzxhat, rows, channels, tiling.num_chunks,
            BLOCK_CHUNKS=tiling.block_chunks, BLOCK_C=tiling.block_c,
        )
        traceable(_grad_input_kernel)[(triton.cdiv(rows, tiling.block_m), channel_tiles)](
            grad_z if relu else grad_out, x, grad_x, save_mean, save_invstd,
            coef_scale, coef_mean_dz, coef_mean_dzxhat, rows, channels,
            BLOCK_M=tiling.block_m, BLOCK_C=tiling.block_c, num_warps=tiling.num_warps,
        )
    return grad_x, grad_weight, grad_bias, grad_z
