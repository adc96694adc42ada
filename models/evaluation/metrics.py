"""MA-52 metrics, as the official challenge evaluation (`lv_evaluate`) computes them (SPEC §6).

- The action prediction is the argmax over the 52 action scores; the body prediction is
  the body of the predicted action (never a separate body head).
- F1 macro and micro, at action and at body level, with scikit-learn's `f1_score` and its
  default label set (the classes present in the labels or the predictions, as the
  official script does). A class that occurs but is never predicted scores F1 = 0 and
  pulls the macro average down; a class absent from both does not count.
- `f1_mean = (action macro + action micro + body macro + body micro) / 4`.
- Top-k accuracy: action top-k is "the label is among the k highest scores"; body top-k
  (our choice, the official script reports no body top-5) is "the true body is the body
  of one of the k highest-scoring actions", which is what the `body_pred_1..5` columns of
  the submission file state.
- Ties between equal scores go to the lower action id, like `argmax`.
All values are fractions in [0, 1] (multiply by 100 for the paper's percentages).
"""

from __future__ import annotations

import csv
import os

import numpy as np
import torch
from sklearn.metrics import f1_score

from models.data.labels import NUM_ACTIONS, body_of_action

__all__ = ["body_of_action", "top_k_actions", "compute_metrics", "write_prediction_csv"]

SUBMISSION_TOP_K = 5


def _as_scores(action_scores) -> torch.Tensor:
    scores = torch.as_tensor(action_scores).detach().cpu()
    if scores.dim() != 2 or scores.shape[1] != NUM_ACTIONS:
        raise ValueError(f"action_scores: expected shape (N, {NUM_ACTIONS}), got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"action_scores: expected a floating-point array, got dtype {scores.dtype}")
    if not torch.isfinite(scores).all():
        raise ValueError("action_scores: expected finite scores, got NaN or inf")
    return scores.float()


def top_k_actions(action_scores, k: int = SUBMISSION_TOP_K) -> torch.Tensor:
    """(N, k) int64 action ids, highest score first; ties go to the lower id."""
    scores = _as_scores(action_scores)
    if not 1 <= k <= NUM_ACTIONS:
        raise ValueError(f"k: expected 1 <= k <= {NUM_ACTIONS}, got {k}")
    # A stable descending sort keeps equal scores in id order, so column 0 equals argmax.
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def compute_metrics(action_scores, labels) -> dict[str, float]:
    """Official MA-52 metrics from `(N, 52)` action scores (logits or probabilities) and
    `(N,)` integer action labels. Returns action_top1, action_top5, body_top1, body_top5,
    action_f1_macro, action_f1_micro, body_f1_macro, body_f1_micro, f1_mean and
    num_samples (see the module docstring for the exact definitions)."""
    scores = _as_scores(action_scores)
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"labels: expected shape ({scores.shape[0]},) to match action_scores, got {tuple(labels.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("action_scores: expected at least one sample, got N = 0")
    labels = labels.long()

    top5 = top_k_actions(scores, SUBMISSION_TOP_K)
    body_labels = body_of_action(labels)
    body_top5 = body_of_action(top5)
    action_pred, body_pred = top5[:, 0].numpy(), body_top5[:, 0].numpy()
    action_true, body_true = labels.numpy(), body_labels.numpy()

    def f1(true, pred, average):
        return float(f1_score(true, pred, average=average, zero_division=0))

    result = {
        "action_top1": float((top5[:, 0] == labels).double().mean()),
        "action_top5": float((top5 == labels[:, None]).any(dim=1).double().mean()),
        "body_top1": float((body_top5[:, 0] == body_labels).double().mean()),
        "body_top5": float((body_top5 == body_labels[:, None]).any(dim=1).double().mean()),
        "action_f1_macro": f1(action_true, action_pred, "macro"),
        "action_f1_micro": f1(action_true, action_pred, "micro"),
        "body_f1_macro": f1(body_true, body_pred, "macro"),
        "body_f1_micro": f1(body_true, body_pred, "micro"),
    }
    result["f1_mean"] = float(
        np.mean([result[key] for key in ("action_f1_macro", "action_f1_micro", "body_f1_macro", "body_f1_micro")])
    )
    result["num_samples"] = int(scores.shape[0])
    return result


def write_prediction_csv(path, names, action_scores) -> None:
    """Write the challenge submission file: header
    `vid,action_pred_1,...,action_pred_5,body_pred_1,...,body_pred_5`, one row per video in
    the order given (use the test list's order), `vid` the list's file name (e.g.
    `test0000.mp4`), the 5 best actions and the body of each of them. Written to a
    temporary file and renamed, so a crash never leaves a half-written submission."""
    names = list(names)
    top5 = top_k_actions(action_scores, SUBMISSION_TOP_K)
    if len(names) != top5.shape[0]:
        raise ValueError(f"names: expected one name per score row ({top5.shape[0]}), got {len(names)}")
    bodies = body_of_action(top5)
    header = (
        ["vid"]
        + [f"action_pred_{i}" for i in range(1, SUBMISSION_TOP_K + 1)]
        + [f"body_pred_{i}" for i in range(1, SUBMISSION_TOP_K + 1)]
    )
    path = os.fspath(path)
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for name, actions, body in zip(names, top5.tolist(), bodies.tolist()):
            writer.writerow([name] + actions + body)
    os.replace(tmp_path, path)
