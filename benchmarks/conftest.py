"""Benchmarks time the real kernels: on a machine without CUDA the fused backend is the C++
one, and Triton's interpreter (which tests/ turns on) stays off here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.pop("TRITON_INTERPRET", None)
