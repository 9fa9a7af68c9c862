// all_finite: whether a CPU tensor holds no NaN and no Inf, by the exponent
// bits of each element (all ones for NaN and Inf alone) in one parallel pass
// over its memory. For the checks of resnet_fast/finite.py (a network's
// input, once per forward) and of the convolution's fused ReLU (conv.cpp):
// aten's isfinite(x).all() writes a bool tensor first and was 20-50x slower;
// x.sum() converts bfloat16 to float on the way.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "cpu_ops.h"

namespace resnet_fast::cpu {

namespace {

// Elements per work item: a few hundred KB, so small tensors take one pass on one thread.
constexpr int64_t kGrain = int64_t{1} << 16;

// Whether none of n elements has every bit of `exponent` set: the least of
// (bits & exponent) ^ exponent is 0 exactly then (a min reduction, which the
// compiler vectorises where a flag it does not).
template <typename bits_t>
RESNET_FAST_SIMD_CLONES bool no_full_exponent(const bits_t* p, int64_t n, bits_t exponent) {
  bits_t least = exponent;
  for (int64_t i = 0; i < n; ++i) {
    const bits_t missing = static_cast<bits_t>((p[i] & exponent) ^ exponent);
    least = missing < least ? missing : least;
  }
  return least != 0;
}

template <typename bits_t>
bool scan(const at::Tensor& t, bits_t exponent) {
  const bits_t* p = static_cast<const bits_t*>(t.const_data_ptr());
  std::atomic<bool> finite{true};
  at::parallel_for(0, t.numel(), kGrain, [&](int64_t first, int64_t last) {
    if (!no_full_exponent(p + first, last - first, exponent)) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace

bool all_finite(const at::Tensor& t) {
  if (!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type())) return true;
  // A dense tensor's elements fill one span of memory whatever its layout (channels_last included).
  if (t.device().is_cpu() && t.is_non_overlapping_and_dense()) {
    switch (t.scalar_type()) {
      case at::kFloat: return scan<uint32_t>(t, 0x7f800000u);
      case at::kBFloat16: return scan<uint16_t>(t, 0x7f80u);
      case at::kHalf: return scan<uint16_t>(t, 0x7c00u);
      default: break;
    }
  }
  return at::isfinite(t).all().item<bool>();
}

}  // namespace resnet_fast::cpu
