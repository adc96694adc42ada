"""The ahead-of-time GPU check: every Triton kernel variant of every op compiles for sm_80
and sm_90 with no register spills (tools/triton_static_check.py, run as a user would)."""

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


def _variant_names() -> list[str]:
    """Names of every op's `aot_variants()`, read in a subprocess without the interpreter
    (under TRITON_INTERPRET the kernels are Python functions, but the names are the same)."""
    import piumr_kernels

    names = []
    for module_info in pkgutil.iter_modules(piumr_kernels.__path__, "piumr_kernels."):
        module_name = module_info.name + ".triton_kernels"
        if module_info.ispkg and importlib.util.find_spec(module_name) is not None:
            names += [variant.name for variant in importlib.import_module(module_name).aot_variants()]
    return names


def test_every_variant_compiles_without_spills():
    test_only = ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")  # set by conftest for the interpreter
    environment = {key: value for key, value in os.environ.items() if key not in test_only}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "triton_static_check.py")],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    table_rows = {tuple(cell.strip() for cell in line.split("|")[1:3])
                  for line in completed.stdout.splitlines() if line.startswith("| ")}
    names = _variant_names()
    assert any(name.startswith("sinkhorn.") for name in names)
    missing = [(name, arch) for name in names for arch in ARCHS if (name, arch) not in table_rows]
    assert not missing, f"variants missing from the table: {missing[:10]}"
    assert "| SPILL |" not in completed.stdout and "COMPILE ERROR" not in completed.stdout
