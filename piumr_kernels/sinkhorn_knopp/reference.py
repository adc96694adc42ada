"""Sinkhorn–Knopp in plain PyTorch: the ground truth for tests and the eager benchmark baseline.

Autograd through this unrolled loop defines the gradient every fused backend must match.
"""

from __future__ import annotations

import math

import torch

from ..fused_op import accumulation_dtype


def _safe_scale(target: float, total: torch.Tensor, eps: float) -> torch.Tensor:
    """`target / (total + eps)`, but 0 where the denominator is 0 (a zero row stays zero, no NaN).

    The denominator is replaced before dividing so the unused branch never makes inf,
    whose gradient through `torch.where` would be NaN.
    """
    denominator = total + eps
    nonzero = denominator > 0
    return torch.where(nonzero, target / torch.where(nonzero, denominator, 1.0), 0.0)


def sinkhorn_reference(
    K: torch.Tensor,
    n_iters: int = 3,
    eps: float = 1e-8,
    log_domain: bool = False,
    row_sum: float = 1.0,
    col_sum: float | None = None,
) -> torch.Tensor:
    """SPEC §1: `n_iters` times a row step then a column step; float32 math below float64."""
    n_rows, n_cols = K.shape[-2], K.shape[-1]
    if col_sum is None:
        col_sum = row_sum * n_rows / n_cols
    P = K.to(accumulation_dtype(K.dtype))
    if log_domain:
        log_row, log_col = math.log(row_sum), math.log(col_sum)
        for _ in range(n_iters):
            P = P - torch.logsumexp(P, dim=-1, keepdim=True) + log_row
            P = P - torch.logsumexp(P, dim=-2, keepdim=True) + log_col
        P = torch.exp(P)
    else:
        for _ in range(n_iters):
            P = P * _safe_scale(row_sum, P.sum(dim=-1, keepdim=True), eps)
            P = P * _safe_scale(col_sum, P.sum(dim=-2, keepdim=True), eps)
    return P.to(K.dtype)
