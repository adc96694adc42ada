"""Whether GIRL acts on a batch: GIRL's per-anchor term is zero for an anchor without a
same-class partner in its group, so with many classes and small groups the loss can be
near zero whatever the features are. These numbers, logged per epoch, show it."""

import torch


@torch.no_grad()
def girl_group_diagnostics(labels: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> dict:
    """For one batch partitioned into GIRL groups (`group_index` (B,) in `[0, num_groups)`,
    as `girl_loss(..., return_details=True)` reports it): `positive_fraction`, the fraction of
    anchors with at least one same-class partner in their group, and `group_size`, the mean
    size of the groups GIRL counts (those with >= 2 members; 0 when there is none). Both are
    0-d float32 tensors on the labels' device, computed without a host read."""
    if labels.shape != group_index.shape or labels.dim() != 1:
        raise ValueError(
            f"labels and group_index: expected two (B,) tensors, got shapes {tuple(labels.shape)} "
            f"and {tuple(group_index.shape)}"
        )
    same_group = group_index[:, None] == group_index[None, :]
    same_group.fill_diagonal_(False)  # an anchor is not its own partner
    has_positive = (same_group & (labels[:, None] == labels[None, :])).any(dim=1)
    # scatter_add rather than bincount: bincount on CUDA reads the largest id back to the host.
    sizes = torch.zeros(num_groups, dtype=torch.float32, device=labels.device).scatter_add_(
        0, group_index.long(), torch.ones_like(group_index, dtype=torch.float32)
    )
    counted = sizes >= 2
    return {
        "positive_fraction": has_positive.float().mean(),
        "group_size": (sizes * counted).sum() / counted.sum().clamp(min=1),
    }
