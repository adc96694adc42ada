"""Fuzz suite for the public ops: every adversarial and random case of
tests/fuzz_ops_cases.py on every backend that runs here (triton under its interpreter on
CPU tensors), each op's cases in a worker subprocess.

A worker that dies (a segfault, an abort) or stays silent for `CASE_TIMEOUT_S` is replaced
by a new one that resumes after the attempt (case and backend) it was running; that attempt
counts as "other". Per
op and backend the test prints cases tried, clear errors (TypeError/ValueError naming the
argument), sensible results (finite and matching the reference backend) and anything else,
and fails unless "anything else" is 0.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fuzz_ops_cases import OPS

WORKER = Path(__file__).with_name("fuzz_ops_cases.py")
CASE_TIMEOUT_S = 90  # the slowest case (10000 Sinkhorn iterations, interpreted) takes ~10 s
OUTCOMES = ("clear_error", "sensible", "other")


def _lines(process: subprocess.Popen, lines: queue.Queue) -> None:
    for line in process.stdout:
        lines.put(line.strip())
    lines.put(None)


def run_cases(op: str, worker: Path = WORKER) -> list[dict]:
    """Every case of `op` judged on every runnable backend, restarting the worker after a
    crash or a hang."""
    verdicts: list[dict] = []
    resume = ["0"]  # worker arguments after the op: first case index [, backend that crashed there]
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "0", "PYTHONWARNINGS": "ignore"}
    while True:
        process = subprocess.Popen(
            [sys.executable, str(worker), op, *resume],
            cwd=WORKER.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(process, lines), daemon=True).start()
        running = None
        while True:
            try:
                line = lines.get(timeout=CASE_TIMEOUT_S)
            except queue.Empty:
                process.kill()
                process.wait()
                problem = f"no answer within {CASE_TIMEOUT_S} s (killed)"
                break
            if line is None:
                problem = f"the worker died with exit code {process.wait()}"
                break
            if line == "done":
                process.wait()
                return verdicts
            if line.startswith("start "):
                _, index, backend = line.split()
                running = (int(index), backend)
            else:
                verdicts.append(json.loads(line))
        if running is None:
            raise RuntimeError(f"the {op} worker failed before its first case: {problem}")
        index, backend = running
        verdicts.append(
            {"index": index, "label": f"case {index}", "backend": backend, "outcome": "other", "detail": problem}
        )
        resume = [str(index), backend]


def table(op: str, verdicts: list[dict]) -> str:
    rows = [f"{op:<16} {'backend':<10} {'tried':>6} {'clear errors':>13} {'sensible':>9} {'anything else':>14}"]
    for backend in sorted({v["backend"] for v in verdicts}, key=("reference", "cpp", "triton").index):
        mine = [v for v in verdicts if v["backend"] == backend]
        counts = [sum(v["outcome"] == outcome for v in mine) for outcome in OUTCOMES]
        rows.append(f"{'':<16} {backend:<10} {len(mine):>6} {counts[0]:>13} {counts[1]:>9} {counts[2]:>14}")
    return "\n".join(rows)


@pytest.mark.slow  # hundreds of cases per op in worker processes: 10-40 s each
@pytest.mark.parametrize("op", OPS)
def test_every_case_ends_in_a_clear_error_or_a_sensible_result(op, capsys):
    verdicts = run_cases(op)
    with capsys.disabled():
        print("\n" + table(op, verdicts))
    others = [v for v in verdicts if v["outcome"] == "other"]
    listed = "\n".join(f"  [{v['backend']}] {v['label']}: {v['detail'][:300]}" for v in others)
    assert not others, f"{len(others)} cases of {op} ended in something else:\n{listed}"


def test_a_crashing_case_counts_as_other_and_the_rest_still_runs(tmp_path):
    """Negative control of the crash handling: a worker that segfaults in case 0."""
    worker = tmp_path / "crashing_worker.py"
    worker.write_text(
        "import json, os, signal, sys\n"
        "if len(sys.argv) == 3:\n"
        "    print('start 0 cpp', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n"
        "assert sys.argv[2:] == ['0', 'cpp'], sys.argv\n"
        "print('start 1 cpp', flush=True)\n"
        "print(json.dumps({'index': 1, 'label': 'fine', 'backend': 'cpp', 'outcome': 'sensible', 'detail': ''}))\n"
        "print('done', flush=True)\n"
    )
    verdicts = run_cases("sinkhorn", worker)
    assert [(v["index"], v["outcome"]) for v in verdicts] == [(0, "other"), (1, "sensible")]
    assert "exit code -11" in verdicts[0]["detail"]
