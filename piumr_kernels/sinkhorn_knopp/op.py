"""Public Sinkhorn–Knopp op (SPEC §1): checks, backend choice, one call of the fused op.

The fused backends (cpp, triton) share one forward and one backward library op schema
(see `piumr_kernels/fused_op.py`). The forward returns `P` and, when asked to, per matrix
and iteration what the backward needs to rebuild every intermediate from `K`, batch-last
`(n_iters, N, B)` / `(n_iters, M, B)` in the accumulation dtype:
- linear domain: the row scales `alpha_t = row_sum / (rowsum_t + eps)` and column scales `beta_t`;
- log domain: the cumulative potentials `f_t`, `g_t` (`L_t = K + f_t + g_t`).
Without them (`save_stats=False`: cpp, and triton's packed tier) the backward replays the forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import backends
from .._checks import FLOAT_DTYPES, check_flag, check_float_tensor, check_int, check_real
from ..fused_op import FusedOp, accumulation_dtype
from .reference import sinkhorn_reference


def _fake_forward(K, n_iters, eps, log_domain, row_sum, col_sum, save_stats):
    batch, n_rows, n_cols = K.shape
    dtype = accumulation_dtype(K.dtype)
    stat_batch = batch if save_stats else 0
    return (
        torch.empty_like(K),
        K.new_empty((n_iters, n_rows, stat_batch), dtype=dtype),
        K.new_empty((n_iters, n_cols, stat_batch), dtype=dtype),
    )


def _fake_backward(grad_P, K, row_stats, col_stats, n_iters, eps, log_domain, row_sum, col_sum):
    return torch.empty_like(K)


def _setup_context(ctx, inputs, output):
    K, n_iters, eps, log_domain, row_sum, col_sum, _ = inputs
    _, row_stats, col_stats = output
    ctx.save_for_backward(K, row_stats, col_stats)
    ctx.params = (n_iters, eps, log_domain, row_sum, col_sum)
    ctx.mark_non_differentiable(row_stats, col_stats)


def _backward(ctx, backward_op, grad_P, _grad_row_stats, _grad_col_stats):
    if grad_P is None:
        return None, None, None, None, None, None, None
    K, row_stats, col_stats = ctx.saved_tensors
    grad_K = backward_op(grad_P.contiguous(), K, row_stats, col_stats, *ctx.params)
    return grad_K, None, None, None, None, None, None


def _triton_launchers():
    from . import triton_kernels

    return triton_kernels.sinkhorn_forward, triton_kernels.sinkhorn_backward


SINKHORN = FusedOp("sinkhorn", _fake_forward, _fake_backward, _setup_context, _backward, _triton_launchers)
SINKHORN.register()


def saves_stats(backend: str, K: torch.Tensor, n_iters: int, n_rows: int, n_cols: int) -> bool:
    """Whether the forward stores the per-iteration vectors for its backward (`K` is
    `(..., n_rows, n_cols)`): only when a gradient is coming. The cpp backend then stores
    them only while they are at most 1.5 times the matrix (16x16 with 3 iterations: 96
    values per 256 entries) and otherwise replays the forward in the backward, which for
    tiny matrices (4x4 with 20 iterations: 160 values per 16-entry matrix) is cheaper than
    the traffic; the triton backend replays them in its packed tier up to 32 iterations
    (`triton_kernels.backward_reads_stats`) and stores them otherwise.
    """
    wanted = K.requires_grad and torch.is_grad_enabled()
    if backend == "triton":
        from .triton_kernels import backward_reads_stats

        return wanted and backward_reads_stats(n_rows, n_cols, n_iters)
    return wanted and 2 * n_iters * (n_rows + n_cols) <= 3 * n_rows * n_cols


# Far more than Sinkhorn needs to converge (tens to hundreds), and a huge count would run
# for hours or, on the cpp backend, overflow the size of its per-iteration scratch.
MAX_N_ITERS = 10_000
# dtype of K -> (smallest normal and largest accumulation value, largest value of K's
# dtype), looked up once: torch.finfo costs microseconds per call.
_LIMITS = {
    dtype: (
        torch.finfo(accumulation_dtype(dtype)).tiny,
        torch.finfo(accumulation_dtype(dtype)).max,
        torch.finfo(dtype).max,
    )
    for dtype in FLOAT_DTYPES
}


def _check_masses(K: torch.Tensor, eps: float, row_sum: float, col_sum: float) -> None:
    """Targets the math can hold: each between the smallest normal accumulation value and
    the largest value of `K.dtype` (`P`'s entries reach the targets), the totals
    `target * count` finite in the accumulation dtype, and a zero row's scale
    `target / eps` finite."""
    n_rows, n_cols = K.shape[-2:]
    tiny, largest, largest_entry = _LIMITS[K.dtype]
    for name, target, count in (("row_sum", row_sum, n_rows), ("col_sum", col_sum, n_cols)):
        if not tiny <= target <= largest_entry:
            raise ValueError(
                f"{name} must lie in [{tiny:.3g}, {largest_entry:.3g}] for K of dtype {K.dtype}, got {target}"
            )
        if target * count > largest:
            raise ValueError(
                f"{name}: the total mass {name} * {count} = {target * count:.3g} exceeds the largest "
                f"accumulation value {largest:.3g}"
            )
        if eps > largest or (eps > 0 and target > eps * largest):
            raise ValueError(
                f"eps must be 0 or in [{name} / {largest:.3g}, {largest:.3g}] = "
                f"[{target / largest:.3g}, {largest:.3g}] (a zero row's scale {name} / eps must be "
                f"finite in the accumulation dtype), got {eps}"
            )


def _check_values(K: torch.Tensor, log_domain: bool) -> None:
    if log_domain:
        if torch.isnan(K).any() or (float("inf") == K).any():
            raise ValueError("K (log domain) must not contain NaN or +inf")
        masked = float("-inf") == K
        if masked.all(dim=-1).any() or masked.all(dim=-2).any():
            raise ValueError("K (log domain) must not have a whole row or column of -inf")
    elif not torch.isfinite(K).all() or (K < 0).any():
        raise ValueError("K (linear domain) must be finite and non-negative")


def sinkhorn(
    K: torch.Tensor,
    n_iters: int = 3,
    eps: float = 1e-8,
    log_domain: bool = False,
    row_sum: float = 1.0,
    col_sum: float | None = None,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    """Batched Sinkhorn–Knopp normalization of `K` (`(..., N, M)`), SPEC §1.

    Each of the `n_iters` iterations rescales the rows to sum to `row_sum`, then the
    columns to sum to `col_sum` (default `row_sum * N / M`, the same total mass), so the
    columns are exact at the end. Linear domain (default): `K` is a non-negative kernel
    and the scale is `target / (sum + eps)`; a zero row or column stays zero. Log domain:
    `K` holds log-kernel values (`-inf` masks an entry) and the steps use `logsumexp`;
    the result is `exp(L)`. Gradients are those of the unrolled computation.

    `validate=True` (or `PIUMR_KERNELS_VALIDATE=1`) also checks the values (non-negative
    in linear domain, no all `-inf` row or column in log domain), which costs one pass.
    Float32 math for float16/bfloat16/float32 inputs; float64 stays float64 (reference
    and cpp backends).

    Accepted ranges (else a `ValueError` naming the argument): `1 <= n_iters <= 10000`
    (`MAX_N_ITERS`); `eps` 0 or between `row_sum / (largest accumulation value)` and that
    largest value; `row_sum`, `col_sum` between the smallest normal accumulation value and
    the largest value of `K.dtype` (so `P` is representable), with `row_sum * N` and
    `col_sum * M` finite in the accumulation dtype. Entries of `K` whose row or column
    sums overflow the accumulation dtype (float32: 3.4e38) give non-finite results. Through
    a zero row or column the exact gradient grows like `(row_sum / eps) ** n_iters` when
    `eps > 0` (float32 overflows at 5 iterations with the default eps); every backend then
    gives non-finite gradient entries in that row or column, and where the unrolled
    reference spreads them further (later iterations, inf * 0), the fused backends give
    non-finite entries at most where the reference does (triton's streaming tier, past
    64x64, overflows the zero row's entries a little before the reference does).
    """
    check_float_tensor("K", K, min_dim=2)
    n_iters = check_int("n_iters", n_iters, 1, MAX_N_ITERS)
    eps = check_real("eps", eps, minimum=0.0)
    row_sum = check_real("row_sum", row_sum, positive=True)
    n_rows, n_cols = K.shape[-2:]
    if n_rows < 1 or n_cols < 1:
        raise ValueError(f"K must have N >= 1 rows and M >= 1 columns, got shape {tuple(K.shape)}")
    col_sum = row_sum * n_rows / n_cols if col_sum is None else check_real("col_sum", col_sum, positive=True)
    _check_masses(K, eps, row_sum, col_sum)
    log_domain = check_flag("log_domain", log_domain)
    if validate is not None:
        validate = check_flag("validate", validate)
    if backends.validation_enabled(validate):
        _check_values(K, log_domain)

    backend = backends.resolve_backend(K, cpp_op="sinkhorn_cpp")
    if backend == "reference":
        return sinkhorn_reference(K, n_iters, eps, log_domain, row_sum, col_sum)
    if backend == "triton" and K.dtype == torch.float64:
        raise TypeError("K: the triton backend supports float16, bfloat16 and float32, got float64")
    matrices = K.reshape(-1, n_rows, n_cols).contiguous()
    save_stats = saves_stats(backend, K, n_iters, n_rows, n_cols)
    P, _, _ = SINKHORN(backend, matrices, n_iters, eps, log_domain, row_sum, col_sum, save_stats)
    return P.view(K.shape)


class SinkhornKernel(nn.Module):
    """`nn.Module` form of :func:`sinkhorn`; a drop-in normalizer for attention/transport kernels."""

    def __init__(
        self,
        n_iters: int = 3,
        eps: float = 1e-8,
        log_domain: bool = False,
        row_sum: float = 1.0,
        col_sum: float | None = None,
    ) -> None:
        super().__init__()
        self.n_iters = check_int("n_iters", n_iters, 1, MAX_N_ITERS)
        self.eps = check_real("eps", eps, minimum=0.0)
        self.log_domain = check_flag("log_domain", log_domain)
        self.row_sum = check_real("row_sum", row_sum, positive=True)
        self.col_sum = None if col_sum is None else check_real("col_sum", col_sum, positive=True)

    def forward(self, K: torch.Tensor) -> torch.Tensor:
        return sinkhorn(K, self.n_iters, self.eps, self.log_domain, self.row_sum, self.col_sum)

    def extra_repr(self) -> str:
        return (
            f"n_iters={self.n_iters}, eps={self.eps}, log_domain={self.log_domain}, "
            f"row_sum={self.row_sum}, col_sum={self.col_sum}"
        )
