// The fused conv epilogue on the CPU: bias + residual + ReLU over NHWC rows,
// and its backward (ReLU mask + per-channel bias gradient).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../resnet_fast.h"
#include "cpu_ops.h"

namespace resnet_fast::cpu {

void bias_act_inplace(at::Tensor& y, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                      bool relu) {
  const int64_t C = y.size(1), M = rows_of(y);
  const at::Tensor bias_f = bias.to(at::kFloat).contiguous();
  const at::Tensor res = residual.has_value() ? as_nhwc(*residual) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bias_act_cpu", [&] {
    scalar_t* out = y.data_ptr<scalar_t>();
    const float* b = bias_f.data_ptr<float>();
    const scalar_t* r = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        scalar_t* row = out + m * C;
        const scalar_t* res_row = r ? r + m * C : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          float v = static_cast<float>(row[c]) + b[c];
          if (res_row) v += static_cast<float>(res_row[c]);
          row[c] = static_cast<scalar_t>(act(v, relu));
        }
      }
    });
  });
}

at::Tensor bias_act(const at::Tensor& y, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                    bool relu) {
  check_bias_act_args(y, bias, residual);
  at::Tensor out = y.clone(at::MemoryFormat::ChannelsLast);
  bias_act_inplace(out, bias, residual, relu);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_act_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                                     bool relu) {
  check_activation(grad_out, "grad_out");
  check_same_shape(grad_out, out, "out");
  const int64_t C = grad_out.size(1), M = rows_of(grad_out);
  const at::Tensor g = as_nhwc(grad_out);
  const at::Tensor o = as_nhwc(out);
  at::Tensor grad_z = relu ? at::empty_like(g, at::MemoryFormat::ChannelsLast) : at::empty({0}, g.options());
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "bias_act_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* op = o.data_ptr<scalar_t>();
    scalar_t* zp = relu ? grad_z.data_ptr<scalar_t>() : nullptr;
    sums = reduce_channels<1>(M, C, [&](int64_t m, float* acc) {
      for (int64_t c = 0; c < C; ++c) acc[c] += relu_grad(gp, op, zp, m * C + c, relu);
    });
  });
  return {grad_z, channel_tensor(sums.data(), C, g.options())};
}

at::Tensor channel_tensor(const double* values, int64_t C, const at::TensorOptions& options) {
  at::Tensor t = at::empty({C}, options.dtype(at::kFloat));
  float* p = t.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) p[c] = static_cast<float>(values[c]);
  return t;
}

}  // namespace resnet_fast::cpu
