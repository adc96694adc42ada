"""TFAM at X3D stage shapes: fused ops vs the reference backend vs torch.compile of it, and its memory floor.

Implementations (`benchmark.extra_info["impl"]`):
- fused: TFAM on the default backend (cpp on CPU, triton on CUDA);
- eager: TFAM on the reference backend (plain PyTorch ops);
- compiled: `torch.compile` of TFAM on the reference backend;
- floor: the passes over `x` that TFAM cannot avoid. Forward: one `x.sum()` (the statistics
  read) plus one `x * 2` (the combining read and write). fwd+bwd adds the backward's
  `dot(dout, x)` (the scale-gradient reductions) and `dout * 2` (writing `dx`).
The module runs in training mode (fresh noise, the perturbed branch of the consistency
fusion), the configuration of a training step.
"""

import pytest
import torch

from piumr_kernels import use_backend
from models.tfam import TFAM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, C, T, H, W): X3D-XS/M res2 and res3 outputs at 112x112 input, 16 frames.
SHAPES = [(4, 24, 16, 28, 28), (4, 48, 16, 14, 14)]
MODES = ["fwd", "fwd+bwd"]
IMPLS = ["fused", "eager", "compiled", "floor"]


def _synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _floor_step(x, grad, mode):
    def step():
        x.sum()
        out = x * 2
        if mode == "fwd+bwd":
            torch.dot(grad.view(-1), x.view(-1))
            out = grad * 2
        _synchronize()
        return out

    return step


def _tfam_step(module, x, grad, mode):
    def step():
        if mode == "fwd":
            with torch.no_grad():
                out = module(x)
        else:
            out = module(x)
            out.backward(grad)
            x.grad = None
        _synchronize()
        return out

    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tfam(benchmark, shape, mode, impl):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, requires_grad=(mode == "fwd+bwd" and impl != "floor"))
    grad = torch.randn(shape, device=DEVICE)
    benchmark.group = f"tfam {'x'.join(map(str, shape))} {mode}"
    benchmark.extra_info["impl"] = impl
    if impl == "floor":
        benchmark(_floor_step(x.detach(), grad, mode))
        return
    module = TFAM(shape[1], shape[2]).to(DEVICE).train()
    if impl == "compiled":
        torch._dynamo.reset()
        module = torch.compile(module, fullgraph=True)
    backend = "auto" if impl == "fused" else "reference"
    with use_backend(backend):
        step = _tfam_step(module, x, grad, mode)
        step()  # compile / warm up outside the timing
        benchmark(step)
