// The Hopper implicit-GEMM convolution behind conv_bias_act on compute
// capability 9.0: CUTLASS 3's sm90 conv fprop, built for sm_90a (wgmma needs
// the arch-specific target). The activation tile arrives by TMA in im2col
// mode and the filter tile by tiled TMA, a producer warp group feeding a
// consumer warp group that multiplies on wgmma; the epilogue is CUTLASS's
// fusion act(acc + beta * C + bias[k]) with C the residual (beta 1, or 0
// and never read without one), stored by TMA.
//
// One tile shape, 128x128x64 (M = N*P*Q output pixels, N = K output
// channels, 64 channels of the reduction per step), and one kernel per dtype
// and activation. CUTLASS's conv has no persistent schedules yet (its
// dispatch policy refuses Cooperative and Pingpong), so each block computes
// one tile. float16 and bfloat16 only: TF32 stays on the SM80 family.
#pragma once

// CuTe's device-side asserts become calls inside the kernel, across which
// ptxas serializes wgmma (warning C7510); CUTLASS's release builds define
// NDEBUG, and so does this header.
#if !defined(NDEBUG)
#define NDEBUG
#endif

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/kernel_hardware_info.hpp>  // before the conv collectives, which use it
#include <cutlass/numeric_types.h>

#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/dispatch_policy.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>

#include <string>

#include "conv_cutlass.h"

namespace resnet_fast::gpu::sm90 {

using namespace cute;

// ReLU that keeps NaN (CUTLASS's ReLu takes fmax, which turns NaN into 0):
// max(x, 0) written as x < 0 ? 0 : x, on one value or a fragment.
template <typename T>
struct ReluKeepingNan {
  CUTLASS_HOST_DEVICE T operator()(T const& value) const { return value < T(0) ? T(0) : value; }
};

template <typename T, int N>
struct ReluKeepingNan<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& values) const {
    cutlass::Array<T, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = values[i] < T(0) ? T(0) : values[i];
    return out;
  }
};

template <typename Element, template <class> class Activation>
struct HopperConv {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte accesses
  using Layout = cutlass::layout::TensorNHWC;  // x NHWC, weight KRSC, out and residual NPQK
  using TileShape = Shape<_128, _128, Shape<_64>>;
  using ClusterShape = Shape<_1, _1, _1>;

  // For fprop the GEMM's N mode is the output channel: the bias is per column.
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Activation, Element, float, float, Element,
                                                                    float>;
  // The fusion needs an explicit epilogue schedule (Auto refuses fusions).
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, Layout, kAlignment, Element, Layout,
      kAlignment, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element, Layout,
      kAlignment, Element, Layout, kAlignment, float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;
  using ProblemShape = cutlass::conv::ConvProblemShape<Mainloop::DispatchPolicy::ConvOp,
                                                       Mainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;

  static ProblemShape problem(const CutlassConvArgs& a) {
    return ProblemShape(cutlass::conv::Mode::kCrossCorrelation, {a.N, a.H, a.W, a.C}, {a.K, a.R, a.S, a.C},
                        {a.pad_h, a.pad_w}, {a.pad_h, a.pad_w}, {a.stride_h, a.stride_w},
                        {a.dilation_h, a.dilation_w}, 1);
  }

  // Host arithmetic only: no CUDA call (the TMA descriptors are encoded by
  // Conv::initialize). Without a residual the output stands in for C, which
  // beta = 0 keeps unread.
  static typename Conv::Arguments arguments(const CutlassConvArgs& a) {
    const ProblemShape shape = problem(a);
    typename Kernel::StrideC stride_c{};
    typename Kernel::StrideD stride_d{};
    // The output's strides over (Q, P, N), as CUTLASS's own conv tests set them.
    cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideC{})>{}, [&](auto i) {
      cute::get<0, i>(stride_c) = shape.stride_C[ProblemShape::RankT - 2 - i];
      cute::get<0, i>(stride_d) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });
    const void* source = a.residual != nullptr ? a.residual : a.out;
    typename Epilogue::Arguments epilogue{{}, static_cast<const Element*>(source), stride_c,
                                          static_cast<Element*>(a.out), stride_d};
    epilogue.thread.alpha = 1.0f;
    epilogue.thread.beta = a.residual != nullptr ? 1.0f : 0.0f;
    epilogue.thread.bias_ptr = a.bias;
    typename Mainloop::Arguments mainloop{static_cast<const Element*>(a.x), static_cast<const Element*>(a.weight)};
    return typename Conv::Arguments(shape, mainloop, epilogue, cutlass::KernelHardwareInfo{});
  }

  // Empty when CUTLASS can run the problem, else why not. Needs no GPU.
  static std::string unsupported(const CutlassConvArgs& a) {
    const cutlass::Status status = Conv::can_implement(arguments(a));
    return status == cutlass::Status::kSuccess ? std::string() : cutlassGetStatusString(status);
  }

  static std::string run(const CutlassConvArgs& a, cudaStream_t stream) {
    const typename Conv::Arguments args = arguments(a);
    Conv conv;
    cutlass::Status status = conv.can_implement(args);
    if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
    // This kernel needs no workspace (no split-K, not persistent).
    if (Conv::get_workspace_size(args) != 0) return "the sm90 kernel asked for a workspace";
    // initialize() encodes the TMA descriptors through the driver; a failed
    // encode is only printed, so ask CUDA too.
    status = conv.initialize(args, nullptr, stream);
    cudaError_t error = cudaGetLastError();
    if (status != cutlass::Status::kSuccess || error != cudaSuccess)
      return std::string("initialize: ") + cutlassGetStatusString(status) + ", " + cudaGetErrorString(error);
    status = conv.run(stream);
    error = cudaGetLastError();
    if (status != cutlass::Status::kSuccess || error != cudaSuccess)
      return std::string("run: ") + cutlassGetStatusString(status) + ", " + cudaGetErrorString(error);
    return std::string();
  }
};

// act(conv + bias + residual) for Element on the given stream; ReLU or none.
template <typename Element>
std::string launch(const CutlassConvArgs& args, cudaStream_t stream) {
  return args.relu ? HopperConv<Element, ReluKeepingNan>::run(args, stream)
                   : HopperConv<Element, cutlass::epilogue::thread::Identity>::run(args, stream);
}

template <typename Element>
std::string unsupported(const CutlassConvArgs& args) {
  return args.relu ? HopperConv<Element, ReluKeepingNan>::unsupported(args)
                   : HopperConv<Element, cutlass::epilogue::thread::Identity>::unsupported(args);
}

}  // namespace resnet_fast::gpu::sm90
