"""models/evaluate.py: every output file, on a labelled synthetic split and on an MA-52
test split whose labels are dummy zeros (prediction.csv in list order)."""

import csv
import json

import pytest

from models import evaluate, train
from models.data import MA52Dataset
from tests.test_train import export_tiny_ma52
from tests.train_helpers import EVALUATE_SCRIPT, one_thread, run_script, tiny_args  # noqa: F401

FIGURES = ("tsne_body.png", "cosine_intra_class.png", "cosine_inter_class.png")
CONFUSIONS = ("confusion_action.png", "confusion_body.png")


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_run")
    train.main(tiny_args(out, epochs=1, eval_clips=30) + ["--no-test"])
    return out / "best.pt"


def test_evaluate_script_writes_every_file(synthetic_checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = run_script([EVALUATE_SCRIPT, synthetic_checkpoint, "--split", "test", "--out", out, "--no-progress"])
    assert "test (30 clips): action top-1" in result.stdout
    for name in ("metrics.json", "prediction.csv", *CONFUSIONS, *FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "metrics.json").read_text())
    assert report["labels_available"] and report["num_clips"] == 30
    metrics = report["metrics"]
    assert {"action_top1", "action_top5", "body_top1", "f1_mean"} <= set(metrics)
    assert metrics["f1_mean"] == pytest.approx(
        (metrics["action_f1_macro"] + metrics["action_f1_micro"] + metrics["body_f1_macro"] + metrics["body_f1_micro"])
        / 4
    )
    with open(out / "prediction.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["vid"] + [f"action_pred_{i}" for i in range(1, 6)] + [f"body_pred_{i}" for i in range(1, 6)]
    assert len(rows) == 31


def test_val_split_has_no_submission_file(synthetic_checkpoint, tmp_path):
    report = evaluate.main(
        [str(synthetic_checkpoint), "--split", "val", "--out", str(tmp_path), "--no-progress", "--max-points", "20"]
    )
    assert report["split"] == "val" and report["metrics"]["num_samples"] == 30
    assert not (tmp_path / "prediction.csv").exists()
    assert all((tmp_path / name).is_file() for name in (*CONFUSIONS, *FIGURES))


def test_ma52_test_split_without_labels(tmp_path):
    root = export_tiny_ma52(tmp_path / "ma52")
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, epochs=1, train_clips=8, eval_clips=12) + ["--data-root", str(root)])
    out = tmp_path / "eval"
    report = evaluate.main([str(run_dir / "best.pt"), "--split", "test", "--out", str(out), "--no-progress"])
    assert not report["labels_available"] and "metrics" not in report
    assert not any((out / name).exists() for name in CONFUSIONS)
    assert all((out / name).is_file() for name in FIGURES)
    with open(out / "prediction.csv") as f:
        rows = list(csv.DictReader(f))
    names = MA52Dataset(root, "test").names
    # max_eval_clips = 12 keeps 12 evenly spaced clips of the list, in list order.
    assert [row["vid"] for row in rows] == [names[i] for i in (0, 5, 9, 14, 19, 23, 28, 32, 37, 42, 46, 51)]
    assert all(0 <= int(row["action_pred_1"]) < 52 for row in rows)
