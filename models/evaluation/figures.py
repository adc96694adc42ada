"""Evaluation figures: confusion matrices, t-SNE of the features, cosine-similarity histograms.

The histograms follow the paper's Figures 4-5: the cosine similarity between the
L2-normalized features of two clips of the same class (intra-class; high = compact
classes) and of different classes (inter-class; low = separated classes). Large splits are
subsampled to `max_points` clips (fixed seed) so that the pair matrix stays small.
"""

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix

from models.data.labels import BODY_NAMES


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def confusion_png(true, pred, class_names, path, title: str) -> None:
    """Row-normalized confusion matrix (rows: true class, columns: predicted class)."""
    n = len(class_names)
    counts = confusion_matrix(np.asarray(true), np.asarray(pred), labels=list(range(n)))
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.2 * n + 3)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = range(n)
    fontsize = 8 if n <= 10 else 5
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, class_names, fontsize=fontsize)
    if n <= 10:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{rates[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tsne_png(features: torch.Tensor, body: np.ndarray, path, title: str, max_points: int = 2000, seed: int = 0) -> None:
    """2-D t-SNE (scikit-learn) of the features, one colour per body part."""
    keep = _subsample(features.shape[0], max_points, seed)
    feats = features[keep].float().numpy()
    perplexity = float(min(30.0, max(2.0, (len(keep) - 1) / 3)))
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)
    body = np.asarray(body)[keep]
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    for b, name in enumerate(BODY_NAMES):
        mask = body == b
        if mask.any():
            ax.scatter(embedded[mask, 0], embedded[mask, 1], s=6, color=cmap(b), label=name)
    ax.legend(markerscale=3, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pair_cosines(
    features: torch.Tensor, labels: np.ndarray, max_points: int = 3000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities of all intra-class and all inter-class pairs (i < j)."""
    keep = _subsample(features.shape[0], max_points, seed)
    f = torch.nn.functional.normalize(features[keep].double(), dim=1)
    sim = (f @ f.T).numpy()
    labels = np.asarray(labels)[keep]
    upper = np.triu(np.ones_like(sim, dtype=bool), k=1)
    same = labels[:, None] == labels[None, :]
    return sim[upper & same], sim[upper & ~same]


def cosine_histogram_png(values: np.ndarray, path, title: str, color: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    if values.size:
        ax.hist(values, bins=50, range=(-1, 1), density=True, color=color, alpha=0.8)
        ax.axvline(float(values.mean()), color="black", linestyle="--", label=f"mean {values.mean():.3f}")
        ax.legend()
    ax.set_xlim(-1, 1)
    ax.set_xlabel("cosine similarity of features")
    ax.set_ylabel("density")
    ax.set_title(f"{title} ({values.size} pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
