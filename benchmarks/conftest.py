"""Benchmarks time the real kernels: on a machine without CUDA the fused backend is the C++
one, and Triton's interpreter (which tests/ turns on) stays off here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.pop("TRITON_INTERPRET", None)


def pytest_sessionstart(session):
    session.config.load_before_benchmarks = os.getloadavg()[0]


def pytest_terminal_summary(terminalreporter, config):
    """Say when other work shared the machine: timings taken next to it are not comparable.
    The load is read before the benchmarks start, so their own threads do not count."""
    load = config.load_before_benchmarks
    cores = len(os.sched_getaffinity(0))
    terminalreporter.write_line(f"load average {load:.1f} on {cores} cores before the benchmarks")
    if load > 0.5 * cores:
        terminalreporter.write_line(
            "warning: the machine was busy; timings and ratios are not reliable (tools/bench_table.py "
            "lists the rows whose spread between rounds says so)",
            yellow=True,
        )
