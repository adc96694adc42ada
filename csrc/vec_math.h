// Element-wise math that GCC/Clang vectorize inside `omp simd` loops, shared by the kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu_dispatch.h"

namespace piumr {

// Value-semantics min/max for the simd loops: std::max takes references, and under
// `omp simd` the referenced temporaries become per-lane arrays that block vectorization.
template <typename T>
PIUMR_ALWAYS_INLINE T max_of(T a, T b) {
  return a > b ? a : b;
}
template <typename T>
PIUMR_ALWAYS_INLINE T min_of(T a, T b) {
  return a < b ? a : b;
}

// exp for float that the compiler vectorizes (std::exp is a scalar libm call): 2^k * p(r),
// |r| <= ln2 / 2, degree-7 Taylor (within 1.2 ulp). Below -87 (results under the
// smallest normal float) it returns 0, so a masked -inf gives exactly 0; NaN stays NaN;
// above 88 it returns exp(88) ~ 1.7e38: callers exponentiate normalized log values, which
// stay far below. Double keeps std::exp (the gradcheck path).
template <typename acc_t>
PIUMR_ALWAYS_INLINE acc_t vexp(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const float c = min_of(max_of(x, -87.0f), 88.0f);
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float t = c * 1.44269504088896341f + shifter;
    const float k = t - shifter;
    const int32_t ki = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, shifter);
    const float r = (c - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const float e = p * __builtin_bit_cast(float, (ki + 127) << 23);
    return x < -87.0f ? 0.0f : (x == x ? e : x);
  } else {
    return std::exp(x);
  }
}

// log for float that the compiler vectorizes: x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) by the Cephes logf polynomial in m - 1 (about 1 ulp). Subnormals are scaled up
// first; 0 gives -inf, +inf gives +inf, negatives and NaN give NaN. Double keeps std::log.
template <typename acc_t>
PIUMR_ALWAYS_INLINE acc_t vlog(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const float kInf = __builtin_inff();
    const bool subnormal = x < 1.17549435e-38f;
    const float scaled = subnormal ? x * 8388608.0f : x;  // 2^23
    const int32_t bits = __builtin_bit_cast(int32_t, scaled);
    float e = static_cast<float>(((bits >> 23) & 0xff) - 126 - (subnormal ? 23 : 0));
    float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f000000);  // [1/2, 1)
    const bool low = m < 0.707106781186547524f;
    e = low ? e - 1.0f : e;
    const float f = low ? m + m - 1.0f : m - 1.0f;
    const float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    const float result = (f + y) + 0.693359375f * e;
    const float special = x == 0.0f ? -kInf : (x == kInf ? kInf : __builtin_nanf(""));
    return x > 0.0f && x < kInf ? result : special;
  } else {
    return std::log(x);
  }
}

}  // namespace piumr
