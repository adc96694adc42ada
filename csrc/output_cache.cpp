// The cache of output blocks described in output_cache.h.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace piumr {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 16;
// Sizes are rounded up to this granule, so outputs that differ a little (a last, smaller
// batch) share blocks.
constexpr size_t kGranule = size_t{1} << 16;
// Each block starts with its size; the data after it keeps c10's 64-byte alignment.
constexpr size_t kHeader = 64;
constexpr int64_t kDefaultLimitMb = 256;

// The cap in bytes, read on every use (a getenv) so a process can change it at run time;
// nullopt when the variable is malformed.
std::optional<int64_t> parse_limit() {
  const char* text = std::getenv("PIUMR_KERNELS_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMb << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || mb < 0) return std::nullopt;
  return static_cast<int64_t>(mb) << 20;
}

// Allocation raises on a malformed value; a deleter must not throw, so it keeps nothing.
int64_t limit_bytes() {
  const auto limit = parse_limit();
  TORCH_CHECK(limit.has_value(), "PIUMR_KERNELS_CPU_CACHE_MB must be a non-negative integer (MiB), got '",
              std::getenv("PIUMR_KERNELS_CPU_CACHE_MB"), "'");
  return *limit;
}

class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& instance() {
    // Never destroyed: tensors may be freed after static destructors have run.
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    const size_t block = (nbytes + kGranule - 1) / kGranule * kGranule;
    void* base = nullptr;
    size_t allocated = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(block);
      if (it != free_.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        cached_ -= block;
      }
      allocated_ += block;
      allocated = allocated_;
      reserved = allocated_ + cached_;
    }
    if (base == nullptr) base = c10::alloc_cpu(block + kHeader);
    *static_cast<size_t*>(base) = block;
    void* data = static_cast<char*>(base) + kHeader;
    report(data, static_cast<int64_t>(block), allocated, reserved);
    return {data, data, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &OutputCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t clear() {
    std::unordered_map<size_t, std::vector<void*>> blocks;
    int64_t released = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      released = static_cast<int64_t>(cached_);
      cached_ = 0;
    }
    for (auto& entry : blocks) {
      for (void* base : entry.second) c10::free_cpu(base);
    }
    return released;
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

 private:
  static void release(void* data) { instance().give_back(data); }

  void give_back(void* data) {
    void* base = static_cast<char*>(data) - kHeader;
    const size_t block = *static_cast<size_t*>(base);
    const int64_t limit = parse_limit().value_or(0);
    bool keep = false;
    size_t allocated = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      allocated_ -= block;
      keep = static_cast<int64_t>(cached_ + block) <= limit;
      if (keep) {
        free_[block].push_back(base);
        cached_ += block;
      }
      allocated = allocated_;
      reserved = allocated_ + cached_;
    }
    report(data, -static_cast<int64_t>(block), allocated, reserved);
    if (!keep) c10::free_cpu(base);
  }

  static void report(void* data, int64_t delta, size_t allocated, size_t reserved) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(data, delta, allocated, reserved, c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;     // bytes in free_
  size_t allocated_ = 0;  // bytes of live tensors from this cache
};

int64_t release_cpu_cache() { return release_output_cache(); }
int64_t cpu_cache_bytes() { return cached_output_bytes(); }

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes < kMinCachedBytes || limit_bytes() == 0 || !options.device().is_cpu()) {
    return at::empty(sizes, options);
  }
  at::Tensor out = at::detail::empty_generic(sizes, &OutputCache::instance(),
                                             c10::DispatchKeySet(c10::DispatchKey::CPU),
                                             c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
  // Honour torch's "fill uninitialized memory" (NaN for floats), as at::empty does: the
  // tests rely on it to see any element a kernel leaves unwritten.
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory()) {
    at::native::fill_empty_deterministic_(out);
  }
  return out;
}

at::Tensor empty_output_like(const at::Tensor& t) {
  return t.is_contiguous() ? empty_output(t.sizes(), t.options()) : at::empty_like(t);
}

int64_t release_output_cache() { return OutputCache::instance().clear(); }

int64_t cached_output_bytes() { return OutputCache::instance().cached_bytes(); }

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def("release_cpu_cache() -> int", &release_cpu_cache);
  m.def("cpu_cache_bytes() -> int", &cpu_cache_bytes);
}

}  // namespace piumr
