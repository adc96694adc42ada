"""tools/bench_table.py: ratios against the baselines of the same run, and the run's own noise."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_table


def _bench(group, impl, median_s, iqr_s):
    return {
        "group": group,
        "extra_info": {"impl": impl, "peak_mem_mb": 1.0},
        "stats": {"median": median_s, "iqr": iqr_s},
    }


def test_ratios_and_noisy_rows(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    _bench("quiet op", "fused", 0.002, 0.0001),
                    _bench("quiet op", "eager", 0.010, 0.0002),
                    _bench("quiet op", "compiled", 0.004, 0.0001),
                    _bench("busy op", "fused", 0.001, 0.0005),
                    _bench("busy op", "eager", 0.003, 0.0001),
                ]
            }
        )
    )
    table = bench_table.render(bench_table.load_groups(str(path)))
    quiet = next(line for line in table.splitlines() if line.startswith("| quiet op"))
    assert "| 5.0x | 2.0x |" in quiet and quiet.endswith("| 5% |")
    busy = next(line for line in table.splitlines() if line.startswith("| busy op"))
    assert "| 3.0x |  |" in busy and busy.endswith("| 50% |")
    assert table.splitlines()[-1].startswith("Warning: 1 row(s)") and table.endswith(": busy op")
