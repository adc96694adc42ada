"""DCT filter bank with stats: the fused backend vs the eager reference, torch.compile(reference)
and the memory floor (one `x.sum()` pass over the same input, impl "floor").

Shapes are X3D-M's stages at 16x224x224 with batch 8 (res2..res5). The eager reference is
the straightforward HDF form (temporal mean, then Conv2d with each filter repeated over the
C input channels); the fused op reads x once and filters the channel sum.
"""

from __future__ import annotations

import functools

import pytest
import torch
from harness import DEVICE, FUSED_BACKEND, record

import piumr_kernels
from piumr_kernels.dct.reference import dct_filter_bank_reference

KERNEL_SIZE = 7
SHAPES = [(8, 24, 16, 56, 56), (8, 48, 16, 28, 28), (8, 96, 16, 14, 14), (8, 192, 16, 7, 7)]


def _fused(x):
    with piumr_kernels.use_backend(FUSED_BACKEND):
        return piumr_kernels.dct_filter_bank(x, KERNEL_SIZE, return_stats=True)


def _eager(x):
    return dct_filter_bank_reference(x, KERNEL_SIZE, return_stats=True)


@functools.cache
def _compiled():
    return torch.compile(_eager, dynamic=False)


IMPLS = {
    "fused": lambda: _fused,
    "eager": lambda: _eager,
    "compiled": _compiled,
    "floor": lambda: torch.sum,
}


def _inputs(shape, requires_grad):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(DEVICE)
    batch, _, _, height, width = shape
    n_filters = KERNEL_SIZE**2
    grads = (
        torch.randn(batch, n_filters, height, width, generator=generator).to(DEVICE),
        torch.randn(batch, n_filters, generator=generator).to(DEVICE),
        torch.randn(batch, n_filters, generator=generator).to(DEVICE),
    )
    return x.requires_grad_(requires_grad), grads


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_dct_filter_bank(benchmark, impl, shape, mode):
    op = IMPLS[impl]()
    x, grads = _inputs(shape, requires_grad=mode == "fwd+bwd" and impl != "floor")

    if mode == "fwd" or impl == "floor":

        def step():
            with torch.no_grad():
                return op(x)
    else:

        def step():
            return torch.autograd.grad(op(x), x, grads)

    step()  # warm-up: compilation, extension start-up
    record(benchmark, impl, f"dct {'x'.join(map(str, shape))} {mode}", step)
