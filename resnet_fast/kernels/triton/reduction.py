"""How the per-channel kernels tile an NHWC tensor seen as an [M, C] matrix
(M = N*H*W rows, channels contiguous), and how a reduction over the rows is
split into chunks whose partial results are combined in a fixed order (so
the result is deterministic and each partial is over a bounded count)."""
from typing import NamedTuple

import triton
import triton.language as tl

from .runtime import INTERPRET, next_power_of_2

# Programs the partial-reduction pass aims for: a few waves on an H100's 132
# SMs; under the interpreter a handful, so tests still cross chunk edges.
_TARGET_PROGRAMS = 4 if INTERPRET else 1024
_MAX_BLOCK_C = 16 if INTERPRET else 64
_TILE_ELEMENTS = 256 if INTERPRET else 4096
# Chunk partials merged per step of the finalising pass.
_MAX_BLOCK_CHUNKS = 8 if INTERPRET else 64


class RowTiling(NamedTuple):
    block_m: int  # rows per tile
    block_c: int  # channels per tile
    rows_per_chunk: int  # rows one partial-reduction program covers (a multiple of block_m)
    num_chunks: int
    block_chunks: int  # chunk partials combined per step when finalising
    num_warps: int


def plan_rows(rows: int, channels: int) -> RowTiling:
    block_c = min(next_power_of_2(channels), _MAX_BLOCK_C)
    block_m = max(16, _TILE_ELEMENTS // block_c)
    channel_tiles = triton.cdiv(channels, block_c)
    chunks = max(1, min(_TARGET_PROGRAMS // channel_tiles, triton.cdiv(rows, block_m)))
    rows_per_chunk = triton.cdiv(triton.cdiv(rows, chunks), block_m) * block_m
    num_chunks = triton.cdiv(rows, rows_per_chunk)
    block_chunks = min(next_power_of_2(num_chunks), _MAX_BLOCK_CHUNKS)
    return RowTiling(block_m, block_c, rows_per_chunk, num_chunks, block_chunks, num_warps=4)


# Kernels call only Triton builtins and @triton.jit functions of this package:
# the interpreter cannot run triton's own @jit library functions (tl.sum,
# tl.cdiv, tl.zeros, ...) when triton was imported before TRITON_INTERPRET=1 was set,
# as happens in a pytest run where another test imports torchvision first.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def sum_rows(x):
    """x summed over axis 0 (what tl.sum(x, axis=0) computes)."""
    return tl.reduce(x, 0, _add)


@triton.jit
def nhwc_tile(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_C] tile of an [M, C] matrix (grid: row
    tiles x channel tiles): its channel indices and their mask, the tile's
    mask and its element offsets (int64: M * C can pass 2**31)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < M)[:, None] & c_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    return cols, c_ok, mask, offsets
