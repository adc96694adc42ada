"""The ahead-of-time GPU check (tools/triton_static_check.py, run as a user would): every binary
triton's JIT builds for the launchers' launches at the covered shapes compiles for sm_80 and
sm_90 with no spills, every launch maps to a declared variant, and the covered shapes include
the benchmarks' shapes."""

import ast
import importlib
import importlib.util
import json
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


def _static_check_environment(*paths) -> dict:
    test_only = ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")  # set by conftest for the interpreter
    environment = {key: value for key, value in os.environ.items() if key not in test_only}
    environment["PYTHONPATH"] = os.pathsep.join(map(str, filter(None, [*paths, ROOT, environment.get("PYTHONPATH")])))
    return environment


@pytest.mark.slow  # compiles every variant for two archs: minutes from a cold triton cache
def test_every_launched_specialization_compiles_without_spills():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "triton_static_check.py")],
        cwd=ROOT,
        env=_static_check_environment(),
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


# An op module with one autotuned kernel of two configs, its aot_variants() declaring the
# configs listed in `DECLARED`; the plan of the static check for every declaration in `_PLAN`.
_AUTOTUNED_OP = """
import torch
import triton
import triton.language as tl

from piumr_kernels.triton_autotune import autotune
from piumr_kernels.triton_variants import autotuned_variants

CONFIGS = [triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=4, num_stages=2)]
DECLARED = [0, 1]


@autotune(CONFIGS, key=["n"])
@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, 2 * tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


def aot_variants():
    variants = autotuned_variants("demo.scale[fp32]", _scale_kernel)
    return [variants[i] for i in DECLARED]


def aot_launches():
    x = torch.empty(1000)
    _scale_kernel[lambda meta: (triton.cdiv(1000, meta["BLOCK"]),)](x, torch.empty_like(x), 1000)
"""

_PLAN = """
import json
import sys

sys.path.insert(0, sys.argv[1])
import autotuned_demo_op
import triton_static_check

plans = {}
for declared in ([0, 1], [0]):
    autotuned_demo_op.DECLARED = declared
    jobs, errors = triton_static_check.plan_jobs([80, 90], "", ["autotuned_demo_op"])
    plans[len(declared)] = {"jobs": sorted({(job.variant.name, job.arch) for job in jobs}), "errors": errors}
print(json.dumps(plans))
"""


def test_every_config_of_an_autotuned_kernel_must_be_a_declared_variant(tmp_path):
    """Every config a GPU can pick is launched under the static check, each mapped to a declared
    variant: a config left out of aot_variants() is an error naming the launch."""
    (tmp_path / "autotuned_demo_op.py").write_text(_AUTOTUNED_OP)
    completed = subprocess.run(
        [sys.executable, "-c", _PLAN, str(ROOT / "tools")],
        cwd=tmp_path,
        env=_static_check_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    plans = json.loads(completed.stdout.splitlines()[-1])
    names = ["demo.scale[fp32,BLOCK=64,warps=2,stages=3]", "demo.scale[fp32,BLOCK=128,warps=4,stages=2]"]
    assert plans["2"] == {"jobs": sorted([name, arch] for name in names for arch in (80, 90)), "errors": []}
    assert plans["1"]["jobs"] == [[names[0], 80], [names[0], 90]]
    assert len(plans["1"]["errors"]) == 2, plans["1"]["errors"]  # one per arch
    for error in plans["1"]["errors"]:
        assert "a launch of _scale_kernel" in error and "'BLOCK': 128" in error, error
        assert "num_warps=4, num_stages=2" in error and "matches 0 aot_variants() entries" in error, error


@pytest.fixture
def static_check():
    """tools/triton_static_check.py as a module; its import removes the interpreter settings
    (for its own compiles), which the rest of this process still needs."""
    saved = {key: os.environ[key] for key in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION") if key in os.environ}
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        yield importlib.import_module("triton_static_check")
    finally:
        sys.path.remove(str(ROOT / "tools"))
        os.environ.update(saved)


def test_markdown_with_a_filter_replaces_only_the_matching_rows(static_check, tmp_path):
    Result = static_check.Result

    def result(name, tag, arch, registers, stack=0):
        return Result(name, tag, arch, {"REG": registers, "SHARED": 0, "STACK": stack, "LOCAL": 0}, 1024)

    path = tmp_path / "table.md"
    markers = f"{static_check.BEGIN_MARKER}\n{static_check.END_MARKER}"
    path.write_text(f"# Static check\n\nprose before\n\n{markers}\n\nprose after\n")
    old = [
        result("dct.a[fp32]", "", 80, 40),
        result("dct.a[fp32]", "", 90, 41),
        result("sinkhorn.b[fp32]", "n%16", 80, 50),
        result("sinkhorn.b[fp32]", "n%16", 90, 51, stack=8),
        Result("tfam.c[bf16]", "", 90, error="CompilationError: at 1:2"),
    ]
    static_check.write_markdown(path, old, [80, 90])
    assert static_check.parse_table(path.read_text()) == old

    new = [result("dct.a[fp32,warps=8]", "", 80, 60), result("dct.a[fp32,warps=8]", "", 90, 61)]
    static_check.write_markdown(path, new, [80, 90], "dct")
    text = path.read_text()
    assert text.startswith("# Static check\n\nprose before\n") and text.endswith("\nprose after\n")
    assert static_check.parse_table(text) == new + old[2:]
    assert "\n3 variants, " in text and " = 5 compiles (1 failed)" in text
    assert "sm_80: max 60 registers, 0 spilling; sm_90: max 61 registers, 1 spilling" in text
