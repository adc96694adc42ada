"""Builds piumr_kernels._C from csrc/*.cpp against the torch already installed.

torch is needed at build time and must be the one the extension runs with (C++ ABI), so
install torch first and build without isolation:
    pip install torch==2.13.0 && pip install --no-build-isolation -e .
"""

import glob
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "piumr_kernels builds its C++ extension against the installed torch, and none was found.\n"
        "Install torch first, then build without isolation:\n"
        "    pip install torch==2.13.0 && pip install --no-build-isolation -e ."
    )

extension = CppExtension(
    name="piumr_kernels._C",
    sources=sorted(glob.glob("csrc/*.cpp")),
    extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-math-errno"]},
    extra_link_args=["-fopenmp"],
)

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
