// The tensor-core implicit-GEMM convolution of conv_bias_act (CUTLASS), as
// seen by the rest of the extension: when it can take a convolution, and the
// launch. No CUTLASS header is needed to include this one.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

namespace resnet_fast::gpu {

// Which convolution conv_bias_act runs on CUDA tensors. The environment
// variable RESNET_FAST_CUDA_CONV (read at every call, so tests and benchmarks
// can switch it) demands one:
//   unset / "auto"  no demand (see below);
//   "cutlass"       the implicit GEMM, or an error naming why it cannot run;
//   "cutlass_sm90"  the Hopper family of the implicit GEMM, or an error;
//   "cutlass_sm80"  the SM80 family, also on Hopper, or an error;
//   "cudnn"         cuDNN + our epilogue for every convolution;
//   "cudnn_fused"   cuDNN's own fused conv + bias (+ residual) + ReLU, or an
//                   error for a layer without ReLU.
// Without a demand, the thread's preferred family (preferred_cuda_conv_family,
// set by per-layer plans) is asked for, and where it cannot run the
// automatic choice takes over: the implicit GEMM where it can run (see
// cutlass_unsupported_reason), cuDNN + our epilogue elsewhere; within the
// implicit GEMM the Hopper family where sm90_unsupported_reason allows, the
// SM80 family elsewhere.
enum class ConvAlgorithm { kAuto, kCutlass, kCutlassSm90, kCutlassSm80, kCudnn, kCudnnFused };
struct ConvRequest {
  ConvAlgorithm algorithm = ConvAlgorithm::kAuto;
  bool demanded = false;  // from RESNET_FAST_CUDA_CONV: an error where it cannot run
};
ConvRequest requested_conv_algorithm();

// Why the implicit GEMM cannot run this convolution, or nullopt when it can.
// x, weight and residual are the tensors as the kernel would get them
// (channels_last contiguous); only their dtypes, sizes and addresses are read,
// so this also answers for CPU tensors. Inputs with fewer than kFewChannels
// channels are copied (zero-padded), so their addresses do not matter.
std::optional<std::string> cutlass_unsupported_reason(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& residual,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups);

// Why conv_bias_act takes cuDNN for this convolution, or nullopt when it
// takes the implicit GEMM: cutlass_unsupported_reason under the requested
// algorithm. Raises when RESNET_FAST_CUDA_CONV demands the implicit GEMM and
// it cannot run this convolution.
std::optional<std::string> cudnn_reason(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// Whether conv_bias_act takes cuDNN's own fused conv + bias (+ residual) +
// ReLU: when that is requested and the layer has a ReLU (the fused op always
// applies one). Raises when RESNET_FAST_CUDA_CONV demands it for a layer
// without. Whether its ReLU keeps NaN is cuDNN's affair: tune() checks that
// per layer before choosing it.
bool use_cudnn_fused(bool relu);
// "cudnn fused (...)", as ops.cuda_conv_algorithm says.
std::string cudnn_fused_name(bool residual);

// Geometry and pointers of one launch: x is [N, H, W, C], weight [K, R, S,
// C], out and residual [N, P, Q, K], all dense NHWC; bias is K fp32 values.
struct CutlassConvArgs {
  const void* x = nullptr;
  const void* weight = nullptr;
  const float* bias = nullptr;
  const void* residual = nullptr;  // null: no residual
  void* out = nullptr;
  int N = 0, H = 0, W = 0, C = 0, K = 0, R = 0, S = 0, P = 0, Q = 0;
  int pad_h = 0, pad_w = 0, stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1;
  bool relu = false;
  // When set, the launch functions store here how many main-loop steps
  // (reduction slices) each block would run, and launch nothing.
  int* reduction_steps = nullptr;
};

// The implicit-GEMM kernels, one of each per dtype. A block of 4 warps
// computes a tile of 128 output pixels by 128 or 64 output channels.
enum class CutlassKernel {
  kWide,         // 128x128 tiles, for more than 64 output channels
  kNarrow,       // 128x64 tiles, for at most 64 (a 128-wide tile would be half idle)
  kFewChannels,  // 128x64 tiles over exactly kFewChannels input channels, each
                 // reduction slice taking several filter taps at once: the RGB
                 // stem, its input zero-padded from 3 channels
};
// The input channels of kFewChannels; inputs with fewer are zero-padded to it.
constexpr int64_t kFewChannels = 4;

// The kernel for C input and K output channels, where the implicit GEMM can
// run the convolution (cutlass_unsupported_reason).
CutlassKernel choose_cutlass_kernel(int64_t C, int64_t K);
// "cutlass sm80 (128x128 tiles)" and so on, as ops.cuda_conv_algorithm says.
std::string cutlass_kernel_name(CutlassKernel kernel, int64_t C);

// Run out = act(conv(x, weight) + bias + residual) with one kernel on the
// current stream of the current device, for float16, bfloat16 and (on TF32
// tensor cores) float32 tensors. Each returns an empty string on success,
// else CUTLASS's reason.
std::string launch_conv_cutlass_f16(const CutlassConvArgs& args, CutlassKernel kernel);
std::string launch_conv_cutlass_bf16(const CutlassConvArgs& args, CutlassKernel kernel);
std::string launch_conv_cutlass_tf32(const CutlassConvArgs& args, CutlassKernel kernel);

// The Hopper family (conv_cutlass_sm90.cuh; CUTLASS 3, wgmma and TMA,
// 128x128x64 tiles), in builds for sm_90a: float16 and bfloat16. The
// *_unsupported functions are host arithmetic (CUTLASS's can_implement):
// empty when the kernel takes the problem, else why not.
std::string sm90_unsupported_f16(const CutlassConvArgs& args);
std::string sm90_unsupported_bf16(const CutlassConvArgs& args);
std::string launch_conv_sm90_f16(const CutlassConvArgs& args);
std::string launch_conv_sm90_bf16(const CutlassConvArgs& args);

// Why the Hopper family cannot run this convolution on a device of compute
// capability major.minor = `capability` / 10 (as cutlass_unsupported_reason,
// which must hold already), or nullopt when it can.
std::optional<std::string> sm90_unsupported_reason(const at::Tensor& x, const at::Tensor& weight,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool relu, int64_t capability);
// "cutlass sm90 (128x128x64 tiles, wgmma, TMA im2col)", as ops.cuda_conv_algorithm says.
std::string sm90_kernel_name();

// conv_bias_act on the implicit GEMM; the caller has checked the arguments,
// holds the device guard and made sure cudnn_reason is nullopt for exactly
// these (channels_last contiguous) tensors.
at::Tensor conv_bias_act_cutlass(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool relu);

// The compute capability of x's CUDA device as major * 10 + minor; 0 for
// tensors on any other device.
int64_t device_capability(const at::Tensor& x);

}  // namespace resnet_fast::gpu
