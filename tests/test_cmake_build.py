"""The CMake build (CMakeLists.txt) compiles the same csrc/ sources into a loadable library.

What this proves is the CMake side: Torch, Python and OpenMP are found, every csrc/*.cpp
compiles with CMake's include paths and definitions, the library links against libtorch and
loads in a fresh interpreter, and its ops compute. It builds without optimization
(CMAKE_BUILD_TYPE=Debug): the optimized build only adds -O3, which the pip build of the same
sources with the same flags (the library every other test runs) already exercises, and -O3
costs ~4x the compile time (dct.cpp: 16 s of CPU at -O0, 63 s at -O3; this whole build takes
~110 s of CPU). The build directory, build/cmake-test/<python>-torch<version>/, persists
between runs, so a rerun recompiles only what changed; a fresh clone builds it all (see
docs/development.md).
"""

import fcntl
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cmake-test" / f"{sys.implementation.cache_tag}-torch{torch.__version__}"

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


@pytest.mark.slow
def test_cmake_build_compiles_and_loads(tmp_path):
    cmake = _tool("cmake")
    BUILD.mkdir(parents=True, exist_ok=True)
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(BUILD),
        "-G",
        "Ninja",
        "-DCMAKE_BUILD_TYPE=Debug",
        # without Debug's -g: debug information is not what this checks, and costs compile time.
        "-DCMAKE_CXX_FLAGS_DEBUG=-O0",
        f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    # Another test run in the same checkout waits instead of building into the same directory.
    with open(BUILD / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        configured = subprocess.run(configure, check=False, capture_output=True, text=True)
        assert configured.returncode == 0, configured.stdout[-4000:] + configured.stderr[-4000:]
        result = subprocess.run([cmake, "--build", str(BUILD)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (library,) = glob.glob(str(BUILD / "_C*.so"))
    # A fresh interpreter: the ops must not already be registered by the package's own build.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run(
        [sys.executable, "-c", CHECK, library], check=False, capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert "isa" in loaded.stdout
