"""PIUmr vs plain X3D: model size, FLOPs and training-step time (issue 5 targets).

Implementations (`benchmark.extra_info["impl"]`), the same in both groups:
- floor: plain X3D (no TFAM) with cross-entropy, what PIUmr adds its cost to;
- fused: PIUmr (TFAM after res2..res5, CE + GIRL) on the default backend (cpp on CPU,
  triton on CUDA);
- eager: the same PIUmr on the reference backend (plain PyTorch ops).

`size` (X3D-M / PIUmr-M, 1 x 16x224x224, eval forward): parameters and FLOPs in
`extra_info`, FLOPs from `torch.utils.flop_counter.FlopCounterMode`, which counts
convolutions, matrix products and attention (2 FLOPs per multiply-add) and no element-wise
work (BN, activations, TFAM's pooling and gating). Counted on the reference backend, where
TFAM's DCT bank and affinity products are plain PyTorch ops the counter sees.
`train-step` (X3D-XS / PIUmr-XS, batch 4, 16x112x112): forward, loss, backward and an
AdamW step, training mode. Targets: fused <= 1.15x floor, and fused faster than eager.
GIRL needs 2 samples per pseudo-group, so the batch of 4 uses 2 groups. Each benchmark
also records `peak_mem_mb` (benchmarks/harness.py) and the torch thread count.
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, FUSED_BACKEND, record
from torch.utils.flop_counter import FlopCounterMode

from models.modelling.piumr import PIUmrLoss, build_piumr
from piumr_kernels import use_backend

IMPLS = ["floor", "fused", "eager"]
NUM_CLASSES = 52  # MA-52
BACKEND = {"floor": "auto", "fused": FUSED_BACKEND, "eager": "reference"}


def _synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _model(preset: str, impl: str, num_frames: int):
    torch.manual_seed(0)
    return build_piumr(preset, NUM_CLASSES, tfam=impl != "floor", num_frames=num_frames).to(DEVICE)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("impl", IMPLS)
def test_size_m_16x224(benchmark, impl):
    model = _model("M", impl, 16).eval()
    x = torch.randn(1, 3, 16, 224, 224, device=DEVICE)
    with torch.no_grad(), use_backend("reference"):
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    per_module = counter.get_flop_counts()
    tfam_flops = sum(sum(per_module[f"PIUmr.tfam.{stage}"].values()) for stage in model.tfam)
    benchmark.extra_info.update(
        {
            "params": _parameters(model),
            "params_tfam": _parameters(model.tfam),
            "gflops": counter.get_total_flops() / 1e9,
            "gflops_tfam": tfam_flops / 1e9,
        }
    )

    def forward():
        with torch.no_grad(), use_backend(BACKEND[impl]):
            model(x)
        _synchronize()

    record(benchmark, impl, "models size M 1x16x224x224 fwd", forward)


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_xs_b4_16x112(benchmark, impl):
    model = _model("XS", impl, 16).train()
    criterion = PIUmrLoss(girl=impl != "floor", **({"num_groups": 2} if impl != "floor" else {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 112, 112, generator=generator).to(DEVICE)
    labels = torch.tensor([0, 0, 1, 2]).to(DEVICE)
    benchmark.extra_info["threads"] = torch.get_num_threads()

    def step():
        with use_backend(BACKEND[impl]):
            optimizer.zero_grad(set_to_none=True)
            logits, features = model(x)
            loss, _ = criterion(logits, features, labels)
            loss.backward()
            optimizer.step()
        _synchronize()

    step()  # warm up (lazy optimizer state) outside the timing
    record(benchmark, impl, "models train-step XS 4x16x112x112 fwd+bwd", step)
