"""GIRL loss: the fused backend vs the eager reference and torch.compile(reference).

Every implementation draws a fresh random partition per call (as training does), so the
timings include the permutation. Shapes: the paper's batch on X3D's 2048-d head features,
a larger batch with more groups, and one large group (in-batch contrastive, streaming path).
"""

from __future__ import annotations

import functools

import pytest
import torch

import piumr_kernels
from piumr_kernels.girl.op import random_partition
from piumr_kernels.girl.reference import girl_loss_reference

from harness import DEVICE, FUSED_BACKEND, record

# (B, C, G)
SHAPES = [(80, 2048, 4), (1024, 2048, 8), (4096, 256, 1)]
NUM_CLASSES = 52  # MA-52


def _fused(features, labels, num_groups):
    with piumr_kernels.use_backend(FUSED_BACKEND):
        return piumr_kernels.girl_loss(features, labels, num_groups)


def _reference(features, labels, num_groups):
    order, sizes = random_partition(features.shape[0], num_groups, features.device)
    loss, _, _ = girl_loss_reference(features, labels, order, sizes)
    return loss


@functools.lru_cache(maxsize=None)
def _compiled(num_groups):
    return torch.compile(functools.partial(_reference, num_groups=num_groups), dynamic=False)


IMPLS = {
    "fused": lambda num_groups: functools.partial(_fused, num_groups=num_groups),
    "eager": lambda num_groups: functools.partial(_reference, num_groups=num_groups),
    "compiled": _compiled,
}


def _inputs(batch, width, requires_grad):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, width, generator=generator).to(DEVICE)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(DEVICE)
    return features.requires_grad_(requires_grad), labels


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-C{s[1]}-G{s[2]}")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_girl(benchmark, impl, shape, mode):
    batch, width, num_groups = shape
    op = IMPLS[impl](num_groups)
    features, labels = _inputs(batch, width, requires_grad=mode == "fwd+bwd")

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return op(features, labels)
    else:
        def step():
            return torch.autograd.grad(op(features, labels), features)

    step()  # warm-up: compilation, extension start-up
    record(benchmark, impl, f"girl B={batch} C={width} G={num_groups} {mode}", _synchronized(step))
