"""Sinkhorn–Knopp: the fused backend vs the eager reference and torch.compile(reference)."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, implementations, record

import piumr_kernels
from piumr_kernels.sinkhorn_knopp.reference import sinkhorn_reference

# (batch, N, M, n_iters): TFAM (80 clips x 2 maps), hyper-connection mixing, two larger tiers.
SHAPES = [(160, 16, 16, 3), (65536, 4, 4, 20), (256, 64, 64, 3), (32, 128, 128, 3)]


IMPLS = implementations(piumr_kernels.sinkhorn, sinkhorn_reference)


def _inputs(batch, n, m, requires_grad):
    generator = torch.Generator().manual_seed(0)
    K = torch.rand(batch, n, m, generator=generator).add_(0.05).to(DEVICE)
    grad = torch.randn(batch, n, m, generator=generator).to(DEVICE)
    return K.requires_grad_(requires_grad), grad


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-it{s[3]}")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_sinkhorn(benchmark, impl, shape, mode):
    batch, n, m, n_iters = shape
    op = IMPLS[impl](n_iters=n_iters)
    K, grad = _inputs(batch, n, m, requires_grad=mode == "fwd+bwd")

    if mode == "fwd":

        def step():
            with torch.no_grad():
                return op(K)
    else:

        def step():
            return torch.autograd.grad(op(K), K, grad)

    step()  # warm-up: compilation, extension start-up
    record(benchmark, impl, f"sinkhorn {batch}x{n}x{m} it{n_iters} {mode}", step)
