"""Turn a pytest-benchmark JSON file into a markdown table of speed-ups for the README.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python tools/bench_table.py bench.json

Each row is one benchmark group ("<op> <shape> <mode>"); the ratios are the baseline's
median time over the fused median (above 1 means the fused backend is faster), and for the
memory floor the fused median over the floor's (how far from reading the input once).
"spread" is the largest interquartile range over median among the row's timings: the run's
own noise. Rows whose spread exceeds NOISY_SPREAD are listed under the table, since their
ratios cannot be trusted (on a loaded machine every two-thread OpenMP region stalls).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

BASELINES = ("eager", "compiled")
NOISY_SPREAD = 0.25


def load_groups(path: str) -> dict[str, dict[str, dict]]:
    with open(path) as handle:
        data = json.load(handle)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        impl = bench.get("extra_info", {}).get("impl")
        if impl is None or bench.get("group") is None:
            continue
        groups[bench["group"]][impl] = {
            "median_ms": bench["stats"]["median"] * 1e3,
            "spread": bench["stats"]["iqr"] / bench["stats"]["median"],
            "peak_mem_mb": bench["extra_info"].get("peak_mem_mb"),
        }
    return groups


def _ms(entry: dict | None) -> str:
    return "" if entry is None else f"{entry['median_ms']:.3f}"


def _mem(entry: dict | None) -> str:
    if entry is None or entry.get("peak_mem_mb") is None:
        return ""
    return f"{entry['peak_mem_mb']:.1f}"


def render(groups: dict[str, dict[str, dict]]) -> str:
    header = (
        "| benchmark | fused ms | eager ms | compiled ms | floor ms | vs eager | vs compiled "
        "| fused / floor | peak MiB fused | peak MiB eager | spread |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    noisy = []
    for group in sorted(groups):
        impls = groups[group]
        fused = impls.get("fused")
        ratios = []
        for name in BASELINES:
            base = impls.get(name)
            ratios.append(f"{base['median_ms'] / fused['median_ms']:.1f}x" if fused and base else "")
        floor = impls.get("floor")
        floor_ratio = f"{fused['median_ms'] / floor['median_ms']:.2f}" if fused and floor else ""
        spread = max(entry["spread"] for entry in impls.values())
        if spread > NOISY_SPREAD:
            noisy.append(group)
        lines.append(
            f"| {group} | {_ms(fused)} | {_ms(impls.get('eager'))} | {_ms(impls.get('compiled'))} "
            f"| {_ms(floor)} | {ratios[0]} | {ratios[1]} | {floor_ratio} | {_mem(fused)} "
            f"| {_mem(impls.get('eager'))} | {spread:.0%} |"
        )
    if noisy:
        lines.append(
            f"\nWarning: {len(noisy)} row(s) with a spread above {NOISY_SPREAD:.0%} (the machine was busy); "
            f"do not trust their ratios: {', '.join(noisy)}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file", help="output of pytest --benchmark-json")
    args = parser.parse_args()
    print(render(load_groups(args.json_file)))


if __name__ == "__main__":
    main()
