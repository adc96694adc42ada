"""models/ablate.py (models/evaluation/ablation.py): the ablation runner on a tiny
configuration, its resume and its summaries."""

import csv
import json

import pytest

from models.evaluation import ablation as ablate
from tests.train_helpers import REPO_ROOT, TRAIN_SCRIPT, run_script, tiny_train_args

ABLATE_SCRIPT = REPO_ROOT / "models" / "ablate.py"
# Two short epochs of the tiny model on a few clips.
TINY_TRAIN = tiny_train_args(epochs=2, train_clips=16, eval_clips=8)


@pytest.mark.slow  # two short training runs and a rerun: ~30 s of CPU
def test_runner_writes_csv_table_plot_resumes_and_skips_finished_runs(tmp_path):
    out = tmp_path / "ablation"
    # A run stopped after its first epoch, as an interrupted ablation leaves it.
    stopped = out / "full" / "seed0"
    run_script(
        [
            TRAIN_SCRIPT,
            "--out",
            stopped,
            "--seed",
            "0",
            "--no-progress",
            "--workers",
            "0",
            "--stop-after-epoch",
            "1",
            *ablate.row_args("full"),
            *TINY_TRAIN,
        ]
    )
    command = [
        ABLATE_SCRIPT,
        "--rows",
        "baseline,full",
        "--seeds",
        "1",
        "--out",
        out,
        "--jobs",
        "2",
        "--no-progress",
        "--",
        *TINY_TRAIN,
    ]
    run_script(command, timeout=300)
    assert "resumed from" in (stopped / "train.log").read_text()
    with open(out / "ablation.csv") as f:
        lines = list(csv.DictReader(f))
    assert [(line["row"], line["seed"]) for line in lines] == [("baseline", "0"), ("full", "0")]
    for line in lines:
        gap = float(line["test_action_top1"]) - float(line["same_action_top1"])
        assert float(line["person_gap"]) == pytest.approx(gap)
    table = (out / "ablation.md").read_text()
    assert "| baseline |" in table and "| full |" in table and "person gap" in table
    assert (out / "ablation.png").stat().st_size > 0
    # The rows differ in what they switch off: the runs' saved configurations say so.
    configs = {row: json.loads((out / row / "seed0" / "config.json").read_text()) for row in ("baseline", "full")}
    assert not configs["baseline"]["tfam"] and not configs["baseline"]["girl"]
    assert configs["full"]["tfam"] and configs["full"]["girl"] and configs["full"]["epochs"] == 2

    stamp = (stopped / "result.json").stat().st_mtime_ns
    rerun = run_script(command, timeout=120)
    assert "2/2 runs finished" in rerun.stdout
    assert (stopped / "result.json").stat().st_mtime_ns == stamp  # not run again


def test_summary_statistics_and_table():
    results = [
        {
            "row": "full",
            "seed": s,
            "test_action_top1": a,
            "test_body_top1": 0.5,
            "test_f1_mean": 0.25,
            "same_action_top1": 0.5,
            "person_gap": a - 0.5,
            "seconds": 1.0,
        }
        for s, a in ((0, 0.2), (1, 0.4))
    ]
    table = ablate.summarize(results, ["baseline", "full"])
    assert list(table) == ["full"]
    mean, std, n = table["full"]["test_action_top1"]
    assert (mean, n) == (pytest.approx(0.3), 2) and std == pytest.approx(0.1414213, rel=1e-5)  # sample std
    assert "| full | 30.0 ± 14.1 | 50.0 ± 0.0 | 25.0 ± 0.0 | 50.0 ± 0.0 | -20.0 ± 14.1 | 2 |" in ablate.markdown_table(
        table
    )


def test_paired_differences_subtract_full_seed_by_seed():
    def result(row, seed, action, gap=None):
        return {
            "row": row,
            "seed": seed,
            "test_action_top1": action,
            "test_body_top1": 0.5,
            "test_f1_mean": 0.25,
            "same_action_top1": None if gap is None else action - gap,
            "person_gap": gap,
            "seconds": 1.0,
        }

    results = [
        result("full", 0, 0.6, -0.1),
        result("full", 1, 0.2, -0.3),
        result("baseline", 0, 0.5, -0.2),
        result("baseline", 1, 0.3, -0.1),
        result("baseline", 2, 0.9),  # no full run with seed 2: not paired
        result("girl_only", 2, 0.4),
    ]
    diffs = ablate.paired_differences(results, ["baseline", "girl_only", "full"])
    assert list(diffs) == ["baseline"]
    mean, std, n = diffs["baseline"]["test_action_top1"]
    assert (mean, n) == (pytest.approx(0.0), 2) and std == pytest.approx(0.1 * 2**0.5)
    assert diffs["baseline"]["person_gap"][:2] == (pytest.approx(0.05), pytest.approx(0.15 * 2**0.5))
    assert diffs["baseline"]["test_body_top1"] == (0.0, 0.0, 2)
    text = ablate.markdown_table(ablate.summarize(results, ["baseline", "full"]), diffs)
    assert "| baseline | 0.0 ± 14.1 | 0.0 ± 0.0 | 0.0 ± 0.0 | 5.0 ± 21.2 | 2 |" in text and "paired by seed" in text


def test_rows_switch_every_part_explicitly():
    args = ablate.row_args("frequency_only")
    pairs = dict(args[i + 1].split("=", 1) for i in range(0, len(args), 2))
    assert pairs == {
        "tfam": "true",
        "temporal": "false",
        "frequency": "true",
        "fusion": '"consistency"',
        "girl": "true",
    }
    with pytest.raises(SystemExit):
        ablate.parse_args(["--rows", "nope"])
    with pytest.raises(SystemExit):
        ablate.parse_args(["--", "--seed", "3"])
