// Output tensors of the cpp kernels from a cache of freed blocks (csrc/output_cache.cpp).
//
// glibc hands large freed blocks back to the OS (munmap, or trimming the top of the heap),
// so a fresh multi-megabyte output is page-faulted in again on every call: at 32x128x128
// Sinkhorn that is ~40% of a forward+backward. Like PyTorch's CUDA caching allocator, the
// blocks of outputs of at least 64 KiB are kept when their tensor dies and reused for the
// next output of the same size class, so repeated calls write to warm pages.
// PIUMR_KERNELS_CPU_CACHE_MB caps the bytes kept free (default 256; 0 turns the cache
// off); release_output_cache() frees them. Allocations are reported to the profiler.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace piumr {

// A contiguous uninitialized tensor like at::empty, from the cache when it is large enough.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// empty_output with t's sizes and options when t is contiguous, else at::empty_like(t).
at::Tensor empty_output_like(const at::Tensor& t);

// Frees every cached block; returns the bytes released.
int64_t release_output_cache();

// Bytes currently kept free in the cache.
int64_t cached_output_bytes();

}  // namespace piumr
