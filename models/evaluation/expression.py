"""The metrics dynamic facial expression recognition reports (DFEW, FERV39k; HDF and M3DFEL
alike): WAR, the weighted average recall (plain top-1 accuracy), and UAR, the unweighted
average recall (the mean over the classes present in the labels of each class's recall,
as scikit-learn's `balanced_accuracy_score`)."""

from __future__ import annotations

import torch

__all__ = ["expression_metrics"]


def expression_metrics(scores, labels, num_classes: int) -> dict:
    """`scores` `(N, num_classes)`, `labels` `(N,)` -> `{"war", "uar", "confusion"}`; the
    prediction is the argmax (ties to the lower class), `confusion[true, predicted]` counts
    `(num_classes, num_classes)`."""
    scores = torch.as_tensor(scores).float()
    labels = torch.as_tensor(labels).long()
    if scores.ndim != 2 or scores.shape[1] != num_classes or labels.shape != scores.shape[:1]:
        raise ValueError(
            f"scores, labels: expected (N, {num_classes}) and (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("labels: expected at least one clip, got none")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels: expected classes in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    predicted = scores.argmax(dim=1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, -1)
    present = confusion.sum(dim=1) > 0
    recall = confusion.diagonal()[present].double() / confusion.sum(dim=1)[present]
    return {"war": float((predicted == labels).double().mean()), "uar": float(recall.mean()), "confusion": confusion}
