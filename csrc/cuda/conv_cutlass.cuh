// The implicit-GEMM convolution behind conv_bias_act on CUDA, built from
// CUTLASS's SM80 conv2d fprop (cp.async multistage mainloop, ldmatrix,
// mma.sync on tensor cores; it also runs on SM90) with our own epilogue.
//
// Why CUTLASS rather than mma.sync by hand: the convolution iterators (masks
// for padding, stride and dilation, predicated 16-byte loads) and the
// shared-memory swizzles are the part a hand-written kernel gets subtly wrong,
// and CUTLASS's are tested across every shape class we need. What is ours is
// the epilogue: bias, residual and ReLU applied to the fp32 accumulators and
// stored once. It is header-only (the nvidia-cutlass wheel ships the headers),
// so it builds with the rest of the extension.
//
// GEMM view: M = N*P*Q output pixels, N = K output channels, reduction over
// R*S*C. float16 and bfloat16 run on 16-bit tensor cores, float32 on TF32
// ones (the host side allows that only where PyTorch's cuDNN convolutions
// may use TF32). Three kernels per dtype (KernelShape) keep the build within
// CI's time; each dtype is its own file, so they compile in parallel.
// Grouped convolutions stay with cuDNN: ResNeXt's groups are 4 to 32
// channels deep, too thin a reduction for these tiles.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ATen.h>

#include <cutlass/conv/conv2d_problem_size.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
#include <cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>

#include <string>

#include "conv_cutlass.h"

namespace resnet_fast::gpu {

// out = act(accumulator + bias + residual), computed in fp32 and cast once:
// the output functor of CUTLASS's epilogue-with-broadcast, where the
// broadcast vector is the bias and the source tensor the residual. Whether
// there is a residual and whether to apply ReLU are run-time parameters, so
// one kernel serves every conv_bias_act variant; without a residual the
// epilogue never reads the source tensor.
template <typename Element, int Count>
class BiasResidualAct {
 public:
  static bool const kIsSingleSource = true;  // one source tensor: the residual
  using ElementOutput = Element;
  using ElementC = Element;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementVector = float;  // the bias
  using ElementZ = Element;     // the output
  using ElementT = Element;     // a second output, never stored (kStoreT)
  static int const kElementsPerAccess = Count;
  static int const kCount = Count;
  using FragmentAccumulator = cutlass::Array<float, Count>;
  using FragmentCompute = cutlass::Array<float, Count>;
  using FragmentC = cutlass::Array<Element, Count>;
  using FragmentOutput = cutlass::Array<Element, Count>;
  using FragmentZ = cutlass::Array<Element, Count>;
  using FragmentT = cutlass::Array<Element, Count>;
  static bool const kIsHeavy = false;
  static bool const kStoreZ = true;
  static bool const kStoreT = false;

  struct Params {
    bool has_residual = false;
    bool relu = false;
  };

  CUTLASS_HOST_DEVICE explicit BiasResidualAct(Params const& params) : params_(params) {}

  CUTLASS_HOST_DEVICE bool is_source_needed() const { return params_.has_residual; }

  // Only called for split-K, which the launcher never requests (a partial
  // sum must not be activated).
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  // With a residual.
  CUTLASS_HOST_DEVICE void operator()(FragmentZ& out, FragmentT&, FragmentAccumulator const& accumulator,
                                      FragmentC const& residual, FragmentCompute const& bias) const {
    const FragmentCompute residual_f = cutlass::NumericArrayConverter<float, Element, Count>()(residual);
    FragmentCompute value;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < Count; ++i) value[i] = activate(accumulator[i] + bias[i] + residual_f[i]);
    out = cutlass::NumericArrayConverter<Element, float, Count>()(value);
  }

  // Without one.
  CUTLASS_HOST_DEVICE void operator()(FragmentZ& out, FragmentT&, FragmentAccumulator const& accumulator,
                                      FragmentCompute const& bias) const {
    FragmentCompute value;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < Count; ++i) value[i] = activate(accumulator[i] + bias[i]);
    out = cutlass::NumericArrayConverter<Element, float, Count>()(value);
  }

 private:
  // NaN < 0 is false, so NaN passes through as it does through torch.relu.
  CUTLASS_HOST_DEVICE float activate(float v) const { return (params_.relu && v < 0.f) ? 0.f : v; }

  Params params_;
};

// Elements of T per 16-byte access: every channel count must be a multiple
// of it.
template <typename T>
constexpr int kAccess = 128 / cutlass::sizeof_bits<T>::value;

// The shapes of the three kernels (CutlassKernel): a block of 4 warps, 2 x 2
// over the output tile; 4 pipeline stages of reduction slices 64 bytes deep
// (32 16-bit values, 16 for TF32); the matching mma.sync shape
// (16x8x16 for 16-bit inputs, 16x8x8 for TF32). Shared memory per block:
// 64 KiB for 128x128 tiles, 48 KiB for 128x64.
template <CutlassKernel kKernel>
struct KernelShape {
  static constexpr int kTileN = kKernel == CutlassKernel::kWide ? 128 : 64;
  // kOptimized walks the filter taps one at a time, each reduction slice
  // within one tap's channels; kFixedChannels packs several taps into a
  // slice, reading exactly kFewChannels channels per tap. A 7x7 stem over 3
  // channels padded to 4 then keeps 2/3 of the tensor-core work useful
  // (147 of the 7 x 32 reduction values) rather than 3/32. The last slice's taps
  // past the filter read real pixels against weights masked to zero, so an
  // inf or NaN in x can also reach the outputs just beside those whose
  // window holds it.
  static constexpr cutlass::conv::IteratorAlgorithm kIterator = kKernel == CutlassKernel::kFewChannels
                                                                    ? cutlass::conv::IteratorAlgorithm::kFixedChannels
                                                                    : cutlass::conv::IteratorAlgorithm::kOptimized;
};

// CUTLASS's fused-epilogue convolution kernel counts its reduction steps as
// if every slice stayed within one filter tap (R * S * ceil(C / depth)). A
// kFixedChannels slice spans several taps, so for the 16-bit 7x7 stem that
// count is 49 rather than 7: the extra steps multiply by weights masked to
// zero, so the result is right but the work is not. This is CUTLASS's kernel
// with the count its iterator algorithm implies.
template <typename Base>
struct CountedConvKernel : Base {
  struct Params : Base::Params {
    Params() = default;
    CUTLASS_HOST_DEVICE Params(typename Base::Arguments const& args, int* semaphore = nullptr)
        : Base::Params(args, semaphore) {
      this->gemm_k_iterations = cutlass::conv::implicit_gemm_k_iterations(
          Base::kConvolutionalOperator, Base::ThreadblockShape::kK, args.problem_size, Base::kIteratorAlgorithm);
    }
  };
};

// ElementIn is the type of x and the weight (half_t, bfloat16_t, or float,
// which the warp-level mma rounds to TF32); ElementOut is the output's type.
template <typename ElementIn, typename ElementOut, CutlassKernel kKernel>
struct CutlassConv {
  static constexpr int kDepth = 512 / cutlass::sizeof_bits<ElementIn>::value;
  static constexpr int kTileN = KernelShape<kKernel>::kTileN;
  // Elements per load of x and the weight: 16 bytes, or one tap's channels.
  static constexpr int kInputAccess =
      kKernel == CutlassKernel::kFewChannels ? static_cast<int>(kFewChannels) : kAccess<ElementIn>;
  using BaseKernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      ElementIn, cutlass::layout::TensorNHWC,        // x
      ElementIn, cutlass::layout::TensorNHWC,        // weight, [K, R, S, C]
      ElementOut, cutlass::layout::TensorNHWC,       // out and residual
      float,                                         // accumulator
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, kTileN, kDepth>,     // block tile
      cutlass::gemm::GemmShape<64, kTileN / 2, kDepth>,  // warp tile
      cutlass::gemm::GemmShape<16, 8, 256 / cutlass::sizeof_bits<ElementIn>::value>,  // mma instruction
      BiasResidualAct<ElementOut, kAccess<ElementOut>>,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>,
      /*Stages=*/4, cutlass::arch::OpMultiplyAdd, KernelShape<kKernel>::kIterator,
      cutlass::conv::StrideSupport::kStrided, kInputAccess, kInputAccess>::Kernel;
  using Kernel = CountedConvKernel<BaseKernel>;
  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

template <typename ElementIn, typename ElementOut, CutlassKernel kKernel>
std::string run_cutlass_kernel(const CutlassConvArgs& a) {
  using Conv = typename CutlassConv<ElementIn, ElementOut, kKernel>::Device;
  using Kernel = typename CutlassConv<ElementIn, ElementOut, kKernel>::Kernel;
  using Layout = cutlass::layout::TensorNHWC;

  const cutlass::conv::Conv2dProblemSize problem(
      a.N, a.H, a.W, a.C, a.K, a.R, a.S, a.P, a.Q, a.pad_h, a.pad_w, a.stride_h, a.stride_w, a.dilation_h,
      a.dilation_w, cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1, /*groups=*/1);

  // CUTLASS's TensorRef takes non-const pointers; x, weight and the
  // residual are only read.
  auto input = [](const void* p, cutlass::Tensor4DCoord extent) {
    return cutlass::TensorRef<ElementIn, Layout>(static_cast<ElementIn*>(const_cast<void*>(p)),
                                                 Layout::packed(extent));
  };
  const cutlass::Tensor4DCoord out_extent(a.N, a.P, a.Q, a.K);
  auto output = [&](const void* p) {
    return cutlass::TensorRef<ElementOut, Layout>(static_cast<ElementOut*>(const_cast<void*>(p)),
                                                  Layout::packed(out_extent));
  };
  // Without a residual the source is never read; it still needs a valid
  // layout, so it points at the output.
  typename Conv::Arguments arguments(
      problem, input(a.x, {a.N, a.H, a.W, a.C}), input(a.weight, {a.K, a.R, a.S, a.C}),
      output(a.residual != nullptr ? a.residual : a.out), output(a.out),
      {/*has_residual=*/a.residual != nullptr, a.relu},
      cutlass::conv::SplitKMode::kSerial, /*ptr_Vector=*/const_cast<float*>(a.bias),
      /*ptr_Tensor=*/nullptr, /*ldr=*/0, /*ldt=*/0);

  Conv conv;
  cutlass::Status status = conv.can_implement(arguments);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  if (a.reduction_steps != nullptr) {  // a question about the launch, not a launch
    *a.reduction_steps = typename Kernel::Params(arguments).gemm_k_iterations;
    return {};
  }
  // Serial split-K of 1 slice needs no workspace.
  if (Conv::get_workspace_size(arguments) != 0) return "the convolution asked for a split-K workspace";
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  status = conv.initialize(arguments, /*workspace=*/nullptr, stream);
  if (status == cutlass::Status::kSuccess) status = conv.run(stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  return {};
}

// The launch of one dtype's kernels; each conv_cutlass_<dtype>.cu
// instantiates it once.
template <typename ElementIn, typename ElementOut>
std::string run_conv_cutlass(const CutlassConvArgs& args, CutlassKernel kernel) {
  switch (kernel) {
    case CutlassKernel::kWide:
      return run_cutlass_kernel<ElementIn, ElementOut, CutlassKernel::kWide>(args);
    case CutlassKernel::kNarrow:
      return run_cutlass_kernel<ElementIn, ElementOut, CutlassKernel::kNarrow>(args);
    case CutlassKernel::kFewChannels:
      return run_cutlass_kernel<ElementIn, ElementOut, CutlassKernel::kFewChannels>(args);
  }
  return "unknown kernel";
}

}  // namespace resnet_fast::gpu
