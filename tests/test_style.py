"""The code follows the project's formatter and linter configurations (pyproject.toml [tool.ruff], .clang-format)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    """The tool installed next to this interpreter (the test extra), else the system's."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert found, f"{name} is needed to check the code style (pip install -e '.[test]')"
    return found


def _run(command):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{' '.join(command[:3])} ... failed:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
    )


def test_python_is_ruff_clean():
    _run([_tool("ruff"), "check", "--no-cache", "."])


def test_python_is_ruff_formatted():
    _run([_tool("ruff"), "format", "--no-cache", "--check", "."])


def test_cpp_is_clang_formatted():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.suffix in {".cpp", ".h"})
    assert sources, "no C++ sources found in csrc/"
    _run([_tool("clang-format"), "--dry-run", "--Werror", *sources])
