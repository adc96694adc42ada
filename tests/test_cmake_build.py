"""The CMake build (CMakeLists.txt) compiles the same csrc/ sources into a loadable library."""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Runs without importing piumr_kernels, whose own extension would register the same ops.
CHECK = """
import sys, torch
torch.ops.load_library(sys.argv[1])
K = torch.rand(5, 6, 7, dtype=torch.float64) + 0.1
P, _, _ = torch.ops.piumr_kernels.sinkhorn_cpp(K, 3, 0.0, False, 1.0, 6 / 7, False)
expected = K.clone()
for _ in range(3):
    expected = expected / expected.sum(-1, keepdim=True)
    expected = expected * (6 / 7) / expected.sum(-2, keepdim=True)
torch.testing.assert_close(P, expected)
print("isa", torch.ops.piumr_kernels.cpu_isa())
"""


def _tool(name):
    """The tool installed next to this interpreter (the test extra), else the system's."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert found, f"{name} is needed to check the CMake build (pip install {name})"
    return found


def test_cmake_build_compiles_and_loads(tmp_path):
    cmake = _tool("cmake")
    build = tmp_path / "build"
    configure = [
        cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    result = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (library,) = glob.glob(str(build / "_C*.so"))
    # A fresh interpreter: the ops must not already be registered by the setup.py build.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run(
        [sys.executable, "-c", CHECK, library], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert "isa" in loaded.stdout
