"""The ahead-of-time GPU check (tools/triton_static_check.py, run as a user would): every binary
triton's JIT builds for the launchers' launches at the covered shapes compiles for sm_80 and
sm_90 with no spills, every launch maps to a declared variant, and the covered shapes include
the benchmarks' shapes."""

import ast
import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")
BENCHMARKS = {
    "sinkhorn_knopp": "bench_sinkhorn",
    "dct": "bench_dct",
    "girl": "bench_girl",
    "tfam_pooling": "bench_tfam",
}


def _op_modules() -> dict:
    """Every op's `triton_kernels` module (imported under the interpreter: the declared
    variants and shapes are the same, only the kernels are Python functions)."""
    import piumr_kernels

    modules = {}
    for module_info in pkgutil.iter_modules(piumr_kernels.__path__, "piumr_kernels."):
        module_name = module_info.name + ".triton_kernels"
        if module_info.ispkg and importlib.util.find_spec(module_name) is not None:
            modules[module_info.name.split(".")[-1]] = importlib.import_module(module_name)
    return modules


@pytest.mark.slow  # compiles every variant for two archs: minutes from a cold triton cache
def test_every_launched_specialization_compiles_without_spills():
    test_only = ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")  # set by conftest for the interpreter
    environment = {key: value for key, value in os.environ.items() if key not in test_only}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "triton_static_check.py")],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    rows = [
        tuple(cell.strip() for cell in line.split("|")[1:4])
        for line in completed.stdout.splitlines()
        if line.startswith("| ") and "| arch |" not in line
    ]
    assert "| SPILL |" not in completed.stdout and "COMPILE ERROR" not in completed.stdout
    binaries = {(name, tag) for name, tag, _ in rows}
    missing_arch = [(name, tag, arch) for name, tag in binaries for arch in ARCHS if (name, tag, arch) not in rows]
    assert not missing_arch, f"binaries compiled for one arch only: {missing_arch[:10]}"
    names = [variant.name for module in _op_modules().values() for variant in module.aot_variants()]
    assert any(name.startswith("sinkhorn.") for name in names)
    missing = sorted(set(names) - {name for name, _ in binaries})
    assert not missing, f"declared variants missing from the table: {missing[:10]}"


def _benchmark_shapes(benchmark: str) -> list:
    """`SHAPES` of benchmarks/<benchmark>.py, read without importing it (it needs the harness)."""
    tree = ast.parse((ROOT / "benchmarks" / f"{benchmark}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "SHAPES" for target in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"benchmarks/{benchmark}.py has no SHAPES list")


@pytest.mark.parametrize("op", sorted(BENCHMARKS))
def test_covered_shapes_include_the_benchmark_shapes(op):
    """The static check compiles what the benchmarks run: their shapes are launched too."""
    shapes = _op_modules()[op].AOT_SHAPES
    missing = [shape for shape in _benchmark_shapes(BENCHMARKS[op]) if tuple(shape) not in map(tuple, shapes)]
    assert not missing, f"benchmark shapes missing from {op}'s AOT_SHAPES: {missing}"
