// Host side of the implicit-GEMM conv_bias_act: which convolutions it takes,
// the choice against cuDNN, and the launch from at::Tensors. The kernels are
// in conv_cutlass_{f16,bf16,tf32}.cu.
#include "conv_cutlass.h"

#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <utility>

#include "../resnet_fast.h"

namespace resnet_fast::gpu {

ConvRequest requested_conv_algorithm() {
  const char* value = std::getenv("RESNET_FAST_CUDA_CONV");
  if (value != nullptr && *value != '\0' && std::strcmp(value, "auto") != 0) {
    constexpr std::pair<const char*, ConvAlgorithm> kNames[] = {
        {"cutlass", ConvAlgorithm::kCutlass},        {"cutlass_sm90", ConvAlgorithm::kCutlassSm90},
        {"cutlass_sm80", ConvAlgorithm::kCutlassSm80}, {"cudnn", ConvAlgorithm::kCudnn},
        {"cudnn_fused", ConvAlgorithm::kCudnnFused}};
    for (const auto& [name, algorithm] : kNames)
      if (std::strcmp(value, name) == 0) return {algorithm, /*demanded=*/true};
    TORCH_CHECK(false,
                "resnet_fast: RESNET_FAST_CUDA_CONV must be auto, cutlass, cutlass_sm90, cutlass_sm80, cudnn or "
                "cudnn_fused, got '",
                value, "'");
  }
  switch (preferred_cuda_conv_family()) {
    case CudaConvFamily::kCutlassSm90:
      return {ConvAlgorithm::kCutlassSm90, false};
    case CudaConvFamily::kCutlassSm80:
      return {ConvAlgorithm::kCutlassSm80, false};
    case CudaConvFamily::kCudnn:
      return {ConvAlgorithm::kCudnn, false};
    case CudaConvFamily::kCudnnFused:
      return {ConvAlgorithm::kCudnnFused, false};
    case CudaConvFamily::kAuto:
      break;
  }
  return {};
}

namespace {

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The kernel indexes with 32-bit offsets.
bool fits_int32_offsets(int64_t numel, const at::Tensor& like) {
  return numel * static_cast<int64_t>(like.element_size()) < (int64_t{1} << 31);
}

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

}  // namespace

std::optional<std::string> cutlass_unsupported_reason(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& residual,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups) {
#if !defined(RESNET_FAST_WITH_CUTLASS)
  return std::string("the extension was built without the CUTLASS headers (pip install nvidia-cutlass, then reinstall)");
#else
  const at::ScalarType dtype = x.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat)
    return concat("it takes float16, bfloat16 and float32, got ", dtype);
  // float32 convolutions run on TF32 tensor cores, so only where PyTorch's
  // cuDNN convolutions may too.
  if (dtype == at::kFloat && !at::globalContext().allowTF32CuDNN())
    return std::string("float32 with TF32 off (torch.backends.cudnn.allow_tf32 = False) is computed exactly by cuDNN");
  if (groups != 1) return concat("grouped convolution (groups=", groups, ")");
  const int64_t C = x.size(1), K = weight.size(0), R = weight.size(2), S = weight.size(3);
  const int64_t access = 16 / x.element_size();  // elements per 16-byte access
  const bool padded = C < kFewChannels;  // x and weight get zero-padded copies
  if (C > kFewChannels && C % access != 0)
    return concat("input channels must be at most ", kFewChannels, " or a multiple of ", access, " for ", dtype,
                  " (16-byte loads), got ", C);
  if (K % access != 0)
    return concat("output channels must be a multiple of ", access, " for ", dtype, " (16-byte stores), got ", K);
  if (R > 32 || S > 32) return concat("kernel ", R, "x", S, " is larger than 32x32");
  const int64_t P = conv_output_size(x.size(2), R, stride[0], padding[0], dilation[0]);
  const int64_t Q = conv_output_size(x.size(3), S, stride[1], padding[1], dilation[1]);
  const int64_t C_read = padded ? kFewChannels : C;
  if (!fits_int32_offsets(x.numel() / C * C_read, x) || !fits_int32_offsets(weight.numel() / C * C_read, x) ||
      !fits_int32_offsets(x.size(0) * K * P * Q, x))
    return std::string("a tensor of 2 GiB or more (the kernel uses 32-bit offsets)");
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast) || !weight.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      (residual.has_value() && !residual->is_contiguous(at::MemoryFormat::ChannelsLast)))
    return std::string("x, weight and residual must be channels_last contiguous");
  if ((!padded && (!aligned16(x) || !aligned16(weight))) || (residual.has_value() && !aligned16(*residual)))
    return std::string("x, weight and residual must start on 16-byte boundaries");
  return std::nullopt;
#endif
}

std::optional<std::string> cudnn_reason(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvRequest request = requested_conv_algorithm();
  if (request.algorithm == ConvAlgorithm::kCudnn)
    return std::string(request.demanded ? "RESNET_FAST_CUDA_CONV=cudnn" : "this thread prefers it (cuda_conv_family)");
  std::optional<std::string> reason =
      cutlass_unsupported_reason(x, weight, residual, stride, padding, dilation, groups);
  const bool cutlass_demanded =
      request.demanded && (request.algorithm == ConvAlgorithm::kCutlass ||
                           request.algorithm == ConvAlgorithm::kCutlassSm90 ||
                           request.algorithm == ConvAlgorithm::kCutlassSm80);
  TORCH_CHECK(!reason.has_value() || !cutlass_demanded, "resnet_fast: RESNET_FAST_CUDA_CONV=",
              std::getenv("RESNET_FAST_CUDA_CONV"), ", but the implicit-GEMM convolution cannot run this one: ",
              *reason);
  return reason;
}

bool use_cudnn_fused(bool relu) {
  const ConvRequest request = requested_conv_algorithm();
  if (request.algorithm != ConvAlgorithm::kCudnnFused) return false;
  TORCH_CHECK(relu || !request.demanded,
              "resnet_fast: RESNET_FAST_CUDA_CONV=cudnn_fused, but cuDNN's fused convolution always applies a ReLU "
              "and this layer has none");
  return relu;
}

std::string cudnn_fused_name(bool residual) {
  return residual ? "cudnn fused (conv + bias + residual + ReLU in one cuDNN call)"
                  : "cudnn fused (conv + bias + ReLU in one cuDNN call)";
}

int64_t device_capability(const at::Tensor& x) {
  if (!x.is_cuda()) return 0;
  const cudaDeviceProp* properties = at::cuda::getDeviceProperties(x.device().index());
  return properties->major * 10 + properties->minor;
}

std::string sm90_kernel_name() { return "cutlass sm90 (128x128x64 tiles, wgmma, TMA im2col)"; }

CutlassKernel choose_cutlass_kernel(int64_t C, int64_t K) {
  if (C <= kFewChannels) return CutlassKernel::kFewChannels;
  return K <= 64 ? CutlassKernel::kNarrow : CutlassKernel::kWide;
}

std::string cutlass_kernel_name(CutlassKernel kernel, int64_t C) {
  switch (kernel) {
    case CutlassKernel::kWide:
      return "cutlass sm80 (128x128 tiles)";
    case CutlassKernel::kNarrow:
      return "cutlass sm80 (128x64 tiles)";
    case CutlassKernel::kFewChannels:
      if (C == kFewChannels) return concat("cutlass sm80 (128x64 tiles, ", kFewChannels, " input channels)");
      return concat("cutlass sm80 (128x64 tiles, ", C, C == 1 ? " input channel" : " input channels", " zero-padded to ",
                    kFewChannels, ")");
  }
  return "cutlass";
}

#if defined(RESNET_FAST_WITH_CUTLASS)
namespace {

// The sizes of a launch over x ([N, C, H, W]) and weight ([K, C, R, S]).
CutlassConvArgs launch_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  CutlassConvArgs args;
  args.N = static_cast<int>(x.size(0));
  args.C = static_cast<int>(x.size(1));
  args.H = static_cast<int>(x.size(2));
  args.W = static_cast<int>(x.size(3));
  args.K = static_cast<int>(weight.size(0));
  args.R = static_cast<int>(weight.size(2));
  args.S = static_cast<int>(weight.size(3));
  const std::vector<int64_t> dil = effective_dilation(weight, dilation);
  args.P = static_cast<int>(conv_output_size(args.H, args.R, stride[0], padding[0], dil[0]));
  args.Q = static_cast<int>(conv_output_size(args.W, args.S, stride[1], padding[1], dil[1]));
  args.pad_h = static_cast<int>(padding[0]);
  args.pad_w = static_cast<int>(padding[1]);
  args.stride_h = static_cast<int>(stride[0]);
  args.stride_w = static_cast<int>(stride[1]);
  args.dilation_h = static_cast<int>(dil[0]);
  args.dilation_w = static_cast<int>(dil[1]);
  return args;
}

#if defined(RESNET_FAST_WITH_SM90)
std::string sm90_unsupported(const CutlassConvArgs& args, at::ScalarType dtype) {
  return dtype == at::kHalf ? sm90_unsupported_f16(args) : sm90_unsupported_bf16(args);
}

std::string launch_sm90(const CutlassConvArgs& args, at::ScalarType dtype) {
  return dtype == at::kHalf ? launch_conv_sm90_f16(args) : launch_conv_sm90_bf16(args);
}
#endif

std::string launch(const CutlassConvArgs& args, at::ScalarType dtype, CutlassKernel kernel) {
  return dtype == at::kHalf       ? launch_conv_cutlass_f16(args, kernel)
         : dtype == at::kBFloat16 ? launch_conv_cutlass_bf16(args, kernel)
                                  : launch_conv_cutlass_tf32(args, kernel);
}

// t ([n, c, h, w], channels_last) with zero channels appended up to
// `channels`, channels_last.
at::Tensor pad_channels(const at::Tensor& t, int64_t channels) {
  return at::constant_pad_nd(t, {0, 0, 0, 0, 0, channels - t.size(1)}).contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace
#endif  // RESNET_FAST_WITH_CUTLASS

std::optional<std::string> sm90_unsupported_reason(const at::Tensor& x, const at::Tensor& weight,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool relu, int64_t capability) {
#if !defined(RESNET_FAST_WITH_SM90)
  return std::string("the extension was built without its sm_90a kernels (TORCH_CUDA_ARCH_LIST without 9.0a)");
#else
  if (capability / 10 != 9)
    return concat("compute capability ", capability / 10, ".", capability % 10, " is not Hopper (9.x)");
  const at::ScalarType dtype = x.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16)
    return concat("it takes float16 and bfloat16, got ", dtype, " (TF32 runs on the SM80 family)");
  CutlassConvArgs args = launch_geometry(x, weight, stride, padding, dilation);
  args.relu = relu;
  const std::string refusal = sm90_unsupported(args, dtype);
  if (!refusal.empty())
    return concat("CUTLASS's sm90 convolution refuses it (", refusal,
                  "): it needs input and output channels that are multiples of 8, and padding and dilation within "
                  "its TMA im2col limits");
  return std::nullopt;
#endif
}

namespace {

// Whether the implicit GEMM runs this convolution on the Hopper family, under
// RESNET_FAST_CUDA_CONV; raises when that asks for a family that cannot run it.
bool use_sm90(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
              at::IntArrayRef dilation, bool relu, int64_t capability) {
  const ConvRequest request = requested_conv_algorithm();
  if (request.algorithm == ConvAlgorithm::kCutlassSm80) return false;
  const std::optional<std::string> reason =
      sm90_unsupported_reason(x, weight, stride, padding, dilation, relu, capability);
  TORCH_CHECK(!reason.has_value() || !(request.demanded && request.algorithm == ConvAlgorithm::kCutlassSm90),
              "resnet_fast: RESNET_FAST_CUDA_CONV=cutlass_sm90, but the Hopper kernel cannot run this convolution: ",
              *reason);
  return !reason.has_value();
}

}  // namespace

at::Tensor conv_bias_act_cutlass(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias,
                                 const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
#if !defined(RESNET_FAST_WITH_CUTLASS)
  TORCH_CHECK(false, "resnet_fast: the extension was built without the CUTLASS headers");
#else
  const bool sm90 = use_sm90(x_in, weight_in, stride, padding, dilation, relu, device_capability(x_in));
  const CutlassKernel kernel = choose_cutlass_kernel(x_in.size(1), weight_in.size(0));
  // The few-channel kernel reads exactly kFewChannels channels per filter tap.
  const bool pad = !sm90 && x_in.size(1) < kFewChannels;
  const at::Tensor x = pad ? pad_channels(x_in, kFewChannels) : x_in;
  const at::Tensor weight = pad ? pad_channels(weight_in, kFewChannels) : weight_in;
  CutlassConvArgs args = launch_geometry(x, weight, stride, padding, dilation);
  args.relu = relu;

  // The epilogue reads the bias as many floats at a time as it writes outputs
  // (8 for 16-bit outputs: 32 bytes).
  at::Tensor bias_f32 = bias.to(at::kFloat).contiguous();
  if (reinterpret_cast<uintptr_t>(bias_f32.data_ptr()) % 32 != 0) bias_f32 = bias_f32.clone();
  at::Tensor out = at::empty({args.N, args.K, args.P, args.Q},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));

  args.x = x.data_ptr();
  args.weight = weight.data_ptr();
  args.bias = bias_f32.data_ptr<float>();
  args.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  args.out = out.data_ptr();
#if defined(RESNET_FAST_WITH_SM90)
  const std::string error = sm90 ? launch_sm90(args, x.scalar_type()) : launch(args, x.scalar_type(), kernel);
#else
  const std::string error = launch(args, x.scalar_type(), kernel);
#endif
  TORCH_CHECK(error.empty(), "resnet_fast: the implicit-GEMM convolution failed: ", error);
  return out;
#endif
}

namespace {

// What conv_bias_act would run for these arguments: "cutlass sm90 (...)",
// "cutlass sm80 (<kernel>)", "cudnn fused (...)", or "cudnn: " and why. For
// tests, benchmarks and tune(); takes tensors on any device.
std::string conv_algorithm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           std::optional<int64_t> capability, bool relu) {
  const at::Tensor bias = at::zeros({weight.size(0)}, x.options());
  check_conv_args(x, weight, bias, residual, stride, padding, dilation, groups);
  if (use_cudnn_fused(relu)) return cudnn_fused_name(residual.has_value());
  std::optional<at::Tensor> residual_nhwc;
  if (residual.has_value()) residual_nhwc = as_nhwc(*residual);
  const std::optional<std::string> reason =
      cudnn_reason(as_nhwc(x), weight.contiguous(at::MemoryFormat::ChannelsLast), residual_nhwc, stride, padding,
                   effective_dilation(weight, dilation), groups);
  if (reason.has_value()) return "cudnn: " + *reason;
  const std::vector<int64_t> dil = effective_dilation(weight, dilation);
  if (use_sm90(x, weight, stride, padding, dil, relu, capability.value_or(device_capability(x))))
    return sm90_kernel_name();
  return cutlass_kernel_name(choose_cutlass_kernel(x.size(1), weight.size(0)), x.size(1));
}

// How many main-loop steps (reduction slices) each block of the implicit
// GEMM would run for this convolution, which it must take: for tests of the
// launch (the few-channel kernel packs several filter taps into one step).
// Takes tensors on any device and launches nothing.
int64_t cutlass_reduction_steps(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  // The SM80 family's plan, whatever device the tensors are on.
  const std::string algorithm = conv_algorithm(x, weight, std::nullopt, stride, padding, dilation, 1, 0, true);
  TORCH_CHECK(algorithm.rfind("cutlass", 0) == 0, "resnet_fast: the implicit GEMM does not run this convolution: ",
              algorithm);
#if defined(RESNET_FAST_WITH_CUTLASS)
  CutlassConvArgs args = launch_geometry(x, weight, stride, padding, dilation);
  args.C = std::max(args.C, static_cast<int>(kFewChannels));  // what a padded input would have
  int steps = 0;
  args.reduction_steps = &steps;
  const std::string error = launch(args, x.scalar_type(), choose_cutlass_kernel(x.size(1), weight.size(0)));
  TORCH_CHECK(error.empty(), "resnet_fast: the implicit GEMM cannot plan this convolution: ", error);
  return steps;
#else
  return 0;  // unreachable: conv_algorithm names cuDNN without CUTLASS
#endif
}

}  // namespace

}  // namespace resnet_fast::gpu

TORCH_LIBRARY(resnet_fast_cuda, m) {
  m.def(
      "conv_algorithm(Tensor x, Tensor weight, Tensor? residual, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int? capability=None, bool relu=True) -> str",
      &resnet_fast::gpu::conv_algorithm);
  m.def("cutlass_reduction_steps(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation) -> int",
        &resnet_fast::gpu::cutlass_reduction_steps);
}
