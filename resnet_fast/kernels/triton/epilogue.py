"""Backward of the fused epilogue act(y + bias + residual):

    grad_z    = grad_out where out > 0, else 0   (only with the ReLU)
    grad_bias = sum of grad_z over N, H, W       (fp32)

grad_z is also the residual's gradient and the gradient that flows into the
conv. The masking pass also serves BatchNorm's backward (batch_norm.py),
which additionally needs sum(grad_z * (x - mean)) per channel.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .checks import check_activation, check_like
from .reduction import plan_rows, sum_rows
from .runtime import device_guard, launchable, traceable


@triton.jit
def relu_grad_partial_sums_kernel(
    grad_ptr,  # [M, C] grad_out
    out_ptr,  # [M, C] forward output (read only when RELU)
    x_ptr,  # [M, C] forward input (read only when WITH_X)
    mean_ptr,  # [C] fp32 batch mean (read only when WITH_X)
    grad_z_ptr,  # [M, C] masked gradient, written when RELU
    part_dz_ptr,  # [num_chunks, C] fp32: per-chunk sum of grad_z
    part_dzx_ptr,  # [num_chunks, C] fp32: per-chunk sum of grad_z * (x - mean), when WITH_X
    M, C, rows_per_chunk,
    RELU: tl.constexpr, WITH_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    if WITH_X:
        mean = tl.load(mean_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    sum_dz = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    sum_dzx = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    row_start = chunk * rows_per_chunk
    row_end = min(row_start + rows_per_chunk, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & c_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
        # Every value goes to fp32 before any comparison or arithmetic.
        dz = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            out = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dz = tl.where(out > 0, dz, 0.0)
            tl.store(grad_z_ptr + offsets, dz.to(grad_z_ptr.dtype.element_ty), mask=mask)
        sum_dz += sum_rows(dz)
        if WITH_X:
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            sum_dzx += sum_rows(dz * (x - mean[None, :]))  # dz is 0 off the mask
    tl.store(part_dz_ptr + chunk * C + cols, sum_dz, mask=c_ok)
    if WITH_X:
        tl.store(part_dzx_ptr + chunk * C + cols, sum_dzx, mask=c_ok)


@triton.jit
def _sum_chunks_kernel(
    part_ptr,  # [num_chunks, C] fp32
    total_ptr,  # [C] fp32
    num_chunks, C,
    BLOCK_CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    total = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    for first in range(0, num_chunks, BLOCK_CHUNKS):  # fixed order: deterministic
        chunks = first + tl.arange(0, BLOCK_CHUNKS)
        mask = (chunks < num_chunks)[:, None] & c_ok[None, :]
        total += sum_rows(tl.load(part_ptr + chunks[:, None] * C + cols[None, :], mask=mask, other=0.0))
    tl.store(total_ptr + cols, total, mask=c_ok)


def check_grad_pair(grad_out: torch.Tensor, out: torch.Tensor) -> None:
    check_activation(grad_out, "grad_out")
    check_activation(out, "out")
    check_like(grad_out, out, "out", shape=grad_out.shape, same_dtype=False)


def bias_act_backward(grad_out: torch.Tensor, out: torch.Tensor, relu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_z, grad_bias) as resnet_fast.reference.bias_act_backward: grad_z
    is channels_last in grad_out's dtype (empty, shape [0], without the ReLU,
    where it would equal grad_out); grad_bias is fp32 [C]."""
    check_grad_pair(grad_out, out)
    channels = grad_out.shape[1]
    rows = grad_out.numel() // channels
    tiling = plan_rows(rows, channels)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    out = out.contiguous(memory_format=torch.channels_last)
    if relu:
        grad_z = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device,
                             memory_format=torch.channels_last)
    else:
        grad_z = grad_out.new_empty(0)
    part_dz = torch.empty((tiling.num_chunks, channels), dtype=torch.float32, device=grad_out.device)
    grad_bias = torch.empty(channels, dtype=torch.float32, device=grad_out.device)
    channel_tiles = triton.cdiv(channels, tiling.block_c)
    if not launchable(grad_out):  # computing metadata only (fake kernel under the interpreter)
        return grad_z, grad_bias
    with device_guard(grad_out):
        # Unused pointer arguments get grad_out as a stand-in; the kernel never touches them.
        traceable(relu_grad_partial_sums_kernel)[(tiling.num_chunks, channel_tiles)](
            grad_out, out, grad_out, grad_out, grad_z if relu else grad_out, part_dz, grad_out,
            rows, channels, tiling.rows_per_chunk,
            RELU=relu, WITH_X=False, BLOCK_M=tiling.block_m, BLOCK_C=tiling.block_c,
            num_warps=tiling.num_warps,
        )
        traceable(_sum_chunks_kernel)[(channel_tiles,)](
            part_dz, grad_bias, tiling.num_chunks, channels,
            BLOCK_CHUNKS=tiling.block_chunks, BLOCK_C=tiling.block_c,
        )
    return grad_z, grad_bias
