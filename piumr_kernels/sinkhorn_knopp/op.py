"""Public Sinkhorn–Knopp op: argument checks, backend dispatch, torch.library registration.

The fused backends (cpp, triton) are two torch.library ops each, forward and backward
(autograd for cpp is registered in C++, for triton here).
The forward returns `P` and, per matrix and iteration, what the backward needs to rebuild
every intermediate from `K` (SPEC §1), so autograd saves `K` plus O(n_iters * (N + M)):
- linear domain: the row scales `alpha_t = row_sum / (rowsum_t + eps)` (N per iteration)
  and column scales `beta_t` (M per iteration);
- log domain: the cumulative potentials `f_t` (N) and `g_t` (M), `L_t = K + f_t + g_t`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import backends
from .._registration import library_op, register_fakes, register_triton_ops
from .._checks import check_float_tensor, check_int, check_real
from .reference import sinkhorn_reference

CPP_FORWARD = "piumr_kernels::sinkhorn_cpp"
CPP_BACKWARD = "piumr_kernels::sinkhorn_cpp_backward"
TRITON_FORWARD = "piumr_kernels::sinkhorn_triton"
TRITON_BACKWARD = "piumr_kernels::sinkhorn_triton_backward"


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_cpp_forward(K, n_iters, eps, log_domain, row_sum, col_sum, save_stats):
    batch, n_rows, n_cols = K.shape
    dtype = stats_dtype(K.dtype)
    stat_batch = batch if save_stats else 0
    return (
        torch.empty_like(K),
        K.new_empty((n_iters, n_rows, stat_batch), dtype=dtype),
        K.new_empty((n_iters, n_cols, stat_batch), dtype=dtype),
    )


def cpp_saves_stats(K: torch.Tensor, n_iters: int, n_rows: int, n_cols: int) -> bool:
    """Whether the cpp forward stores the per-iteration vectors for its backward (`K` is
    `(..., n_rows, n_cols)`).

    Only when a gradient is coming and the vectors are at most 1.5 times the matrix
    (16x16 with 3 iterations: 96 values per 256 entries); beyond that the backward replays
    the forward, which for tiny matrices (4x4 with 20 iterations: 160 values per 16-entry
    matrix) is cheaper than the traffic. Measured on the cpp kernels: the replay costs
    about as much as the forward, storing the vectors a small fraction of it.
    """
    wanted = K.requires_grad and torch.is_grad_enabled()
    return wanted and 2 * n_iters * (n_rows + n_cols) <= 3 * n_rows * n_cols


def _fake_backward(grad_P, K, row_stats, col_stats, n_iters, eps, log_domain, row_sum, col_sum):
    return torch.empty_like(K)


def _register_autograd(forward_name: str, backward_name: str) -> None:
    backward_op = library_op(backward_name)

    def setup_context(ctx, inputs, output):
        K, n_iters, eps, log_domain, row_sum, col_sum = inputs
        _, row_stats, col_stats = output
        ctx.save_for_backward(K, row_stats, col_stats)
        ctx.params = (n_iters, eps, log_domain, row_sum, col_sum)
        ctx.mark_non_differentiable(row_stats, col_stats)

    def backward(ctx, grad_P, _grad_row_stats, _grad_col_stats):
        K, row_stats, col_stats = ctx.saved_tensors
        grad_K = backward_op(grad_P.contiguous(), K, row_stats, col_stats, *ctx.params)
        return grad_K, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


if backends.cpp_op_built("sinkhorn_cpp"):
    # Autograd for the cpp ops is registered in C++ (csrc/sinkhorn.cpp): no Python per call.
    # Its stats are batch-last, (n_iters, N, batch), so 16 matrices store them as one run.
    register_fakes({CPP_FORWARD: _fake_cpp_forward, CPP_BACKWARD: _fake_backward})
if backends.backend_available("triton"):
    from . import triton_kernels

    register_triton_ops(
        {TRITON_FORWARD: triton_kernels.sinkhorn_forward, TRITON_BACKWARD: triton_kernels.sinkhorn_backward}
    )
    _register_autograd(TRITON_FORWARD, TRITON_BACKWARD)


def _check_values(K: torch.Tensor, log_domain: bool) -> None:
    if log_domain:
        if torch.isnan(K).any() or (K == float("inf")).any():
            raise ValueError("K (log domain) must not contain NaN or +inf")
        masked = K == float("-inf")
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
    """
    check_float_tensor("K", K, min_dim=2)
    # The usual scalars (an int and floats in range) pass a quick test; anything else goes
    # through the generic checks, which normalize it or raise. They cost more than a tiny
    # problem's kernel.
    if not (type(n_iters) is int and n_iters >= 1 and type(eps) is float and eps >= 0.0
            and type(row_sum) is float and row_sum > 0.0):
        n_iters = check_int("n_iters", n_iters, 1)
        eps = check_real("eps", eps, minimum=0.0)
        row_sum = check_real("row_sum", row_sum, positive=True)
    # Indexed, not sliced: a sliced torch.Size is a new object, and this runs on every call.
    shape = K.shape
    n_rows, n_cols = shape[-2], shape[-1]
    if n_rows < 1 or n_cols < 1:
        raise ValueError(f"K must have N >= 1 rows and M >= 1 columns, got shape {tuple(K.shape)}")
    if col_sum is None:
        col_sum = row_sum * n_rows / n_cols
    if type(col_sum) is not float or not col_sum > 0.0:
        col_sum = check_real("col_sum", col_sum, positive=True)
    log_domain = bool(log_domain)
    if backends.validation_enabled(validate):
        _check_values(K, log_domain)

    backend = backends.resolve_backend(K, cpp_op="sinkhorn_cpp")
    if backend == "reference":
        return sinkhorn_reference(K, n_iters, eps, log_domain, row_sum, col_sum)
    if backend == "triton" and K.dtype == torch.float64:
        raise TypeError("K: the triton backend supports float16, bfloat16 and float32, got float64")
    if K.numel() == 0:
        return torch.empty_like(K)
    # A (batch, N, M) contiguous K goes in as it is: tiny problems feel every view op.
    matrices = K if K.dim() == 3 and K.is_contiguous() else K.reshape(-1, n_rows, n_cols).contiguous()
    if backend == "cpp":
        save_stats = cpp_saves_stats(K, n_iters, n_rows, n_cols)
        if torch.compiler.is_compiling():
            P, _, _ = torch.ops.piumr_kernels.sinkhorn_cpp(
                matrices, n_iters, eps, log_domain, row_sum, col_sum, save_stats
            )
        else:
            P = backends.extension().sinkhorn(matrices, n_iters, eps, log_domain, row_sum, col_sum, save_stats)
    else:
        P, _, _ = torch.ops.piumr_kernels.sinkhorn_triton(matrices, n_iters, eps, log_domain, row_sum, col_sum)
    return P if matrices is K else P.view(K.shape)


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
        self.n_iters = check_int("n_iters", n_iters, 1)
        self.eps = check_real("eps", eps, minimum=0.0)
        self.log_domain = bool(log_domain)
        self.row_sum = check_real("row_sum", row_sum, positive=True)
        self.col_sum = None if col_sum is None else check_real("col_sum", col_sum, positive=True)

    def forward(self, K: torch.Tensor) -> torch.Tensor:
        return sinkhorn(K, self.n_iters, self.eps, self.log_domain, self.row_sum, self.col_sum)

    def extra_repr(self) -> str:
        return (
            f"n_iters={self.n_iters}, eps={self.eps}, log_domain={self.log_domain}, "
            f"row_sum={self.row_sum}, col_sum={self.col_sum}"
        )
