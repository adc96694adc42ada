// The dtype every op computes in: float64 stays float64, everything else (float16,
// bfloat16, float32) is accumulated in float32. piumr_kernels.fused_op.accumulation_dtype
// is the same rule in Python; the ops' fake implementations rely on the two agreeing.
#pragma once

#include <c10/core/ScalarType.h>

namespace piumr {

inline at::ScalarType accumulation_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace piumr
