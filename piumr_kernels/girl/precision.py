"""The precision of the Triton backend's fp32 products (a plain module global, so
torch.compile reads it while tracing).

"tf32" (default): fp32 features enter the cosine and gradient products on tensor cores as
TF32 (operands rounded to a 10-bit mantissa), accumulated in fp32. The loss is then within
1e-3 relative of the fp64 reference and the gradient within 5e-3 of its largest entry
(tests/test_girl.py checks both; measured 1.4e-5 and 6e-4 at B=40, C=72, tau=0.07). "ieee":
exact fp32 products on the FMA pipe (slower on a GPU), within 1e-5 of fp64 there. bf16/fp16
features enter the cosine products as they are (exact products, fp32 accumulation) in both
modes; their gradient products are fp32 at this precision. The reference and cpp backends
ignore the setting.
"""

from __future__ import annotations

TRITON_FP32_PRECISIONS = ("tf32", "ieee")
_precision = ["tf32"]


def set_triton_fp32_precision(precision: str) -> None:
    """Selects "tf32" (tensor cores) or "ieee" (exact fp32) for the Triton GIRL products."""
    if precision not in TRITON_FP32_PRECISIONS:
        raise ValueError(f"precision must be one of {TRITON_FP32_PRECISIONS}, got {precision!r}")
    _precision[0] = precision


def triton_fp32_precision() -> str:
    return _precision[0]
