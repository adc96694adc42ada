"""piumr_kernels installs as pure Python: its C++ extension (csrc/) is compiled on first
import against the torch that loads it (piumr_kernels/_extension.py), so a plain
`pip install -e .` never needs torch at build time.

PIUMR_BUILD_AOT=1 compiles the extension now instead, into piumr_kernels/, against the
torch of the installing environment; pip must then build without isolation so that this is
the environment's torch:
    PIUMR_BUILD_AOT=1 pip install --no-build-isolation -e .
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _aot_extension():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        sys.exit(
            "PIUMR_BUILD_AOT=1 compiles the C++ extension against the torch of the build "
            "environment, and this one has none: pip builds in an isolated environment "
            "unless told not to. Install torch first, then:\n"
            "    PIUMR_BUILD_AOT=1 pip install --no-build-isolation -e .\n"
            "(Without PIUMR_BUILD_AOT, a plain `pip install -e .` works and the extension "
            "is compiled on first import.)"
        )
    # The loader's module names the sources and flags; loaded by path, without the package
    # (whose __init__ would import torch and load the extension).
    spec = importlib.util.spec_from_file_location("_piumr_extension", ROOT / "piumr_kernels" / "_extension.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    extension = CppExtension(
        name=f"piumr_kernels.{build.LIBRARY_NAME}",
        sources=[str(p.relative_to(ROOT)) for p in build.compiled_sources(ROOT / "csrc")],
        extra_compile_args={"cxx": build.CXX_FLAGS},
        extra_link_args=build.LD_FLAGS,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**(_aot_extension() if os.environ.get("PIUMR_BUILD_AOT") == "1" else {}))
