"""models/ as a package of the project: its scripts run by path without shadowing other
modules, and it uses only the public API of piumr_kernels."""

import ast
import subprocess
import sys
from pathlib import Path

import piumr_kernels

MODELS = Path(__file__).resolve().parents[1] / "models"
# What `python models/train.py` can import as a top-level name: sys.path[0] is models/ then.
TOP_LEVEL_NAMES = sorted({p.stem for p in MODELS.glob("*.py")} | {p.parent.name for p in MODELS.glob("*/__init__.py")})


def test_no_name_in_models_shadows_another_module():
    # Asked of a fresh interpreter (-P: neither the working directory nor a script folder on
    # its path), as the user's environment has it; pytest's own sys.path holds tests/.
    code = (
        "import importlib.util, sys; names = sys.argv[1:]; "
        "print(' '.join(n for n in names if n in sys.stdlib_module_names or importlib.util.find_spec(n)))"
    )
    names = [name for name in TOP_LEVEL_NAMES if name != "__init__"]
    found = subprocess.run(
        [sys.executable, "-P", "-c", code, *names], capture_output=True, text=True, timeout=60, check=True, cwd="/"
    ).stdout.split()
    assert not found, f"models/ holds {found}, which a script run from models/ would import instead"


def test_a_script_run_by_path_imports_models_only_as_a_package():
    # -X importtime lists every module the run imports, by its full name.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(MODELS / "train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    imported = {
        line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "models.training.cli" in imported
    assert not imported & set(TOP_LEVEL_NAMES), "a module of models/ was imported under a top-level name"


def test_models_use_only_the_public_api_of_piumr_kernels():
    private = []
    for path in sorted(MODELS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("piumr_kernels"):
                names = [alias.name for alias in node.names]
                if node.module != "piumr_kernels" or not set(names) <= set(piumr_kernels.__all__):
                    private.append(f"{path.relative_to(MODELS.parent)}: from {node.module} import {', '.join(names)}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("piumr_kernels.") for a in node.names):
                private.append(f"{path.relative_to(MODELS.parent)}: import {', '.join(a.name for a in node.names)}")
    assert not private, "models/ imports names outside piumr_kernels.__all__:\n" + "\n".join(private)
