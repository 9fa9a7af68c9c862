// Training-mode BatchNorm on CUDA, fused with the residual add and ReLU, and
// its fused backward. NHWC: each row of [M = N*H*W, C] is one pixel.
//
// Forward:  bn_stats_kernel (per-block Welford partials) -> bn_stats_finalize_kernel
//           (Chan merge per channel) -> launch_channel_epilogue (normalise + act).
// Backward: bn_backward_reduce_kernel (dReLU, grad_z, per-block sums) ->
//           bn_backward_finalize_kernel -> bn_backward_input_kernel (grad_x).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../resnet_fast.h"
#include "cuda_ops.h"

namespace resnet_fast::gpu {

namespace {

// Chan et al.: folds the statistics (mean_b, m2_b) of n_b values into
// (mean, m2) of n_a values. The caller adds n_b to its count afterwards.
__device__ __forceinline__ void chan_merge(float& mean, float& m2, float n_a, float mean_b, float m2_b,
                                           float n_b) {
  if (n_b == 0.f) return;
  const float w = n_b / (n_a + n_b);  // 1 when n_a == 0: takes b as is
  const float delta = mean_b - mean;
  mean += delta * w;
  m2 += m2_b + delta * delta * n_a * w;
}

// Merges (mean, m2, n) over threadIdx.y in a fixed tree; the result lands in
// threadIdx.y == 0. smem holds (2N + 1) * blockDim.x * blockDim.y floats.
// Every thread of the block must call it.
template <int N>
__device__ void welford_over_block_rows(float (&mean)[N], float (&m2)[N], float& n, float* smem) {
  const int tx = threadIdx.x, ty = threadIdx.y, nx = blockDim.x, ny = blockDim.y;
  // [i][y][x]: i < N means, N <= i < 2N M2s, i == 2N counts.
  auto cell = [&](int i, int y) -> float& { return smem[(i * ny + y) * nx + tx]; };
#pragma unroll
  for (int i = 0; i < N; ++i) {
    cell(i, ty) = mean[i];
    cell(N + i, ty) = m2[i];
  }
  cell(2 * N, ty) = n;
  __syncthreads();
  int half = 1;
  while (half * 2 < ny) half *= 2;  // largest power of two below ny
  for (; half > 0; half /= 2) {
    // Readers ([half, 2 half)) and writers ([0, half)) are disjoint.
    if (ty < half && ty + half < ny) {
      const float n_b = cell(2 * N, ty + half);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        chan_merge(mean[i], m2[i], n, cell(i, ty + half), cell(N + i, ty + half), n_b);
        cell(i, ty) = mean[i];
        cell(N + i, ty) = m2[i];
      }
      n += n_b;
      cell(2 * N, ty) = n;
    }
    __syncthreads();
  }
}

// Forward pass 1: per-thread Welford over the rows of this block's chunk
// (one read of x), merged over the block, written as partial[0][g][c] (mean)
// and partial[1][g][c] (M2) with g = blockIdx.y. The count of chunk g is
// known from the tiling, so it is not stored.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    bn_stats_kernel(const scalar_t* __restrict__ x, float* __restrict__ partial, int64_t M, int64_t C,
                    int64_t rows_per_block) {
  extern __shared__ float smem[];  // (2 VEC + 1) * blockDim.x * blockDim.y floats
  const int64_t c0 = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;  // idle lanes still take part in the block merge
  float mean[VEC] = {}, m2[VEC] = {}, n = 0.f;
  if (active) {
    int64_t begin, end;
    block_rows(M, rows_per_block, begin, end);
    for (int64_t r = begin + threadIdx.y; r < end; r += blockDim.y) {
      const Pack<scalar_t, VEC> p = load_pack<VEC>(x + r * C + c0);
      n += 1.f;
      const float inv_n = __frcp_rn(n);  // one (exact) reciprocal shared by the VEC channels
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float v = static_cast<float>(p.v[i]);
        const float delta = v - mean[i];
        mean[i] += delta * inv_n;
        m2[i] += delta * (v - mean[i]);
      }
    }
  }
  welford_over_block_rows<VEC>(mean, m2, n, smem);
  if (active && threadIdx.y == 0) {
    const int64_t G = gridDim.y, g = blockIdx.y;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      partial[g * C + c0 + i] = mean[i];
      partial[(G + g) * C + c0 + i] = m2[i];
    }
  }
}

// Forward pass 2: merges the G chunk statistics of each channel (fixed order)
// into the batch mean, biased variance and 1/sqrt(var + eps), and the scale
// weight * invstd used by the elementwise pass.
__global__ void __launch_bounds__(kFinalizeX* kFinalizeY)
    bn_stats_finalize_kernel(const float* __restrict__ partial, int64_t G, int64_t C, int64_t M,
                             int64_t rows_per_block, float eps, const float* __restrict__ weight,
                             float* __restrict__ save_mean, float* __restrict__ save_invstd,
                             float* __restrict__ batch_var, float* __restrict__ scale) {
  __shared__ float smem[3 * kFinalizeX * kFinalizeY];
  const int64_t c = int64_t{blockIdx.x} * kFinalizeX + threadIdx.x;
  float mean[1] = {0.f}, m2[1] = {0.f}, n = 0.f;
  if (c < C) {
    for (int64_t g = threadIdx.y; g < G; g += kFinalizeY) {
      const int64_t rows = rows_per_block < M - g * rows_per_block ? rows_per_block : M - g * rows_per_block;
      const float n_g = static_cast<float>(rows);
      chan_merge(mean[0], m2[0], n, partial[g * C + c], partial[(G + g) * C + c], n_g);
      n += n_g;
    }
  }
  welford_over_block_rows<1>(mean, m2, n, smem);
  if (threadIdx.y == 0 && c < C) {
    float var = m2[0] / static_cast<float>(M);
    var = var < 0.f ? 0.f : var;  // rounding guard; keeps NaN
    const float invstd = 1.f / sqrtf(var + eps);
    save_mean[c] = mean[0];
    batch_var[c] = var;
    save_invstd[c] = invstd;
    scale[c] = weight[c] * invstd;
  }
}

// Backward pass 1: dz = relu ? (out > 0 ? grad_out : 0) : grad_out (stored to
// grad_z when relu), and this block's per-channel sums of dz and
// dz * (x - mean): partial[0][g][c] and partial[1][g][c], g = blockIdx.y.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    bn_backward_reduce_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                              const scalar_t* __restrict__ x, const float* __restrict__ mean,
                              scalar_t* __restrict__ grad_z, float* __restrict__ partial, int64_t M, int64_t C,
                              int64_t rows_per_block, bool relu) {
  extern __shared__ float smem[];  // 2 VEC * blockDim.x * blockDim.y floats
  const int64_t c0 = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;  // idle lanes still take part in the block reduction
  float acc[2 * VEC] = {};     // [0, VEC): sum dz; [VEC, 2 VEC): sum dz * (x - mean)
  if (active) {
    float mu[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) mu[i] = mean[c0 + i];
    int64_t begin, end;
    block_rows(M, rows_per_block, begin, end);
    for (int64_t r = begin + threadIdx.y; r < end; r += blockDim.y) {
      const int64_t off = r * C + c0;
      const Pack<scalar_t, VEC> g = load_pack<VEC>(grad_out + off);
      const Pack<scalar_t, VEC> xv = load_pack<VEC>(x + off);
      Pack<scalar_t, VEC> dz;
      if (relu) {
        const Pack<scalar_t, VEC> o = load_pack<VEC>(out + off);
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          dz.v[i] = static_cast<float>(o.v[i]) > 0.f ? g.v[i] : static_cast<scalar_t>(0.f);
        store_pack<VEC>(grad_z + off, dz);
      } else {
        dz = g;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = static_cast<float>(dz.v[i]);
        acc[i] += d;
        acc[VEC + i] += d * (static_cast<float>(xv.v[i]) - mu[i]);
      }
    }
  }
  sum_over_block_rows<2 * VEC>(acc, smem);
  if (active && threadIdx.y == 0) {
    const int64_t G = gridDim.y, g = blockIdx.y;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      partial[g * C + c0 + i] = acc[i];
      partial[(G + g) * C + c0 + i] = acc[VEC + i];
    }
  }
}

// Backward pass 2: per-channel totals -> grad_bias = sum dz, grad_weight =
// sum dz * xhat, and the coefficients of grad_x = a * (dz - b - (x - mean) * k):
// coef[0][c] = a = weight * invstd, coef[1][c] = b = mean(dz),
// coef[2][c] = k = mean(dz * (x - mean)) * invstd^2.
__global__ void __launch_bounds__(kFinalizeX* kFinalizeY)
    bn_backward_finalize_kernel(const float* __restrict__ partial, int64_t G, int64_t C, int64_t M,
                                const float* __restrict__ weight, const float* __restrict__ invstd,
                                float* __restrict__ grad_weight, float* __restrict__ grad_bias,
                                float* __restrict__ coef) {
  float total[2];
  sum_partials<2>(partial, G, C, total);
  const int64_t c = int64_t{blockIdx.x} * kFinalizeX + threadIdx.x;
  if (threadIdx.y == 0 && c < C) {
    const float inv = invstd[c], m = static_cast<float>(M);
    grad_bias[c] = total[0];
    grad_weight[c] = total[1] * inv;
    coef[c] = weight[c] * inv;
    coef[C + c] = total[0] / m;
    coef[2 * C + c] = total[1] / m * inv * inv;
  }
}

// Backward pass 3: grad_x = a * (dz - b - (x - mean) * k), elementwise; each
// thread keeps its VEC channels' coefficients in registers.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    bn_backward_input_kernel(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ x,
                             scalar_t* __restrict__ grad_x, const float* __restrict__ mean,
                             const float* __restrict__ coef, int64_t M, int64_t C, int64_t rows_per_block) {
  const int64_t c0 = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;  // idle lane of the last channel tile (no barrier below)
  float mu[VEC], a[VEC], b[VEC], k[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    mu[i] = mean[c0 + i];
    a[i] = coef[c0 + i];
    b[i] = coef[C + c0 + i];
    k[i] = coef[2 * C + c0 + i];
  }
  int64_t begin, end;
  block_rows(M, rows_per_block, begin, end);
  for (int64_t r = begin + threadIdx.y; r < end; r += blockDim.y) {
    const int64_t off = r * C + c0;
    const Pack<scalar_t, VEC> d = load_pack<VEC>(dz + off);
    const Pack<scalar_t, VEC> xv = load_pack<VEC>(x + off);
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float xmu = static_cast<float>(xv.v[i]) - mu[i];
      o.v[i] = static_cast<scalar_t>(a[i] * (static_cast<float>(d.v[i]) - b[i] - xmu * k[i]));
    }
    store_pack<VEC>(grad_x + off, o);
  }
}

dim3 finalize_grid(int64_t C) { return dim3(static_cast<unsigned>(ceil_div(C, kFinalizeX))); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_train(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, double eps, bool relu) {
  check_bn_train_args(x_in, weight, bias, residual);
  check_cuda(x_in, "x");
  const at::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = as_nhwc(x_in);
  const at::Tensor res = residual.has_value() ? as_nhwc(*residual) : at::Tensor();
  const int64_t C = x.size(1), M = rows_of(x);
  const at::TensorOptions fopts = x.options().dtype(at::kFloat);
  const at::Tensor weight_f = weight.to(at::kFloat).contiguous();
  const at::Tensor bias_f = bias.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor save_mean = at::empty({C}, fopts), save_invstd = at::empty({C}, fopts);
  at::Tensor batch_var = at::empty({C}, fopts), scale = at::empty({C}, fopts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resnet_fast_bn_act_train", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(C, {xp});
    with_vector_width<16 / sizeof(scalar_t)>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const auto kernel = bn_stats_kernel<scalar_t, V>;
      Tiling t = tile_block(C, V);
      const size_t smem = sizeof(float) * (2 * V + 1) * t.block.x * t.block.y;
      tile_rows(t, M, kernel, smem, /*min_rows_per_thread=*/8);
      const int64_t G = t.grid.y;
      const at::Tensor partial = at::empty({2, G, C}, fopts);
      kernel<<<t.grid, t.block, smem, stream>>>(xp, partial.mutable_data_ptr<float>(), M, C, t.rows_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bn_stats_finalize_kernel<<<finalize_grid(C), dim3(kFinalizeX, kFinalizeY), 0, stream>>>(
          partial.const_data_ptr<float>(), G, C, M, t.rows_per_block, static_cast<float>(eps),
          weight_f.const_data_ptr<float>(), save_mean.mutable_data_ptr<float>(),
          save_invstd.mutable_data_ptr<float>(), batch_var.mutable_data_ptr<float>(),
          scale.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // out = act((x - mean) * (weight * invstd) + bias + residual)
  launch_channel_epilogue(x, res, out, save_mean.const_data_ptr<float>(), scale.const_data_ptr<float>(),
                          bias_f.const_data_ptr<float>(), relu);
  return {out, save_mean, save_invstd, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& out_in, const at::Tensor& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool relu) {
  check_bn_backward_args(grad_out_in, x_in, out_in, weight, save_mean, save_invstd);
  check_cuda(x_in, "x");
  const at::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor g = as_nhwc(grad_out_in), x = as_nhwc(x_in);
  const at::Tensor out = relu ? as_nhwc(out_in) : at::Tensor();  // out only feeds the mask
  const int64_t C = x.size(1), M = rows_of(x);
  const at::TensorOptions fopts = x.options().dtype(at::kFloat);
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const at::Tensor weight_f = weight.to(at::kFloat).contiguous();
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor grad_z = relu ? at::empty_like(g, at::MemoryFormat::ChannelsLast) : at::empty({0}, g.options());
  at::Tensor grad_weight = at::empty({C}, fopts), grad_bias = at::empty({C}, fopts);
  const at::Tensor coef = at::empty({3, C}, fopts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resnet_fast_bn_act_backward", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* op = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* zp = relu ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();

    // Reduction, then the per-channel totals and coefficients.
    with_vector_width<kVec>(vector_width<scalar_t>(C, {gp, op, xp, zp}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const auto kernel = bn_backward_reduce_kernel<scalar_t, V>;
      Tiling t = tile_block(C, V);
      const size_t smem = sizeof(float) * 2 * V * t.block.x * t.block.y;
      tile_rows(t, M, kernel, smem, /*min_rows_per_thread=*/8);
      const int64_t G = t.grid.y;
      const at::Tensor partial = at::empty({2, G, C}, fopts);
      kernel<<<t.grid, t.block, smem, stream>>>(gp, op, xp, mean.const_data_ptr<float>(), zp,
                                                partial.mutable_data_ptr<float>(), M, C, t.rows_per_block, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bn_backward_finalize_kernel<<<finalize_grid(C), dim3(kFinalizeX, kFinalizeY), 0, stream>>>(
          partial.const_data_ptr<float>(), G, C, M, weight_f.const_data_ptr<float>(),
          invstd.const_data_ptr<float>(), grad_weight.mutable_data_ptr<float>(),
          grad_bias.mutable_data_ptr<float>(), coef.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    // grad_x from dz (grad_z when it was materialised, else grad_out).
    const scalar_t* dzp = relu ? zp : gp;
    with_vector_width<kVec>(vector_width<scalar_t>(C, {dzp, xp, gxp}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const auto kernel = bn_backward_input_kernel<scalar_t, V>;
      Tiling t = tile_block(C, V);
      tile_rows(t, M, kernel, 0, /*min_rows_per_thread=*/4);
      kernel<<<t.grid, t.block, 0, stream>>>(dzp, xp, gxp, mean.const_data_ptr<float>(),
                                             coef.const_data_ptr<float>(), M, C, t.rows_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const at::ScalarType wtype = weight.scalar_type();
  return {grad_x, grad_weight.to(wtype), grad_bias.to(wtype), grad_z};
}

}  // namespace resnet_fast::gpu
