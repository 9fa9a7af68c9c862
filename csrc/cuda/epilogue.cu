// The fused conv epilogue on CUDA: bias + residual + ReLU over NHWC rows
// (also the elementwise pass of batch norm), and its backward (ReLU mask +
// per-channel bias gradient).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../resnet_fast.h"
#include "cuda_ops.h"

namespace resnet_fast::gpu {

namespace {

// out = act(affine(in) + residual), affine(v) = (v - mean) * scale + shift
// (kAffine) or v + shift. Each thread owns VEC channels, so their parameters
// are loaded once, and walks the rows of its block's chunk. in and out may
// alias (the in-place epilogue): each element is read before it is written,
// by the same thread, so no __restrict__ on them.
template <typename scalar_t, int VEC, bool kAffine>
__global__ void __launch_bounds__(kBlockThreads)
    channel_epilogue_kernel(const scalar_t* in, const scalar_t* residual, scalar_t* out,
                            const float* __restrict__ mean, const float* __restrict__ scale,
                            const float* __restrict__ shift, int64_t M, int64_t C, int64_t rows_per_block,
                            bool relu) {
  const int64_t c0 = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;  // idle lane of the last channel tile (no barrier below)
  float mu[VEC], sc[VEC], sh[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sh[i] = shift[c0 + i];
    mu[i] = kAffine ? mean[c0 + i] : 0.f;
    sc[i] = kAffine ? scale[c0 + i] : 1.f;
  }
  int64_t begin, end;
  block_rows(M, rows_per_block, begin, end);
  for (int64_t r = begin + threadIdx.y; r < end; r += blockDim.y) {
    const int64_t off = r * C + c0;
    const Pack<scalar_t, VEC> x = load_pack<VEC>(in + off);
    Pack<scalar_t, VEC> res{};
    if (residual != nullptr) res = load_pack<VEC>(residual + off);
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float xv = static_cast<float>(x.v[i]);
      float v = kAffine ? (xv - mu[i]) * sc[i] + sh[i] : xv + sh[i];
      if (residual != nullptr) v += static_cast<float>(res.v[i]);
      o.v[i] = static_cast<scalar_t>(act(v, relu));
    }
    store_pack<VEC>(out + off, o);
  }
}

// Pass 1 of bias_act_backward: dz = relu ? (out > 0 ? grad_out : 0) :
// grad_out, stored to grad_z when relu, and this block's per-channel sums of
// dz written to partial[blockIdx.y][c] (no float atomics: deterministic).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    bias_act_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                             scalar_t* __restrict__ grad_z, float* __restrict__ partial, int64_t M, int64_t C,
                             int64_t rows_per_block, bool relu) {
  extern __shared__ float smem[];  // VEC * blockDim.x * blockDim.y floats
  const int64_t c0 = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;  // idle lanes still take part in the block reduction
  float acc[VEC] = {};
  if (active) {
    int64_t begin, end;
    block_rows(M, rows_per_block, begin, end);
    for (int64_t r = begin + threadIdx.y; r < end; r += blockDim.y) {
      const int64_t off = r * C + c0;
      const Pack<scalar_t, VEC> g = load_pack<VEC>(grad_out + off);
      if (relu) {
        const Pack<scalar_t, VEC> o = load_pack<VEC>(out + off);
        Pack<scalar_t, VEC> dz;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          dz.v[i] = static_cast<float>(o.v[i]) > 0.f ? g.v[i] : static_cast<scalar_t>(0.f);
          acc[i] += static_cast<float>(dz.v[i]);
        }
        store_pack<VEC>(grad_z + off, dz);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += static_cast<float>(g.v[i]);
      }
    }
  }
  sum_over_block_rows<VEC>(acc, smem);
  if (active && threadIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) partial[int64_t{blockIdx.y} * C + c0 + i] = acc[i];
  }
}

// Pass 2: grad_bias[c] = sum of the G partial rows, in a fixed order.
__global__ void __launch_bounds__(kFinalizeX* kFinalizeY)
    bias_grad_finalize_kernel(const float* __restrict__ partial, int64_t G, int64_t C,
                              float* __restrict__ grad_bias) {
  float total[1];
  sum_partials<1>(partial, G, C, total);
  const int64_t c = int64_t{blockIdx.x} * kFinalizeX + threadIdx.x;
  if (threadIdx.y == 0 && c < C) grad_bias[c] = total[0];
}

// act(in + bias + residual) into out (which may be in).
void run_bias_act(const at::Tensor& in, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                  const at::Tensor& out, bool relu) {
  const at::Tensor bias_f = bias.to(at::kFloat).contiguous();
  const at::Tensor res = residual.has_value() ? as_nhwc(*residual) : at::Tensor();
  launch_channel_epilogue(in, res, out, nullptr, nullptr, bias_f.const_data_ptr<float>(), relu);
}

}  // namespace

void launch_channel_epilogue(const at::Tensor& in, const at::Tensor& residual, const at::Tensor& out,
                             const float* mean, const float* scale, const float* shift, bool relu) {
  TORCH_CHECK((mean == nullptr) == (scale == nullptr), "resnet_fast: mean and scale go together");
  const int64_t C = in.size(1), M = rows_of(in);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "resnet_fast_channel_epilogue", [&] {
    const scalar_t* x = in.const_data_ptr<scalar_t>();
    const scalar_t* r = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(C, {x, r, o});
    with_vector_width<16 / sizeof(scalar_t)>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      auto launch = [&](auto kernel) {
        Tiling t = tile_block(C, V);
        tile_rows(t, M, kernel, 0, /*min_rows_per_thread=*/4);
        kernel<<<t.grid, t.block, 0, stream>>>(x, r, o, mean, scale, shift, M, C, t.rows_per_block, relu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (mean != nullptr) {
        launch(channel_epilogue_kernel<scalar_t, V, true>);
      } else {
        launch(channel_epilogue_kernel<scalar_t, V, false>);
      }
    });
  });
}

void bias_act_inplace(at::Tensor& y, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                      bool relu) {
  check_cuda(y, "y");
  TORCH_CHECK(y.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resnet_fast: the in-place epilogue needs a channels_last contiguous tensor");
  const at::cuda::CUDAGuard guard(y.device());
  run_bias_act(y, bias, residual, y, relu);
}

at::Tensor bias_act(const at::Tensor& y, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                    bool relu) {
  check_bias_act_args(y, bias, residual);
  check_cuda(y, "y");
  const at::cuda::CUDAGuard guard(y.device());
  const at::Tensor in = as_nhwc(y);
  at::Tensor out = at::empty_like(in, at::MemoryFormat::ChannelsLast);
  run_bias_act(in, bias, residual, out, relu);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_act_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                                     bool relu) {
  check_activation(grad_out, "grad_out");
  check_same_shape(grad_out, out, "out");
  check_cuda(grad_out, "grad_out");
  const at::cuda::CUDAGuard guard(grad_out.device());
  const int64_t C = grad_out.size(1), M = rows_of(grad_out);
  const at::Tensor g = as_nhwc(grad_out);
  const at::Tensor o = relu ? as_nhwc(out) : at::Tensor();  // out only feeds the mask
  at::Tensor grad_z = relu ? at::empty_like(g, at::MemoryFormat::ChannelsLast) : at::empty({0}, g.options());
  const at::TensorOptions fopts = g.options().dtype(at::kFloat);
  at::Tensor grad_bias = at::empty({C}, fopts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "resnet_fast_bias_act_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = relu ? o.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* zp = relu ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
    const int vec = vector_width<scalar_t>(C, {gp, op, zp});
    with_vector_width<16 / sizeof(scalar_t)>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const auto kernel = bias_act_backward_kernel<scalar_t, V>;
      Tiling t = tile_block(C, V);
      const size_t smem = sizeof(float) * V * t.block.x * t.block.y;
      tile_rows(t, M, kernel, smem, /*min_rows_per_thread=*/8);
      const int64_t G = t.grid.y;
      const at::Tensor partial = at::empty({G, C}, fopts);
      kernel<<<t.grid, t.block, smem, stream>>>(gp, op, zp, partial.mutable_data_ptr<float>(), M, C,
                                                t.rows_per_block, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bias_grad_finalize_kernel<<<static_cast<unsigned>(ceil_div(C, kFinalizeX)), dim3(kFinalizeX, kFinalizeY), 0,
                                  stream>>>(partial.const_data_ptr<float>(), G, C, grad_bias.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_z, grad_bias};
}

}  // namespace resnet_fast::gpu
