"""Tiny, fast settings for running models/train.py and models/evaluate.py in tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "models" / "train.py"
EVALUATE_SCRIPT = REPO_ROOT / "models" / "evaluate.py"


# X3D with one block per stage (depth factor 0.2): the smallest model with every stage.
TINY_PRESET = '{"name": "test", "depth_factor": 0.2}'


def tiny_train_args(epochs: int = 2, train_clips: int = 32, eval_clips: int = 24) -> list:
    """The tiny model, 4 frames of 32x32 and a few clips: train.py options of a run of a few
    seconds, without its output folder (models/ablate.py gives each run its own)."""
    return [
        "--preset",
        TINY_PRESET,
        "--num-frames",
        "4",
        "--crop-size",
        "32",
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
        "--max-train-clips",
        str(train_clips),
        "--max-eval-clips",
        str(eval_clips),
        "--lr",
        "0.003",
        "--warmup-epochs",
        "0",
        "--girl-num-groups",
        "2",
    ]


def tiny_args(out_dir, epochs: int = 2, train_clips: int = 32, eval_clips: int = 24, extra=()) -> list:
    """`tiny_train_args` writing to `out_dir`, with no workers and no progress bar."""
    return [
        "--out",
        str(out_dir),
        *tiny_train_args(epochs, train_clips, eval_clips),
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]


def run_script(args: list, timeout: int = 240, env_extra=None) -> subprocess.CompletedProcess:
    """Run a command from the repo root the way a user would; fail with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("PYTHONPATH", None)  # the scripts must find `models` by themselves
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in-process, as in the subprocesses (OMP_NUM_THREADS=1): CPU results
    depend on the thread count (reduction order), and tiny models run fastest this way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
