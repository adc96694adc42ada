"""Triton kernels for Sinkhorn–Knopp (SPEC §1) and their launchers (wrapped as triton_op in op.py).

Every load is upcast to float32 at once (the interpreter mishandles bf16 arithmetic) and
scalar arguments are cast to float32 inside the kernels (Inductor passes float64).
Offsets are int64 so batches past 2**31 elements index correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _safe_scale(target, total, eps):
    denominator = total + eps
    nonzero = denominator > 0
    return tl.where(nonzero, target / tl.where(nonzero, denominator, 1.0), 0.0)


@triton.jit
def _forward_one_matrix_kernel(
    K_ptr, P_ptr, row_stats_ptr, col_stats_ptr,
    n_rows, n_cols, n_iters, eps, row_sum, col_sum,
    LOG_DOMAIN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    matrix = tl.program_id(0).to(tl.int64)
    eps = tl.cast(eps, tl.float32)
    row_sum = tl.cast(row_sum, tl.float32)
    col_sum = tl.cast(col_sum, tl.float32)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = matrix * n_rows * n_cols + rows[:, None] * n_cols + cols[None, :]
    row_stats = row_stats_ptr + matrix * n_iters * n_rows + rows
    col_stats = col_stats_ptr + matrix * n_iters * n_cols + cols
    if LOG_DOMAIN:
        x = tl.load(K_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
        log_row = tl.log(row_sum)
        log_col = tl.log(col_sum)
        f = tl.zeros((BLOCK_N,), dtype=tl.float32)
        g = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in range(n_iters):
            peak = tl.max(x, axis=1)
            peak = tl.where(peak == float("-inf"), 0.0, peak)
            lse = peak + tl.log(tl.sum(tl.exp(x - peak[:, None]), axis=1))
            step = tl.where(row_ok, log_row - lse, 0.0)
            x = x + step[:, None]
            f += step
            tl.store(row_stats + t * n_rows, f, mask=row_ok)
            peak = tl.max(x, axis=0)
            peak = tl.where(peak == float("-inf"), 0.0, peak)
            lse = peak + tl.log(tl.sum(tl.exp(x - peak[None, :]), axis=0))
            step = tl.where(col_ok, log_col - lse, 0.0)
            x = x + step[None, :]
            g += step
            tl.store(col_stats + t * n_cols, g, mask=col_ok)
        x = tl.exp(x)
    else:
        x = tl.load(K_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        for t in range(n_iters):
            alpha = _safe_scale(row_sum, tl.sum(x, axis=1), eps)
            x = x * alpha[:, None]
            tl.store(row_stats + t * n_rows, alpha, mask=row_ok)
            beta = _safe_scale(col_sum, tl.sum(x, axis=0), eps)
            x = x * beta[None, :]
            tl.store(col_stats + t * n_cols, beta, mask=col_ok)
    tl.store(P_ptr + offsets, x.to(P_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_one_matrix_kernel(
    grad_ptr, K_ptr, row_stats_ptr, col_stats_ptr, grad_K_ptr,
    n_rows, n_cols, n_iters, eps, row_sum, col_sum,
    LOG_DOMAIN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    matrix = tl.program_id(0).to(tl.int64)
    inv_row = 1.0 / tl.cast(row_sum, tl.float32)
    inv_col = 1.0 / tl.cast(col_sum, tl.float32)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = matrix * n_rows * n_cols + rows[:, None] * n_cols + cols[None, :]
    row_stats = row_stats_ptr + matrix * n_iters * n_rows + rows
    col_stats = col_stats_ptr + matrix * n_iters * n_cols + cols
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if LOG_DOMAIN:
        k = tl.load(K_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
        f = tl.load(row_stats + (n_iters - 1) * n_rows, mask=row_ok, other=0.0)
        g = tl.load(col_stats + (n_iters - 1) * n_cols, mask=col_ok, other=0.0)
        grad = grad * tl.exp(k + f[:, None] + g[None, :])
        for step in range(n_iters):
            t = n_iters - 1 - step
            f = tl.load(row_stats + t * n_rows, mask=row_ok, other=0.0)
            g = tl.load(col_stats + t * n_cols, mask=col_ok, other=0.0)
            softmax = tl.exp(k + f[:, None] + g[None, :])
            grad = grad - softmax * (tl.sum(grad, axis=0) * inv_col)[None, :]
            g = tl.load(col_stats + (t - 1) * n_cols, mask=col_ok & (t > 0), other=0.0)
            softmax = tl.exp(k + f[:, None] + g[None, :])
            grad = grad - softmax * (tl.sum(grad, axis=1) * inv_row)[:, None]
    else:
        k = tl.load(K_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        for step in range(n_iters):
            t = n_iters - 1 - step
            # Running products U_t = prod alpha_s, V_t = prod beta_s (s <= t), V_{t-1}.
            u = tl.full((BLOCK_N,), 1.0, tl.float32)
            v_prev = tl.full((BLOCK_M,), 1.0, tl.float32)
            for s in range(t):
                u *= tl.load(row_stats + s * n_rows, mask=row_ok, other=0.0)
                v_prev *= tl.load(col_stats + s * n_cols, mask=col_ok, other=0.0)
            alpha = tl.load(row_stats + t * n_rows, mask=row_ok, other=0.0)
            beta = tl.load(col_stats + t * n_cols, mask=col_ok, other=0.0)
            u *= alpha
            q = u[:, None] * k * (v_prev * beta)[None, :]
            grad = beta[None, :] * (grad - (tl.sum(grad * q, axis=0) * inv_col)[None, :])
            q = u[:, None] * k * v_prev[None, :]
            grad = alpha[:, None] * (grad - (tl.sum(grad * q, axis=1) * inv_row)[:, None])
    tl.store(grad_K_ptr + offsets, grad.to(grad_K_ptr.dtype.element_ty), mask=mask)


def _blocks(n_rows: int, n_cols: int) -> dict:
    return {"BLOCK_N": triton.next_power_of_2(n_rows), "BLOCK_M": triton.next_power_of_2(n_cols)}


def sinkhorn_forward(
    K: torch.Tensor, n_iters: int, eps: float, log_domain: bool, row_sum: float, col_sum: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_rows, n_cols = K.shape
    P = torch.empty_like(K)
    row_stats = K.new_empty((batch, n_iters, n_rows), dtype=torch.float32)
    col_stats = K.new_empty((batch, n_iters, n_cols), dtype=torch.float32)
    if batch:
        wrap_triton(_forward_one_matrix_kernel)[(batch,)](
            K, P, row_stats, col_stats, n_rows, n_cols, n_iters, eps, row_sum, col_sum,
            LOG_DOMAIN=log_domain, **_blocks(n_rows, n_cols),
        )
    return P, row_stats, col_stats


def sinkhorn_backward(
    grad_P: torch.Tensor, K: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
    n_iters: int, eps: float, log_domain: bool, row_sum: float, col_sum: float,
) -> torch.Tensor:
    batch, n_rows, n_cols = K.shape
    grad_K = torch.empty_like(K)
    if batch:
        wrap_triton(_backward_one_matrix_kernel)[(batch,)](
            grad_P, K, row_stats, col_stats, grad_K, n_rows, n_cols, n_iters, eps, row_sum, col_sum,
            LOG_DOMAIN=log_domain, **_blocks(n_rows, n_cols),
        )
    return grad_K
