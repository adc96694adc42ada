"""Per-epoch logs of a training run: console table, CSV, TensorBoard and a curve PNG.

The history (one dict per finished epoch) lives in the checkpoint, so after --resume the
CSV and the PNG are rewritten from it and hold every epoch exactly once; TensorBoard purges
events past the resumed step.
"""

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

# Columns of the console table: (history key, header, width, format spec)
TABLE_COLUMNS = (
    ("epoch", "epoch", 5, "d"),
    ("lr", "lr", 9, ".2e"),
    ("train_loss", "loss", 7, ".4f"),
    ("train_ce", "ce", 7, ".4f"),
    ("train_girl", "girl", 7, ".4f"),
    ("train_girl_positive_fraction", "g_pos", 5, ".0%"),  # anchors with a same-class partner in their group
    ("train_girl_group_size", "g_size", 6, ".1f"),
    ("train_girl_var", "g_var", 8, ".2e"),
    ("train_action_top1", "tr_act", 6, ".1%"),
    ("val_action_top1", "act@1", 6, ".1%"),
    ("val_action_top5", "act@5", 6, ".1%"),
    ("val_body_top1", "body@1", 6, ".1%"),
    ("val_f1_mean", "F1mean", 6, ".1%"),
    ("epoch_seconds", "sec", 6, ".0f"),
)


class RunLog:
    def __init__(self, out_dir, enabled: bool, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step)

    @staticmethod
    def header() -> str:
        return "  ".join(f"{name:>{width}}" for _, name, width, _ in TABLE_COLUMNS)

    @staticmethod
    def row(record: dict) -> str:
        return "  ".join(
            f"{record[key]:>{width}{spec}}" if record.get(key) is not None else f"{'-':>{width}}"
            for key, _, width, spec in TABLE_COLUMNS
        )

    def step_scalars(self, step: int, scalars: dict) -> None:
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"step/{key}", value, step)

    def epoch_end(self, history: list, step: int) -> None:
        """Write the CSV and the curve PNG from the whole history; log the last epoch to TB."""
        if not self.enabled:
            return
        record = history[-1]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.tb.add_scalar(f"epoch/{key}", value, record["epoch"])
        self.tb.flush()
        self._write_csv(history)
        self._plot_curves(history)

    def _write_csv(self, history: list) -> None:
        keys = list(dict.fromkeys(k for record in history for k in record))
        with open(self.out_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    def _plot_curves(self, history: list) -> None:
        """Training loss and accuracy, the validation persons' metrics, and whether GIRL acts
        (its term and group-risk variance, anchors with a positive, group size)."""
        epochs = [r["epoch"] for r in history]
        fig, axes = plt.subplots(2, 3, figsize=(15, 8))

        def panel(ax, keys, title, ylabel, fraction=False, log=False):
            for key in keys:
                values = [r.get(key) for r in history]
                if any(v is not None for v in values):
                    ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o", label=key)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if fraction:
                ax.set_ylim(0, 1)
            if log and any(v > 0 for line in ax.lines for v in line.get_ydata() if not math.isnan(v)):
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "GIRL off", ha="center", va="center", transform=ax.transAxes)

        (loss, train, val), (girl, positives, size) = axes
        panel(loss, ("train_loss", "train_ce", "train_girl"), "training loss", "loss (mean over clips)")
        panel(train, ("train_action_top1",), "training clips (augmented)", "action top-1", fraction=True)
        panel(
            val,
            ("val_action_top1", "val_action_top5", "val_body_top1", "val_f1_mean"),
            "validation persons",
            "accuracy / F1",
            fraction=True,
        )
        panel(
            girl, ("train_girl", "train_girl_var"), "GIRL term and group-risk variance", "value (log scale)", log=True
        )
        panel(
            positives,
            ("train_girl_positive_fraction",),
            "GIRL anchors with a positive in their group",
            "fraction of anchors",
            fraction=True,
        )
        panel(size, ("train_girl_group_size",), "GIRL group size", "mean clips per group (>= 2 members)")
        size.set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(self.out_dir / "curves.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
