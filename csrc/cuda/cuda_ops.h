// CUDA implementations of the resnet_fast ops (registered in register_cuda.cpp),
// and, for the .cu files only, the launch geometry and device helpers they
// share.
//
// Every kernel works on the NHWC view of an activation: an [M = N*H*W, C]
// row-major matrix. Blocks are 2-D: threadIdx.x walks channel vectors (so a
// warp reads contiguous memory), threadIdx.y walks rows. The grid is 2-D too:
// blockIdx.x picks a tile of channels, blockIdx.y a contiguous chunk of rows.
// A thread therefore keeps the same channels for its whole life, which lets
// the elementwise kernels hold per-channel parameters in registers and the
// reductions accumulate per-channel partials in registers.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../resnet_fast.h"  // ceil_div

namespace resnet_fast::gpu {

#include "../op_declarations.inc"

// out = act(affine(in) + residual) over an NHWC [M, C] tensor, where
// affine(v) = (v - mean[c]) * scale[c] + shift[c] when mean is given (batch
// norm) and v + shift[c] when mean and scale are null (bias). in, residual
// (may be undefined) and out are channels_last contiguous with in's dtype and
// shape; out may be in itself. The per-channel arrays are fp32 device
// pointers. Runs on the current stream of in's device (the caller holds the
// device guard).
void launch_channel_epilogue(const at::Tensor& in, const at::Tensor& residual, const at::Tensor& out,
                             const float* mean, const float* scale, const float* shift, bool relu);

// The input must live on a CUDA device (the other tensors are checked against
// it by the shared checks).
inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "resnet_fast: ", name, " must be a CUDA tensor, got device ", t.device());
}

}  // namespace resnet_fast::gpu

#if defined(__CUDACC__)

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace resnet_fast::gpu {

// ---------------------------------------------------------------- geometry

constexpr int kBlockThreads = 256;  // threads per block of the [M, C] kernels
constexpr int kFinalizeX = 32;      // channels per block of the finalize kernels
constexpr int kFinalizeY = 16;      // partial rows read in parallel per channel

// Elements per 16-byte access, when every pointer is 16-byte aligned and C is
// a multiple of it (then every row starts aligned too); 1 otherwise.
template <typename scalar_t>
int vector_width(int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (C % kVec != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return kVec;
}

// Calls f(std::integral_constant<int, V>{}) with V = kVec when vec == kVec,
// else V = 1: the kernels take their vector width as a template argument.
template <int kVec, typename F>
void with_vector_width(int vec, const F& f) {
  if (vec == kVec) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

struct Tiling {
  int64_t rows_per_block = 0;  // contiguous rows owned by one blockIdx.y
  dim3 block, grid;
};

// Threads along C: the whole row when it has at most 32 vectors, else the
// width among 32/16/8 that leaves the fewest idle threads in the last tile.
inline int threads_along_c(int64_t cv) {
  if (cv <= 32) return static_cast<int>(cv);
  int best = 32;
  for (int tx : {16, 8})
    if (ceil_div(cv, tx) * tx < ceil_div(cv, best) * best) best = tx;
  return best;
}

// Block shape for an [M, C] kernel moving `vec` elements per access.
inline Tiling tile_block(int64_t C, int vec) {
  Tiling t;
  const int64_t cv = C / vec;
  const int tx = threads_along_c(cv);
  t.block = dim3(tx, kBlockThreads / tx);
  t.grid = dim3(static_cast<unsigned>(ceil_div(cv, tx)), 1);
  return t;
}

// Splits the M rows over blockIdx.y: enough blocks for one full wave of the
// kernel (blocks_per_sm from the occupancy calculator), but at least
// min_rows_per_thread rows per thread so per-block fixed costs stay small.
template <typename Kernel>
void tile_rows(Tiling& t, int64_t M, Kernel kernel, size_t smem_bytes, int min_rows_per_thread) {
  const int threads = static_cast<int>(t.block.x * t.block.y);
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads, smem_bytes));
  const int64_t wave = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} *
                       std::max(blocks_per_sm, 1);
  int64_t gy = std::max<int64_t>(1, wave / t.grid.x);
  gy = std::min(gy, ceil_div(M, int64_t{t.block.y} * min_rows_per_thread));
  gy = std::max<int64_t>(1, std::min<int64_t>(gy, 65535));
  t.rows_per_block = ceil_div(M, gy);
  t.grid.y = static_cast<unsigned>(ceil_div(M, t.rows_per_block));  // no empty chunk
}

// ---------------------------------------------------------------- device helpers

// N consecutive elements moved as one aligned access (16 bytes when N is the
// vector width).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// ReLU written so that NaN propagates (NaN < 0 is false), as torch.relu.
__device__ __forceinline__ float act(float v, bool relu) { return (relu && v < 0.f) ? 0.f : v; }

// First row of this block's chunk and one past its last row.
__device__ __forceinline__ void block_rows(int64_t M, int64_t rows_per_block, int64_t& begin, int64_t& end) {
  begin = int64_t{blockIdx.y} * rows_per_block;
  end = begin + rows_per_block < M ? begin + rows_per_block : M;
}

// Sums acc[0..N) over threadIdx.y (a fixed tree, so results are
// deterministic); the total lands in threadIdx.y == 0. smem holds
// N * blockDim.x * blockDim.y floats, laid out [i][y][x] so that consecutive
// x hit consecutive banks. Every thread of the block must call it.
template <int N>
__device__ void sum_over_block_rows(float (&acc)[N], float* smem) {
  const int tx = threadIdx.x, ty = threadIdx.y, nx = blockDim.x, ny = blockDim.y;
  auto cell = [&](int i, int y) -> float& { return smem[(i * ny + y) * nx + tx]; };
#pragma unroll
  for (int i = 0; i < N; ++i) cell(i, ty) = acc[i];
  __syncthreads();
  int half = 1;
  while (half * 2 < ny) half *= 2;  // largest power of two below ny
  for (; half > 0; half /= 2) {
    // Readers ([half, 2 half)) and writers ([0, half)) are disjoint.
    if (ty < half && ty + half < ny) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        acc[i] += cell(i, ty + half);
        cell(i, ty) = acc[i];
      }
    }
    __syncthreads();
  }
}

// Per-channel totals of K partial arrays laid out [K][G][C] (one row per
// blockIdx.y of the reduction kernel), for the channel c = blockIdx.x *
// kFinalizeX + threadIdx.x, in a fixed order. Block (kFinalizeX, kFinalizeY);
// every thread must call it; the totals are valid in threadIdx.y == 0.
template <int K>
__device__ void sum_partials(const float* __restrict__ partial, int64_t G, int64_t C, float (&total)[K]) {
  __shared__ float smem[K * kFinalizeX * kFinalizeY];
  const int64_t c = int64_t{blockIdx.x} * kFinalizeX + threadIdx.x;
#pragma unroll
  for (int k = 0; k < K; ++k) total[k] = 0.f;
  if (c < C) {
    for (int64_t g = threadIdx.y; g < G; g += kFinalizeY) {
#pragma unroll
      for (int k = 0; k < K; ++k) total[k] += partial[(k * G + g) * C + c];
    }
  }
  sum_over_block_rows<K>(total, smem);
}

}  // namespace resnet_fast::gpu

#endif  // __CUDACC__
