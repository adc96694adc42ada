"""Shared test set-up: Triton runs through its interpreter when there is no GPU, with FP
fusion pinned so results do not depend on the machine; outputs can be poisoned."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

import pytest

from piumr_kernels import backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends() -> list:
    """Every backend, each skipped with its reason where it cannot run on DEVICE."""
    params = []
    for name in backends.BACKENDS:
        reason = backends._availability(name, torch.device(DEVICE))
        params.append(pytest.param(name, marks=pytest.mark.skipif(bool(reason), reason=reason or "")))
    return params


@pytest.fixture(params=available_backends())
def backend(request):
    with backends.use_backend(request.param):
        yield request.param


@pytest.fixture
def poisoned_empty():
    """Make torch.empty (Python and C++) fill new float memory with NaN, so any output
    element a kernel forgets to write shows up as NaN."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture(autouse=True)
def exact_girl_fp32_products():
    """GIRL's Triton fp32 products run exact ("ieee") so the suite's fp32 tolerances hold on
    a GPU too; tests/test_girl.py checks the TF32 default against its own tolerance."""
    from piumr_kernels.girl import set_triton_fp32_precision, triton_fp32_precision

    saved = triton_fp32_precision()
    set_triton_fp32_precision("ieee")
    yield
    set_triton_fp32_precision(saved)
