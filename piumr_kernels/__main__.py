"""`python -m piumr_kernels`: compiles the C++ extension if needed and prints `info()`."""

import piumr_kernels

print(piumr_kernels.info())
