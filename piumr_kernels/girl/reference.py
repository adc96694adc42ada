"""GIRL loss in plain PyTorch: the ground truth for tests and the eager benchmark baseline.

Each group's cosine matrix is materialized (`|I_g| x |I_g|`), which is what the fused
backends avoid. Autograd through this code defines the gradient every backend must match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 math for float16/bfloat16/float32 features, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_anchor_losses(
    features: torch.Tensor, labels: torch.Tensor, tau: float, eta: float, detach_weights: bool
) -> torch.Tensor:
    """`l_i` for every member of one group (SPEC §3), features `(n, C)` already normalized.

    The emphasis normalization `w_ij = (n - 1) r_ij / sum_k r_ik` is written as
    `(n - 1) * softmax_k(log r_ik)`: the same numbers, but no 0/0 when every `r_ik`
    underflows (small `eta`).
    """
    n = features.shape[0]
    cosine = features @ features.T
    logits = cosine / tau
    self_pair = torch.eye(n, dtype=torch.bool, device=features.device)
    log_emphasis = -0.5 * ((cosine - eta) / eta) ** 2
    weights = (n - 1) * torch.softmax(log_emphasis.masked_fill(self_pair, float("-inf")), dim=1)
    if detach_weights:
        weights = weights.detach()
    lse = torch.logsumexp(logits.masked_fill(self_pair, float("-inf")), dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_pair
    num_positive = positive.sum(dim=1).clamp_min(1)
    weighted_log_prob = torch.where(positive, weights * (logits - lse), 0.0)
    return -weighted_log_prob.sum(dim=1) / num_positive


def combine_group_risks(
    group_risks: torch.Tensor, lambda_var: float, var_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss = mean_g L_g + lambda_var * Var_g(L_g)` (population variance) and the variance.

    `var_grad=False` computes the variance on detached risks (the paper's
    `Var(stopgrad(L_g))`), so it is reported and added but carries no gradient.
    """
    mean_risk = group_risks.mean()
    spread = group_risks if var_grad else group_risks.detach()
    risk_var = ((spread - spread.mean()) ** 2).mean()
    return mean_risk + lambda_var * risk_var, risk_var


def girl_loss_reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    sizes: list[int],
    tau: float = 0.07,
    eta: float = 0.2,
    lambda_var: float = 1.0,
    var_grad: bool = True,
    detach_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §3 for a given partition: group `g` is the samples `order[o_g : o_g + sizes[g]]`
    (`o_g = sum(sizes[:g])`). Group sizes are Python ints, so `torch.compile` sees static
    shapes. Returns `(loss, group_risks, risk_var)`; the loss has the features' dtype."""
    normalized = F.normalize(features.to(compute_dtype(features.dtype)), dim=1, eps=NORM_EPS)
    risks = []
    for members in torch.split(order, sizes):
        anchor_losses = group_anchor_losses(normalized[members], labels[members], tau, eta, detach_weights)
        risks.append(anchor_losses.mean())
    group_risks = torch.stack(risks)
    loss, risk_var = combine_group_risks(group_risks, lambda_var, var_grad)
    return loss.to(features.dtype), group_risks, risk_var
