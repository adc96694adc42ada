"""GIRL loss in plain PyTorch: the ground truth for tests and the eager benchmark baseline.

The partition is `(order, offsets)`: group `g` is the samples `order[offsets[g]:offsets[g+1]]`
(see op.py). The whole `B x B` cosine matrix is materialized and masked to the pairs inside
a group (what the fused backends avoid), so any partition runs without reading its sizes on
the host: no device synchronization, static shapes under torch.compile. Autograd through
this code defines the gradient every backend must match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fused_op import accumulation_dtype

NORM_EPS = 1e-12


def group_sizes(offsets: torch.Tensor) -> torch.Tensor:
    """`(G,)` members per group."""
    return offsets[1:] - offsets[:-1]


def uniform_offsets(batch: int, num_groups: int, device: torch.device) -> torch.Tensor:
    """`(G + 1,)` boundaries of `batch` positions cut into `num_groups` chunks of
    `torch.tensor_split` sizes: `g * base + min(g, extra)`, `(base, extra) = divmod(B, G)`."""
    base, extra = divmod(batch, num_groups)
    boundary = torch.arange(num_groups + 1, device=device)
    return boundary * base + boundary.clamp(max=extra)


def position_groups(offsets: torch.Tensor, batch: int) -> torch.Tensor:
    """`(B,)` group of each position of `order` (`output_size` keeps it free of host reads)."""
    groups = torch.arange(offsets.shape[0] - 1, device=offsets.device)
    return torch.repeat_interleave(groups, group_sizes(offsets), output_size=batch)


def masked_softmax_terms(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`values` with the entries outside `mask` at -inf, except in rows with no entry in
    `mask` (anchors without partners), which keep their finite values so that softmax and
    log-sum-exp stay finite; callers mask those rows' results away."""
    return values.masked_fill(~mask & mask.any(dim=1, keepdim=True), float("-inf"))


def girl_group_risks_reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    tau: float = 0.07,
    eta: float = 0.2,
    detach_weights: bool = True,
) -> torch.Tensor:
    """`(G,)` group risks `L_g` (SPEC §3) in the accumulation dtype; 0 for a group with
    fewer than 2 members (no partner pairs).

    The emphasis normalization `w_ij = (n - 1) r_ij / sum_k r_ik` is written as
    `(n - 1) * softmax_k(log r_ik)`: the same numbers, but no 0/0 when every `r_ik`
    underflows (small `eta`).
    """
    batch = features.shape[0]
    normalized = F.normalize(features.to(accumulation_dtype(features.dtype)), dim=1, eps=NORM_EPS)
    f = normalized.index_select(0, order)
    y = labels.index_select(0, order)
    group = position_groups(offsets, batch)
    sizes = group_sizes(offsets)
    partner = (group[:, None] == group[None, :]) & ~torch.eye(batch, dtype=torch.bool, device=f.device)
    cosine = f @ f.T
    logits = cosine / tau
    log_emphasis = -0.5 * ((cosine - eta) / eta) ** 2
    partners = (sizes.index_select(0, group) - 1).to(f.dtype)
    weights = partners[:, None] * torch.softmax(masked_softmax_terms(log_emphasis, partner), dim=1)
    if detach_weights:
        weights = weights.detach()
    lse = torch.logsumexp(masked_softmax_terms(logits, partner), dim=1, keepdim=True)
    positive = partner & (y[:, None] == y[None, :])
    num_positive = positive.sum(dim=1).clamp_min(1)
    anchor_losses = -torch.where(positive, weights * (logits - lse), 0.0).sum(dim=1) / num_positive
    # Positions are in group order, so each group's sum is a difference of prefix sums (an
    # anchor without partners has no positive: a left-out group's sum is 0). Not index_add:
    # inductor's CPU codegen fails on it into one group (torch 2.13), and
    # torch.compile(reference) is the benchmarks' baseline.
    prefix = F.pad(anchor_losses.cumsum(0), (1, 0))
    totals = prefix.index_select(0, offsets[1:]) - prefix.index_select(0, offsets[:-1])
    return totals / sizes.clamp_min(1).to(totals.dtype)


def combine_group_risks(
    group_risks: torch.Tensor, counted: torch.Tensor, lambda_var: float, var_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss = mean_g L_g + lambda_var * Var_g(L_g)` (population variance) over the groups
    where `counted` (those with >= 2 members), and the variance. With no such group both
    are 0, and so is the gradient.

    `var_grad=False` computes the variance on detached risks (the paper's
    `Var(stopgrad(L_g))`), so it is reported and added but carries no gradient.
    """
    weight = counted.to(group_risks.dtype)
    count = weight.sum().clamp_min(1)
    mean_risk = (weight * group_risks).sum() / count
    spread, spread_mean = (group_risks, mean_risk) if var_grad else (group_risks.detach(), mean_risk.detach())
    risk_var = (weight * (spread - spread_mean) ** 2).sum() / count
    return mean_risk + lambda_var * risk_var, risk_var


def girl_loss_reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    tau: float = 0.07,
    eta: float = 0.2,
    lambda_var: float = 1.0,
    var_grad: bool = True,
    detach_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §3 for a given partition `(order, offsets)` (`offsets`: `(G + 1,)` int64 on the
    features' device). Returns `(loss, group_risks, risk_var)`; the loss has the features'
    dtype."""
    group_risks = girl_group_risks_reference(features, labels, order, offsets, tau, eta, detach_weights)
    loss, risk_var = combine_group_risks(group_risks, group_sizes(offsets) >= 2, lambda_var, var_grad)
    return loss.to(features.dtype), group_risks, risk_var
