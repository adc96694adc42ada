"""Predictions of a model over a whole split, and the official metrics of them.

Every rank predicts its shard of the split (models.training.data_loading.ShardSampler: no
padding, no duplicates) and the predictions are gathered, so metrics are over the whole
split exactly once.
"""

import numbers

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.data import normalize_frames
from models.evaluation.expression import expression_metrics
from models.evaluation.metrics import compute_metrics
from models.training import distributed as dist_utils
from models.training.config import TrainConfig
from models.training.precision import autocast


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: DataLoader,
    info: dist_utils.DistInfo,
    amp_dtype=None,
    with_features: bool = False,
    progress: bool = False,
    desc: str = "eval",
    channels_last: bool = False,
) -> dict:
    """Scores (N, 52) float32, labels, subjects, dataset indices (and features (N, D)) for the
    whole split, gathered from every rank and sorted by dataset index (= list order)."""
    model.eval()
    parts = {"index": [], "scores": [], "label": [], "subject": []}
    if with_features:
        parts["features"] = []
    dropped = 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (info.is_main and progress), dynamic_ncols=True):
        dropped += batch["num_dropped"]
        if batch["clip"].shape[0] == 0:
            continue
        clip = normalize_frames(batch["clip"].to(info.device, non_blocking=True), channels_last)
        with autocast(info.device, amp_dtype):
            logits, features = model(clip)
        parts["scores"].append(logits.float().cpu())
        if with_features:
            parts["features"].append(features.float().cpu())
        for key in ("index", "label", "subject"):
            parts[key].append(torch.as_tensor(batch[key]).cpu())
    local = {key: torch.cat(chunks) if chunks else None for key, chunks in parts.items()}
    gathered = [g for g in dist_utils.all_gather_objects(local, info) if g["index"] is not None]
    if not gathered:
        raise RuntimeError(f"{desc}: no clip could be read (dropped {dropped})")
    merged = {key: torch.cat([g[key] for g in gathered]) for key in parts}
    order = torch.argsort(merged["index"])
    result = {key: value[order] for key, value in merged.items()}
    result["num_dropped"] = int(dist_utils.all_reduce_sum([dropped], info)[0])
    return result


# The validation metric that picks the best checkpoint, per dataset, and its name in reports.
SELECTION_METRICS = {"dfew": ("uar", "UAR")}
DEFAULT_SELECTION = ("f1_mean", "F1_mean")


def selection_metric(dataset: str) -> tuple[str, str]:
    """`(key, name)` of the metric by which a run on `dataset` keeps its best checkpoint:
    UAR on DFEW (as DFEW papers select), F1_mean on MA-52 and the synthetic data."""
    return SELECTION_METRICS.get(dataset, DEFAULT_SELECTION)


def evaluate_predictions(pred: dict, dataset: str = "synthetic") -> dict:
    """The scalar metrics of `predict`'s output: MA-52's official ones (compute_metrics without
    its per-class tensors), or WAR and UAR on DFEW (expression_metrics)."""
    if dataset == "dfew":
        metrics = expression_metrics(pred["scores"], pred["label"], pred["scores"].shape[1])
        return {"war": metrics["war"], "uar": metrics["uar"]}
    metrics = compute_metrics(pred["scores"], pred["label"])
    return {
        key: value if isinstance(value, int) else float(value)
        for key, value in metrics.items()
        if isinstance(value, numbers.Real) or (torch.is_tensor(value) and value.numel() == 1)
    }


def split_has_labels(cfg: TrainConfig, split: str) -> bool:
    """MA-52 test labels are dummy zeros (SPEC §6); every synthetic split is labelled."""
    return not (cfg.dataset == "ma52" and split == "test")
