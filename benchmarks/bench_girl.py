"""GIRL loss: the fused backend vs the eager reference and torch.compile(reference).

Every implementation draws a fresh random partition per call (as training does), so the
timings include the permutation. Shapes: the paper's batch on X3D's 2048-d head features,
a larger batch with more groups, and one large group (in-batch contrastive, streaming path).
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, implementations, record

import piumr_kernels
from piumr_kernels.girl.op import random_partition
from piumr_kernels.girl.reference import girl_loss_reference

# (B, C, G)
SHAPES = [(80, 2048, 4), (1024, 2048, 8), (4096, 256, 1)]
NUM_CLASSES = 52  # MA-52


def _reference(features, labels, num_groups):
    order, offsets = random_partition(features.shape[0], num_groups, features.device)
    loss, _, _ = girl_loss_reference(features, labels, order, offsets)
    return loss


IMPLS = implementations(piumr_kernels.girl_loss, _reference)


def _inputs(batch, width, requires_grad):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, width, generator=generator).to(DEVICE)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(DEVICE)
    return features.requires_grad_(requires_grad), labels


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-C{s[1]}-G{s[2]}")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_girl(benchmark, impl, shape, mode):
    batch, width, num_groups = shape
    op = IMPLS[impl](num_groups=num_groups)
    features, labels = _inputs(batch, width, requires_grad=mode == "fwd+bwd")

    if mode == "fwd":

        def step():
            with torch.no_grad():
                return op(features, labels)
    else:

        def step():
            return torch.autograd.grad(op(features, labels), features)

    step()  # warm-up: compilation, extension start-up
    record(benchmark, impl, f"girl B={batch} C={width} G={num_groups} {mode}", step)
