"""Shared benchmark helpers: peak-memory measurement, tagging, and the fused-backend choice.

Each benchmark sets `benchmark.group` ("<op> <shape> <fwd|fwd+bwd>") and
`benchmark.extra_info["impl"]` ("fused", "eager", "compiled" or "floor"), so
tools/bench_table.py can turn a `--benchmark-json` file into ratio tables.
"""

from __future__ import annotations

import functools

import torch

import piumr_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_BACKEND = "triton" if DEVICE.type == "cuda" else "cpp"


def peak_memory_mb(fn) -> float:
    """Peak memory allocated by torch while `fn()` runs, above what was live before, in MiB."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # On CPU the profiler attributes each allocation to the op that made it (self memory)
    # and each free outside an op to a "[memory]" event; replaying them in time order gives
    # the peak (temporaries allocated and freed inside one op are not seen).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _synchronized(fn):
    """On CUDA, time the kernels rather than their asynchronous launch."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def record(benchmark, impl: str, group: str, fn) -> None:
    """Tag, measure peak memory once, then time `fn` with pytest-benchmark."""
    fn = _synchronized(fn)
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["device"] = str(DEVICE)
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory_mb(fn), 3)
    benchmark(fn)


def implementations(public_op, reference_op) -> dict:
    """The timed versions of an op, each `factory(**settings) -> callable`: the public op on
    the fused backend, the eager reference, and torch.compile of the reference (compiled
    once per setting)."""

    def fused(**settings):
        def run(*inputs):
            with piumr_kernels.use_backend(FUSED_BACKEND):
                return public_op(*inputs, **settings)

        return run

    @functools.cache
    def compiled(**settings):
        return torch.compile(functools.partial(reference_op, **settings), dynamic=False)

    return {
        "fused": fused,
        "eager": lambda **settings: functools.partial(reference_op, **settings),
        "compiled": compiled,
    }
