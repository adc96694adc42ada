"""The Triton kernel variants each op can launch, listed for the ahead-of-time GPU check.

Every op's `triton_kernels.py` exposes `aot_variants() -> list[KernelVariant]`: one entry
per (kernel, dtype, constexpr tier) the launchers can pick. `tools/triton_static_check.py`
compiles each for sm_80 and sm_90 without a GPU and fails on a compile error or a spill.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelVariant:
    name: str                     # e.g. "sinkhorn.forward.one_matrix[bf16,BLOCK=128]"
    kernel: object                # the @triton.jit function
    signature: dict[str, str]     # argument -> triton type ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
