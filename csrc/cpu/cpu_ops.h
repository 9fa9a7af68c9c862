// CPU implementations of the resnet_fast ops (registered in register_cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

// Loops built as clones for AVX-512, AVX2 and the baseline ISA, the one to
// run picked when the library loads, so that the build itself needs no -mavx2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RESNET_FAST_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RESNET_FAST_SIMD_CLONES
#endif

namespace resnet_fast::cpu {

#include "../op_declarations.inc"

// Rows per work item of the per-channel reductions. Fixed, so that partial
// sums (and so the results) do not depend on the number of threads.
constexpr int64_t kRowsPerChunk = 256;

// Per-channel sums over the M rows of an [M, C] matrix, K sums at once:
// row_body(m, acc) adds row m's contribution to acc[k * C + c]. Chunks of
// kRowsPerChunk rows run in parallel, each into its own fp32 partials (so the
// row loops vectorise), which are then combined in fp64 in a fixed order.
template <int K, typename RowBody>
std::vector<double> reduce_channels(int64_t M, int64_t C, const RowBody& row_body) {
  const int64_t chunks = (M + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<float> partial(chunks * K * C, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      float* acc = partial.data() + chunk * K * C;
      const int64_t row_end = std::min(M, (chunk + 1) * kRowsPerChunk);
      for (int64_t m = chunk * kRowsPerChunk; m < row_end; ++m) row_body(m, acc);
    }
  });
  std::vector<double> total(K * C, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < K * C; ++i) total[i] += partial[chunk * K * C + i];
  return total;
}

// [C] fp32 tensor from C doubles starting at values.
at::Tensor channel_tensor(const double* values, int64_t C, const at::TensorOptions& options);

// Element i of the gradient through an optional ReLU: grad_out masked by
// out > 0 when relu, and then also stored to grad_z (the masked gradient the
// ops return); grad_out itself otherwise.
template <typename scalar_t>
inline float relu_grad(const scalar_t* grad_out, const scalar_t* out, scalar_t* grad_z, int64_t i, bool relu) {
  float dz = static_cast<float>(grad_out[i]);
  if (relu) {
    dz = static_cast<float>(out[i]) > 0.f ? dz : 0.f;
    grad_z[i] = static_cast<scalar_t>(dz);
  }
  return dz;
}

// conv_bias_act written into residual (CPU only, for inference: the caller
// owns residual and no longer needs it).
void conv_bias_act_(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups, bool relu);

// Whether the activations (x and residual) reaching conv_bias_act on this
// thread are known to be finite: a whole-network forward sets it after
// checking its input once (resnet_fast/finite.py), so that the layers skip
// their per-layer scan. conv_bias_act clears it as soon as a layer's weight
// or bias is not finite, since that layer's output may then carry NaN.
bool activations_known_finite();
void set_activations_known_finite(bool known);

// Activation memory kept across CPU inference forwards (activation_memory.cpp):
// between enter and exit (nested or on several threads) the process's CPU
// tensors come from an allocator that keeps large freed blocks for the next
// forward; release frees those it keeps and returns their bytes. exit is
// false, and does nothing, without a matching enter.
void enter_activation_memory();
bool exit_activation_memory();
size_t release_activation_memory();
size_t cached_activation_memory();
// An uninitialised CPU tensor whose memory, when large, comes from the same
// cache and returns to it once freed, whether or not a forward is running:
// for the outputs a training step allocates afresh at every step.
at::Tensor empty_from_activation_memory(at::IntArrayRef sizes, const at::TensorOptions& options,
                                        at::MemoryFormat memory_format);

// Whether t holds no NaN and no Inf (finite.cpp): one parallel pass over a
// dense CPU tensor's memory.
bool all_finite(const at::Tensor& t);

// Whether bias, x and residual are all finite (x and residual taken as such
// while the network vouches for them); a non-finite bias ends the vouching.
bool operands_finite(const at::Tensor& x, const at::Tensor& bias, const std::optional<at::Tensor>& residual);

// The 3x3 stride-1 convolution by Winograd's F(4x4, 3x3) (winograd.cpp), for
// CPU inference in float32: the weight transformed once (winograd_weight:
// [36, C, K]), then act(conv(x) + bias + residual) from it. weight is the
// untransformed weight, for operands with NaN or Inf, which take the direct
// convolution.
at::Tensor winograd_weight(const at::Tensor& weight);
at::Tensor conv3x3_winograd_bias_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_winograd,
                                     const at::Tensor& bias, const std::optional<at::Tensor>& residual, bool relu);
// The same written into residual (channels_last contiguous, not overlapping x).
void conv3x3_winograd_bias_act_(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& weight_winograd, const at::Tensor& bias, bool relu);

// Max pooling of activations for inference (pool.cpp): NHWC, no indices,
// output size as torch.nn.functional.max_pool2d's.
at::Tensor max_pool2d_nhwc(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode);
// The same written into out (that shape, x's dtype, channels_last contiguous,
// not overlapping x): a slice of a batch's result, say.
void max_pool2d_nhwc_into(const at::Tensor& out, const at::Tensor& x, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode);

// The mean over H and W of NHWC activations for inference (pool.cpp),
// [N, C] in x's dtype, accumulated in float32: adaptive_avg_pool2d(x, 1)
// flattened, as a ResNet's head takes it.
at::Tensor global_avg_pool_nhwc(const at::Tensor& x);

// NaN-propagating ReLU (NaN < 0 is false, so NaN passes through, as torch.relu).
inline float act(float v, bool relu) { return (relu && v < 0.f) ? 0.f : v; }

}  // namespace resnet_fast::cpu
