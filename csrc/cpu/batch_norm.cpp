// Training-mode BatchNorm on the CPU, fused with the residual add and ReLU,
// and its fused backward. NHWC: each row of [M = N*H*W, C] is one pixel.
#include <ATen/Dispatch.h>

#include <cmath>

#include "../resnet_fast.h"
#include "cpu_ops.h"

namespace resnet_fast::cpu {

namespace {

std::vector<float> as_floats(const at::Tensor& t) {
  const at::Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// One row of the backward's first pass: dz (masked and stored when RELU),
// sum dz and sum dz * (x - mean). The restrict-qualified parameters tell the
// compiler the output and the accumulators do not alias the inputs, so the
// loop vectorises (through a lambda's captured pointers it does not).
template <typename scalar_t, bool RELU>
inline void backward_sums_row(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                              const scalar_t* __restrict__ x, scalar_t* __restrict__ grad_z,
                              const float* __restrict__ mean, float* __restrict__ sum_dz,
                              float* __restrict__ sum_dz_xmu, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    float dz = static_cast<float>(grad_out[c]);
    if (RELU) {
      dz = static_cast<float>(out[c]) > 0.f ? dz : 0.f;
      grad_z[c] = static_cast<scalar_t>(dz);
    }
    sum_dz[c] += dz;
    sum_dz_xmu[c] += dz * (static_cast<float>(x[c]) - mean[c]);
  }
}

// Rows of the forward's passes, restrict-qualified for the same reason: the
// per-channel sum, the sum of squared deviations, and the output
// act(x * scale + shift + residual).
template <typename scalar_t>
inline void sum_row(const scalar_t* __restrict__ x, float* __restrict__ acc, int64_t C) {
  for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<float>(x[c]);
}

template <typename scalar_t>
inline void squared_deviation_row(const scalar_t* __restrict__ x, const float* __restrict__ mean,
                                  float* __restrict__ acc, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float d = static_cast<float>(x[c]) - mean[c];
    acc[c] += d * d;
  }
}

template <typename scalar_t, bool RESIDUAL, bool RELU>
inline void normalize_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                          const float* __restrict__ scale, const float* __restrict__ shift,
                          scalar_t* __restrict__ out, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    float v = static_cast<float>(x[c]) * scale[c] + shift[c];
    if (RESIDUAL) v += static_cast<float>(res[c]);
    out[c] = static_cast<scalar_t>(act(v, RELU));
  }
}

template <typename scalar_t, bool RESIDUAL, bool RELU>
void normalize_rows(const scalar_t* x, const scalar_t* res, const float* scale, const float* shift, scalar_t* out,
                    int64_t M, int64_t C) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      normalize_row<scalar_t, RESIDUAL, RELU>(x + m * C, RESIDUAL ? res + m * C : nullptr, scale, shift,
                                              out + m * C, C);
  });
}

// The grad_x pass of the backward: gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)).
template <typename scalar_t>
inline void grad_x_row(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ x,
                       const float* __restrict__ mean, const float* __restrict__ k_dz,
                       const float* __restrict__ k_xmu, const float* __restrict__ k_out,
                       scalar_t* __restrict__ grad_x, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float xmu = static_cast<float>(x[c]) - mean[c];
    grad_x[c] = static_cast<scalar_t>((static_cast<float>(dz[c]) - k_dz[c] - xmu * k_xmu[c]) * k_out[c]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_train(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, double eps, bool relu) {
  check_bn_train_args(x_in, weight, bias, residual);
  const at::Tensor x = as_nhwc(x_in);
  const at::Tensor res = residual.has_value() ? as_nhwc(*residual) : at::Tensor();
  const int64_t C = x.size(1), M = rows_of(x);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  const std::vector<float> gamma = as_floats(weight), beta = as_floats(bias);
  std::vector<double> mean, var(C);
  std::vector<float> scale(C), shift(C);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_train_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    // Two passes (mean, then squared deviations) keep the variance exact
    // where E[x^2] - E[x]^2 would cancel.
    mean = reduce_channels<1>(M, C, [&](int64_t m, float* acc) { sum_row(xp + m * C, acc, C); });
    for (auto& v : mean) v /= static_cast<double>(M);
    const std::vector<float> mean_f(mean.begin(), mean.end());
    const std::vector<double> sq = reduce_channels<1>(
        M, C, [&](int64_t m, float* acc) { squared_deviation_row(xp + m * C, mean_f.data(), acc, C); });
    for (int64_t c = 0; c < C; ++c) {
      var[c] = sq[c] / static_cast<double>(M);
      const double invstd = 1.0 / std::sqrt(var[c] + eps);
      scale[c] = static_cast<float>(gamma[c] * invstd);
      shift[c] = static_cast<float>(beta[c] - mean[c] * gamma[c] * invstd);
    }
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    const float *sc = scale.data(), *sh = shift.data();
    if (rp && relu) normalize_rows<scalar_t, true, true>(xp, rp, sc, sh, op, M, C);
    else if (rp) normalize_rows<scalar_t, true, false>(xp, rp, sc, sh, op, M, C);
    else if (relu) normalize_rows<scalar_t, false, true>(xp, rp, sc, sh, op, M, C);
    else normalize_rows<scalar_t, false, false>(xp, rp, sc, sh, op, M, C);
  });

  std::vector<double> invstd(C);
  for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
  return {out, channel_tensor(mean.data(), C, x.options()), channel_tensor(invstd.data(), C, x.options()),
          channel_tensor(var.data(), C, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& out_in, const at::Tensor& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool relu) {
  check_bn_backward_args(grad_out_in, x_in, out_in, weight, save_mean, save_invstd);
  const at::Tensor g = as_nhwc(grad_out_in), x = as_nhwc(x_in), out = as_nhwc(out_in);
  const int64_t C = x.size(1), M = rows_of(x);
  const std::vector<float> gamma = as_floats(weight), mean = as_floats(save_mean),
                           invstd = as_floats(save_invstd);
  // Both from the cached activation memory: a fresh large block faults on every page, at every step.
  at::Tensor grad_x = empty_from_activation_memory(x.sizes(), x.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor grad_z = relu ? empty_from_activation_memory(g.sizes(), g.options(), at::MemoryFormat::ChannelsLast)
                           : at::empty({0}, g.options());
  std::vector<double> sums;  // [0, C): sum dz; [C, 2C): sum dz * (x - mean)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* zp = relu ? grad_z.data_ptr<scalar_t>() : nullptr;
    // Pass 1: dReLU mask (written once: it is also the residual's gradient)
    // and the two per-channel sums.
    sums = reduce_channels<2>(M, C, [&](int64_t m, float* acc) {
      const int64_t row = m * C;
      if (relu) {
        backward_sums_row<scalar_t, true>(gp + row, op + row, xp + row, zp + row, mean.data(), acc, acc + C, C);
      } else {
        backward_sums_row<scalar_t, false>(gp + row, op + row, xp + row, zp, mean.data(), acc, acc + C, C);
      }
    });
    // Pass 2: grad_x = gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)).
    std::vector<float> k_dz(C), k_xmu(C), k_out(C);
    for (int64_t c = 0; c < C; ++c) {
      k_dz[c] = static_cast<float>(sums[c] / M);
      k_xmu[c] = static_cast<float>(sums[C + c] / M * invstd[c] * invstd[c]);
      k_out[c] = gamma[c] * invstd[c];
    }
    const scalar_t* dzp = relu ? zp : gp;
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        grad_x_row(dzp + m * C, xp + m * C, mean.data(), k_dz.data(), k_xmu.data(), k_out.data(), gxp + m * C, C);
    });
  });

  std::vector<double> grad_weight(C);
  for (int64_t c = 0; c < C; ++c) grad_weight[c] = sums[C + c] * invstd[c];
  const at::TensorOptions wopts = weight.options();
  return {grad_x, channel_tensor(grad_weight.data(), C, x.options()).to(wopts.dtype()),
          channel_tensor(sums.data(), C, x.options()).to(wopts.dtype()), grad_z};
}

}  // namespace resnet_fast::cpu
