// CPU implementations of the resnet_fast ops (registered in register_cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace resnet_fast::cpu {

// act(y + bias + residual) written into y (NHWC, contiguous), in place.
void bias_act_inplace(at::Tensor& y, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                      bool relu);

at::Tensor bias_act(const at::Tensor& y, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                    bool relu);
std::tuple<at::Tensor, at::Tensor> bias_act_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                                     bool relu);
at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_train(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, double eps, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out, const at::Tensor& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool relu);

// Rows per work item of the per-channel reductions. Fixed, so that partial
// sums (and so the results) do not depend on the number of threads.
constexpr int64_t kRowsPerChunk = 256;

// Per-channel sums over the M rows of an [M, C] matrix, K sums at once:
// row_body(m, acc) adds row m's contribution to acc[k * C + c]. Chunks of rows
// run in parallel into their own partials (fp64), combined in a fixed order.
template <int K, typename RowBody>
std::vector<double> reduce_channels(int64_t M, int64_t C, const RowBody& row_body) {
  const int64_t chunks = (M + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(chunks * K * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      double* acc = partial.data() + chunk * K * C;
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

// NaN-propagating ReLU (NaN < 0 is false, so NaN passes through, as torch.relu).
inline float act(float v, bool relu) { return (relu && v < 0.f) ? 0.f : v; }

}  // namespace resnet_fast::cpu
