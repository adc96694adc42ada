"""TFAM at X3D stage shapes: fused ops vs the reference backend vs torch.compile of it, and its memory floor.

Implementations (`benchmark.extra_info["impl"]`):
- fused: TFAM on the fused backend (cpp on CPU, triton on CUDA);
- eager: TFAM on the reference backend (plain PyTorch ops);
- compiled: `torch.compile(fullgraph=True)` of TFAM on the reference backend;
- floor: the passes over `x` that TFAM cannot avoid. Forward: one `x.sum()` (the statistics
  read) plus one `x * 2` (the combining read and write). fwd+bwd adds the backward's
  `dot(dout, x)` (the scale-gradient reductions) and `dout * 2` (writing `dx`).
The module runs in training mode (fresh noise, the perturbed branch of the consistency
fusion), the configuration of a training step.
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, FUSED_BACKEND, record

from models.modelling.tfam import TFAM
from piumr_kernels import use_backend

# (B, C, T, H, W): X3D-XS/M res2 and res3 outputs at 112x112 input, 16 frames.
SHAPES = [(4, 24, 16, 28, 28), (4, 48, 16, 14, 14)]


def _floor_step(x, grad, mode):
    def step():
        x.sum()
        out = x * 2
        if mode == "fwd+bwd":
            torch.dot(grad.view(-1), x.view(-1))
            out = grad * 2
        return out

    return step


def _tfam_step(module, backend, x, grad, mode):
    def step():
        with use_backend(backend):
            if mode == "fwd":
                with torch.no_grad():
                    return module(x)
            return torch.autograd.grad(module(x), x, grad)

    return step


@pytest.mark.parametrize("impl", ["fused", "eager", "compiled", "floor"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_tfam(benchmark, impl, shape, mode):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE)
    grad = torch.randn(shape, device=DEVICE)
    group = f"tfam {'x'.join(map(str, shape))} {mode}"
    if impl == "floor":
        record(benchmark, impl, group, _floor_step(x, grad, mode))
        return
    module = TFAM(shape[1], shape[2]).to(DEVICE).train()
    if impl == "compiled":
        torch._dynamo.reset()
        module = torch.compile(module, fullgraph=True)
    x.requires_grad_(mode == "fwd+bwd")
    step = _tfam_step(module, FUSED_BACKEND if impl == "fused" else "reference", x, grad, mode)
    step()  # warm-up: compilation, extension start-up
    record(benchmark, impl, group, step)
