"""The training objective's interface, shared by PIUmr's and HDF's losses (`PIUmrLoss`,
`DSMLoss`): cross-entropy on the logits plus a term on the pooled features, called the same
way by the training loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Objective(nn.Module):
    """`forward(logits, features, labels, groups=None, num_groups=None) -> (loss, parts)`.

    The cross-entropy of `logits` against `labels` (with the subclass' `label_smoothing`)
    goes to the subclass' `combine(ce, features, labels, groups, num_groups)`, which adds its
    feature term and returns `(loss, parts)`, the parts detached for logging. `groups` and
    `num_groups` say how GIRL splits the batch (see `PIUmrLoss`)."""

    label_smoothing: float

    def forward(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor | None = None,
        num_groups: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return self.combine(ce, features, labels, groups, num_groups)

    def combine(self, ce, features, labels, groups, num_groups) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError
