// Activation memory kept from one CPU inference forward to the next.
//
// A network forward on the CPU allocates each layer's output afresh (oneDNN's
// convolutions take no output buffer) and frees it a layer or two later.
// glibc serves the large ones from the top of its heap or from mmap and
// hands them back to the system as they are freed, so the next call gets
// them as new pages and faults on every one: some 12,500 faults a call for
// a ResNet-50 in bfloat16 at batch 16, a tenth of its time. While a forward
// runs (enter() .. exit(), possibly nested or on several threads), this
// allocator serves the process's CPU tensors instead of aten's default one:
// blocks of at least kCachedBytes go back into a free list when freed and
// are handed out again for the same size, so a repeated forward runs on the
// pages the previous one touched. A cached block no allocation took during
// a whole forward is returned to the system when that forward ends, and
// release() returns them all.
//
// Outside a forward, empty_from_activation_memory takes its blocks from the
// same cache: a training step's BatchNorm and weight gradients, allocated at
// every step, freed by autograd some layers later and large enough for glibc
// to hand back to the system, faulted on every page (some 1.3 us a page on a
// 2-core Zen 4: 4 ms of the 4.3 ms of a 256-channel 28x28 BatchNorm backward
// at batch 8). A block freed outside any forward is kept while the blocks
// kept stay under kMaxKeptOutsideForward, so a step that changes its sizes
// cannot grow the cache without bound; an inference forward's end frees the
// blocks that it did not take, as for its own.
//
// aten's oneDNN glue (ideep) allocates and frees through whichever allocator
// is installed at the time, so a block may be allocated by one and freed by
// the other. Both ways stay sound: every block here is one of aten's own
// (c10::alloc_cpu), which aten's allocator frees; and the blocks handed out
// are known by address, so a block from aten's allocator freed here goes
// back to it. A block of ours freed by aten leaves a stale address behind:
// if glibc gives that address to a later allocation freed here, it is kept
// only when glibc vouches it holds the size recorded (malloc_usable_size).
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpu_ops.h"

namespace resnet_fast::cpu {

namespace {

// Below this, glibc serves and keeps memory well by itself (its default mmap threshold is 128 KiB).
constexpr size_t kCachedBytes = size_t{128} << 10;
// The most bytes kept for blocks freed outside a forward (the top of the file).
constexpr size_t kMaxKeptOutsideForward = size_t{1} << 30;
// aten's alignment of CPU tensor data (c10::alloc_cpu's).
constexpr uintptr_t kAlignment = 64;

class ActivationMemory final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* data = n >= kCachedBytes ? take(n) : c10::alloc_cpu(n);
    return {data, data, &release_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enter() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_++ > 0) return;
    ++epoch_;
#if defined(__GLIBC__)  // elsewhere no malloc_usable_size tells a stale address apart (top of the file)
    previous_ = c10::GetAllocator(c10::DeviceType::CPU);
    // Priority 0, aten's own: an allocator someone installed with a higher
    // priority stays, and this forward simply runs without the cache.
    if (previous_ != this) c10::SetAllocator(c10::DeviceType::CPU, this, 0);
#endif
  }

  bool exit() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_ == 0) return false;
    if (--depth_ > 0) return true;
    if (c10::GetAllocator(c10::DeviceType::CPU) == this && previous_ != this)
      c10::SetAllocator(c10::DeviceType::CPU, previous_, 0);
    release_older_than(epoch_);
    return true;
  }

  size_t release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    return release_older_than(UINT64_MAX);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

 private:
  struct Cached {
    void* data;
    uint64_t epoch;  // the forward it was freed in (or after)
  };

  // A block of n bytes, cached or new, known by its address until freed.
  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    void* data = nullptr;
    auto found = free_.find(n);
    if (found != free_.end() && !found->second.empty()) {
      data = found->second.back().data;
      found->second.pop_back();
      cached_bytes_ -= n;
    } else {
      data = c10::alloc_cpu(n);
    }
    handed_out_[data] = n;
    return data;
  }

  // Back into the cache if it is a block of ours (see the top of the file);
  // false for any other, which the caller frees.
  bool keep(void* data) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = handed_out_.find(data);
    if (found == handed_out_.end()) return false;
    const size_t n = found->second;
    handed_out_.erase(found);
#if defined(__GLIBC__)
    if (reinterpret_cast<uintptr_t>(data) % kAlignment != 0 || malloc_usable_size(data) < n) return false;
#else
    return false;
#endif
    if (depth_ == 0 && cached_bytes_ + n > kMaxKeptOutsideForward) return false;
    free_[n].push_back({data, epoch_});
    cached_bytes_ += n;
    return true;
  }

  // Frees the cached blocks last used before `epoch`; returns their bytes.
  size_t release_older_than(uint64_t epoch) {
    size_t released = 0;
    for (auto it = free_.begin(); it != free_.end();) {
      auto& blocks = it->second;
      size_t kept = 0;
      for (const Cached& block : blocks) {
        if (block.epoch < epoch) {
          c10::free_cpu(block.data);
          released += it->first;
        } else {
          blocks[kept++] = block;
        }
      }
      blocks.resize(kept);
      it = blocks.empty() ? free_.erase(it) : std::next(it);
    }
    cached_bytes_ -= released;
    return released;
  }

  static void release_block(void* data);

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Cached>> free_;  // by size
  std::unordered_map<void*, size_t> handed_out_;          // the blocks of at least kCachedBytes in use
  size_t cached_bytes_ = 0;
  uint64_t epoch_ = 0;
  int depth_ = 0;
  c10::Allocator* previous_ = nullptr;
};

// Never destroyed: tensors it served may be freed during the process's exit.
ActivationMemory& activation_memory() {
  static ActivationMemory* memory = new ActivationMemory();
  return *memory;
}

void ActivationMemory::release_block(void* data) {
  if (data != nullptr && !activation_memory().keep(data)) c10::free_cpu(data);
}

}  // namespace

void enter_activation_memory() { activation_memory().enter(); }
bool exit_activation_memory() { return activation_memory().exit(); }
size_t release_activation_memory() { return activation_memory().release_all(); }
size_t cached_activation_memory() { return activation_memory().cached_bytes(); }

at::Tensor empty_from_activation_memory(at::IntArrayRef sizes, const at::TensorOptions& options,
                                        at::MemoryFormat memory_format) {
  TORCH_CHECK(options.device().is_cpu(), "resnet_fast: empty_from_activation_memory makes CPU tensors");
#if defined(__GLIBC__)  // elsewhere no block is ever kept (keep)
  return at::detail::empty_generic(sizes, &activation_memory(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), memory_format);
#else
  return at::empty(sizes, options.memory_format(memory_format));
#endif
}

}  // namespace resnet_fast::cpu
