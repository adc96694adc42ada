"""Per-epoch logs of a training run: console table, CSV, TensorBoard and a curve PNG.

The history (one dict per finished epoch) lives in the checkpoint, so after --resume the
CSV and the PNG are rewritten from it and hold every epoch exactly once; TensorBoard purges
events past the resumed step.
"""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

# Columns of the console table: (history key, header, width, format spec)
TABLE_COLUMNS = (
    ("epoch", "epoch", 5, "d"),
    ("lr", "lr", 9, ".2e"),
    ("train_loss", "loss", 7, ".4f"),
    ("train_ce", "ce", 7, ".4f"),
    ("train_girl", "girl", 7, ".4f"),
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
        return "  ".join(f"{record[key]:>{width}{spec}}" if record.get(key) is not None else f"{'-':>{width}}"
                         for key, _, width, spec in TABLE_COLUMNS)

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
        epochs = [r["epoch"] for r in history]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        for key in ("train_loss", "train_ce", "train_girl"):
            ax_loss.plot(epochs, [r.get(key) for r in history], marker="o", label=key)
        ax_loss.set_xlabel("epoch")
        ax_loss.set_title("training loss")
        ax_loss.legend()
        for key in ("train_action_top1", "val_action_top1", "val_body_top1", "val_f1_mean"):
            ax_acc.plot(epochs, [r.get(key) for r in history], marker="o", label=key)
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylim(0, 1)
        ax_acc.set_title("accuracy / F1 (validation persons)")
        ax_acc.legend()
        fig.tight_layout()
        fig.savefig(self.out_dir / "curves.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
