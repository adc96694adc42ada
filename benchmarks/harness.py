"""Shared benchmark helpers: peak-memory measurement, tagging, and the fused-backend choice.

Each benchmark sets `benchmark.group` ("<op> <shape> <fwd|fwd+bwd>") and
`benchmark.extra_info["impl"]` ("fused", "eager", "compiled" or "floor"), so
tools/bench_table.py can turn a `--benchmark-json` file into ratio tables.
"""

from __future__ import annotations

import torch

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


def record(benchmark, impl: str, group: str, fn) -> None:
    """Tag, measure peak memory once, then time `fn` with pytest-benchmark."""
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["device"] = str(DEVICE)
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory_mb(fn), 3)
    benchmark(fn)
