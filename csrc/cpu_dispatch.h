// Run-time CPU-feature dispatch shared by every kernel in csrc/.
//
// A kernel is a struct with `static PIUMR_ALWAYS_INLINE void run(const Args&)`. The body is
// inlined into one wrapper per instruction set (AVX-512, AVX2+FMA, the baseline), so the
// compiler vectorizes the same source three times; `run_for_this_cpu` picks the widest the
// processor has. PIUMR_KERNELS_CPU_ISA=baseline|avx2|avx512 caps the choice (tests use it
// to check every variant), and `selected_isa_name()` reports it for piumr_kernels.info().
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define PIUMR_ALWAYS_INLINE inline __attribute__((always_inline))
#define PIUMR_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define PIUMR_ALWAYS_INLINE inline
#define PIUMR_ALWAYS_INLINE_LAMBDA
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PIUMR_X86_DISPATCH 1
#endif

namespace piumr {

// 64-byte vectors (GCC/Clang vector extensions) of float or double: one register per
// vector in the AVX-512 variant, two or four in the narrower ones.
template <typename T>
struct Vec64;
template <>
struct Vec64<float> {
  using type = float __attribute__((vector_size(64)));
};
template <>
struct Vec64<double> {
  using type = double __attribute__((vector_size(64)));
};

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa detected_isa() {
#if defined(PIUMR_X86_DISPATCH)
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      return CpuIsa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return CpuIsa::kAvx2;
    }
    return CpuIsa::kBaseline;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

// The detected ISA, lowered by PIUMR_KERNELS_CPU_ISA (read on every call: cheap, and lets
// a test switch variants inside one process).
inline CpuIsa selected_isa() {
  CpuIsa isa = detected_isa();
  const char* cap = std::getenv("PIUMR_KERNELS_CPU_ISA");
  if (cap == nullptr) return isa;
  CpuIsa wanted = isa;
  if (std::strcmp(cap, "baseline") == 0) wanted = CpuIsa::kBaseline;
  if (std::strcmp(cap, "avx2") == 0) wanted = CpuIsa::kAvx2;
  return static_cast<int>(wanted) < static_cast<int>(isa) ? wanted : isa;
}

inline const char* selected_isa_name() {
  switch (selected_isa()) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

#if defined(PIUMR_X86_DISPATCH)
template <class Kernel, class Args>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void run_avx512(const Args& args) {
  Kernel::run(args);
}

template <class Kernel, class Args>
__attribute__((target("avx2,fma"))) void run_avx2(const Args& args) {
  Kernel::run(args);
}
#endif

template <class Kernel, class Args>
void run_for_isa(CpuIsa isa, const Args& args) {
#if defined(PIUMR_X86_DISPATCH)
  switch (isa) {
    case CpuIsa::kAvx512:
      return run_avx512<Kernel>(args);
    case CpuIsa::kAvx2:
      return run_avx2<Kernel>(args);
    default:
      break;
  }
#endif
  Kernel::run(args);
}

// One kernel call on the selected ISA. A kernel called once per small block takes
// selected_isa() once per op instead (run_for_isa): getenv scans the whole environment.
template <class Kernel, class Args>
void run_for_this_cpu(const Args& args) {
  run_for_isa<Kernel>(selected_isa(), args);
}

}  // namespace piumr
