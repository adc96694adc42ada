"""The ablation runner behind `python models/ablate.py`: every row of ABLATIONS
(models/modelling/piumr.py) x N seeds, each a models/train.py run, summarised as held-out-person
metrics and the person gap.

    python models/ablate.py                                   # 7 rows x 3 seeds of the main job
    python models/ablate.py --rows baseline,full --seeds 5 --out runs/ablation_b
    python models/ablate.py --config configs/my.json -- --epochs 6 --batch-size 32

Everything after `--` goes to every models/train.py run (the runner sets --out, --seed and the
row's switches itself). Runs are independent processes, `--jobs` at a time (default: one per
two cores), each with its share of the cores as torch threads and DataLoader workers. A run
whose folder holds a result is skipped, one that stopped part-way continues from its last.pt:
rerunning the same command finishes what is missing. It drives train.py as a user would, so it
depends on its command line and output files only.

Writes to --out (default runs/ablation):
  ROW/seedS/       each run's train.py folder (checkpoints, metrics.csv, curves.png, ...), its
                   console output in train.log and its result in result.json
  ablation.csv     one line per finished run: the held-out persons' (test split) action top-1,
                   body top-1, F1_mean, the same persons' (new clips of training persons) action
                   top-1, the person gap (held-out minus same persons) and the run's seconds
  ablation.md      per row, mean +- standard deviation over the seeds; then each row minus
                   `full`, paired by seed (the seed fixes initialization and data order, so
                   the paired difference is what a row changes, less the seed's own spread)
  ablation.png     the same as bars with standard-deviation error bars
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from models.modelling.piumr import ABLATIONS

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "models" / "train.py"
RESULT_NAME = "result.json"
# The run's own options: the runner sets them per run, so they cannot be passed through.
RESERVED = ("--out", "--seed", "--resume", "--stop-after-epoch")
# (result key, column title) of the table and the plot: held-out persons, then the person gap.
METRICS = (("test_action_top1", "action top-1"), ("test_body_top1", "body top-1"), ("test_f1_mean", "F1_mean"))
GAP = (("same_action_top1", "action top-1, same persons"), ("person_gap", "person gap (held-out - same)"))


@dataclass(frozen=True)
class Job:
    row: str
    seed: int
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.row} seed {self.seed}"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rows",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(ABLATIONS),
        help=f"comma-separated rows (default all: {','.join(ABLATIONS)})",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST_SEED, FIRST_SEED + 1, ...")
    p.add_argument("--out", default="runs/ablation", help="output folder")
    p.add_argument("--config", help="JSON config file for every run (default: train.py's)")
    p.add_argument(
        "--jobs",
        type=int,
        default=max(1, len(os.sched_getaffinity(0)) // 2),
        help="runs at a time (default: one per two cores)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(own)
    unknown = [row for row in args.rows if row not in ABLATIONS]
    if unknown or not args.rows:
        p.error(f"--rows: expected a non-empty subset of {list(ABLATIONS)}, got {args.rows}")
    if args.seeds < 1 or args.jobs < 1:
        p.error(f"--seeds and --jobs: expected positive integers, got {args.seeds} and {args.jobs}")
    reserved = [a for a in train_args if a.split("=")[0] in RESERVED]
    if reserved:
        p.error(f"after --: {reserved} are set by the runner per run; remove them")
    return args, train_args


def row_args(row: str) -> list[str]:
    """train.py options that make a run the ablation `row`: every switch is set explicitly,
    so a config that turns a part off cannot leak into the rows that want it on."""
    return [arg for key, value in asdict(ABLATIONS[row]).items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def thread_split(jobs: int) -> tuple[int, int]:
    """(torch threads, DataLoader workers) per run so that `jobs` runs share the cores."""
    cores = max(1, len(os.sched_getaffinity(0)) // jobs)
    threads = max(1, cores // 2)
    return threads, cores - threads


def run_command(job: Job, args: argparse.Namespace, train_args: list[str]) -> list[str]:
    threads, workers = thread_split(args.jobs)
    command = [
        sys.executable,
        str(TRAIN_SCRIPT),
        "--out",
        str(job.folder),
        "--seed",
        str(job.seed),
        "--no-progress",
        "--threads",
        str(threads),
        "--workers",
        str(workers),
    ]
    # Options after -- come later and win over the runner's thread split.
    if (job.folder / "last.pt").is_file():
        # A resumed run keeps its saved config (train.py refuses --config with --resume).
        return command + ["--resume"] + row_args(job.row) + train_args
    return command + ([] if args.config is None else ["--config", args.config]) + row_args(job.row) + train_args


def epochs_done(folder: Path) -> int:
    try:
        with open(folder / "metrics.csv") as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return 0


def planned_epochs(folder: Path) -> int | None:
    """The run's epoch count from its saved config (summary or checkpoint not needed:
    train.py writes the config it resolved into config.json)."""
    try:
        return json.loads((folder / "config.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        return None


def result_of(folder: Path) -> dict:
    """The numbers of a finished run, from its summary.json."""
    summary = json.loads((folder / "summary.json").read_text())
    test, same = summary.get("test"), summary.get("test_same_persons")
    if not test:
        raise RuntimeError(f"{folder}: the run has no test metrics (was it run with --no-test or stopped early?)")
    result = {f"test_{key}": test[key] for key in ("action_top1", "body_top1", "f1_mean")}
    result["same_action_top1"] = same["action_top1"] if same else None
    result["person_gap"] = test["action_top1"] - same["action_top1"] if same else None
    result["seconds"] = summary["seconds"]
    return result


def run_jobs(jobs: list[Job], args: argparse.Namespace, train_args: list[str]) -> list[Job]:
    """Run the unfinished jobs, `args.jobs` at a time; returns the jobs that failed."""
    pending = [job for job in jobs if not (job.folder / RESULT_NAME).is_file()]
    overall = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(pending),
        desc="ablation runs",
        position=0,
        disable=not args.progress,
        dynamic_ncols=True,
    )
    free_slots, running, failed = list(range(1, args.jobs + 1)), {}, []
    try:
        while pending or running:
            while pending and free_slots:
                job, slot = pending.pop(0), free_slots.pop(0)
                job.folder.mkdir(parents=True, exist_ok=True)
                log = open(job.folder / "train.log", "a")  # noqa: SIM115 (closed when the run ends)
                process = subprocess.Popen(
                    run_command(job, args, train_args),
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
                bar = tqdm(
                    total=planned_epochs(job.folder),
                    desc=job.name,
                    unit="epoch",
                    position=slot,
                    leave=False,
                    disable=not args.progress,
                    dynamic_ncols=True,
                )
                running[process] = (job, slot, log, bar)
            time.sleep(0.5)
            for process, (job, slot, log, bar) in list(running.items()):
                bar.total = bar.total or planned_epochs(job.folder)
                bar.n = epochs_done(job.folder)
                bar.refresh()
                if process.poll() is None:
                    continue
                del running[process]
                log.close()
                bar.close()
                free_slots.append(slot)
                try:
                    if process.returncode:
                        raise RuntimeError(f"exit status {process.returncode}")
                    (job.folder / RESULT_NAME).write_text(json.dumps(result_of(job.folder), indent=2))
                except (RuntimeError, OSError, ValueError, KeyError) as error:
                    failed.append(job)
                    tqdm.write(f"{job.name} failed ({error}); see {job.folder / 'train.log'}")
                overall.update(1)
    finally:
        for process, (_, _, log, bar) in running.items():  # interrupted: leave no run behind
            process.terminate()
            process.wait()
            log.close()
            bar.close()
        overall.close()
    return failed


def collect(jobs: list[Job]) -> list[dict]:
    rows = []
    for job in jobs:
        path = job.folder / RESULT_NAME
        if path.is_file():
            rows.append({"row": job.row, "seed": job.seed, **json.loads(path.read_text())})
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(results: list[dict], rows: list[str]) -> dict:
    """`{row: {key: (mean, std, n)}}` over the seeds, for the table and plot columns."""
    table = {}
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        if mine:
            table[row] = {
                key: mean_std(values) + (len(values),)
                for key, _ in METRICS + GAP
                if (values := [r[key] for r in mine if r[key] is not None])
            }
    return table


def paired_differences(results: list[dict], rows: list[str], reference: str = "full") -> dict:
    """`{row: {key: (mean, std, n)}}` of `row - reference` per seed, over the seeds both
    finished (rows other than `reference` with at least one such seed)."""
    by_seed = {r["seed"]: r for r in results if r["row"] == reference}
    table = {}
    for row in rows:
        pairs = [(r, by_seed[r["seed"]]) for r in results if r["row"] == row != reference and r["seed"] in by_seed]
        stats = {
            key: mean_std(values) + (len(values),)
            for key, _ in METRICS + GAP[1:]
            if (values := [r[key] - ref[key] for r, ref in pairs if r[key] is not None and ref[key] is not None])
        }
        if stats:
            table[row] = stats
    return table


def write_csv(results: list[dict], path: Path) -> None:
    keys = ["row", "seed"] + [key for key, _ in METRICS + GAP] + ["seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(results)


def _rows_of(table: dict, columns) -> list[str]:
    """Markdown lines of `table` (`{row: {key: (mean, std, n)}}`) over `columns` ((key, title)
    pairs), in percent: mean ± std, or the mean alone for one seed."""

    def cell(stats):
        if stats is None:
            return "-"
        mean, std, n = stats
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"

    titles = [title for _, title in columns]
    lines = ["| row | " + " | ".join(titles) + " | seeds |", "|---" * (len(titles) + 2) + "|"]
    for row, stats in table.items():
        seeds = max(n for _, _, n in stats.values())
        lines.append(f"| {row} | " + " | ".join(cell(stats.get(key)) for key, _ in columns) + f" | {seeds} |")
    return lines


def markdown_table(table: dict, differences: dict | None = None) -> str:
    """The summary table; with `differences` (`paired_differences`), the paired one below it."""
    note = (
        "Percent, mean ± standard deviation over the seeds. Held-out persons: the test split (persons "
        "not seen in training); same persons: new clips of the training persons; person gap: held-out "
        "minus same-persons action top-1 (closer to 0 is more person-independent)."
    )
    text = "\n".join(_rows_of(table, METRICS + GAP)) + "\n\n" + note + "\n"
    if differences:
        paired = (
            "Row minus `full`, paired by seed: percentage points, mean ± standard deviation of the "
            "per-seed differences (negative: the row is below the full model)."
        )
        text += "\n" + "\n".join(_rows_of(differences, METRICS + GAP[1:])) + "\n\n" + paired + "\n"
    return text


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    fig, (ax_metrics, ax_gap) = plt.subplots(
        1, 2, figsize=(max(10.0, 1.8 * len(rows) + 4), 4.5), gridspec_kw={"width_ratios": [3, 2]}
    )
    width = 0.8 / len(METRICS)
    for i, (key, title) in enumerate(METRICS):
        stats = [table[row].get(key, (math.nan, 0.0, 0)) for row in rows]
        ax_metrics.bar(
            [r + (i - (len(METRICS) - 1) / 2) * width for r in range(len(rows))],
            [100 * s[0] for s in stats],
            width,
            yerr=[100 * s[1] for s in stats],
            capsize=3,
            label=title,
        )
    ax_metrics.set_title("held-out persons (test split)", fontsize=10)
    ax_metrics.set_ylabel("percent (mean ± std over seeds)")
    ax_metrics.legend(fontsize=8)
    gap = [table[row].get("person_gap", (math.nan, 0.0, 0)) for row in rows]
    ax_gap.bar(
        range(len(rows)), [100 * s[0] for s in gap], 0.6, yerr=[100 * s[1] for s in gap], capsize=3, color="tab:red"
    )
    ax_gap.axhline(0.0, color="black", linewidth=0.8)
    ax_gap.set_title("person gap (held-out minus same persons)", fontsize=10)
    ax_gap.set_ylabel("action top-1, percentage points")
    for ax in (ax_metrics, ax_gap):
        ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args, train_args = parse_args(argv)
    out = Path(args.out)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    # Seed-major order: a partial ablation already has every row.
    jobs = [Job(row, seed, out / row / f"seed{seed}") for seed in seeds for row in args.rows]
    started = time.perf_counter()
    failed = run_jobs(jobs, args, train_args)
    results = collect(jobs)
    if results:
        table = summarize(results, args.rows)
        text = markdown_table(table, paired_differences(results, args.rows))
        write_csv(results, out / "ablation.csv")
        (out / "ablation.md").write_text(text)
        plot(table, out / "ablation.png")
        print(text)
    print(
        f"{len(results)}/{len(jobs)} runs finished ({time.perf_counter() - started:.0f} s this call); results in {out}"
    )
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(job.name for job in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
