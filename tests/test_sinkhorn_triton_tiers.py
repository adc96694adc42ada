"""Triton Sinkhorn tiers (packed / one matrix / streaming / streaming_wide): tier boundaries and odd sizes.

The all-backend suite (tests/test_sinkhorn.py) covers the common shapes; this file pins
which tier each boundary shape takes and checks that tier against the float64 reference,
forward and backward with a random upstream gradient. Tolerances are relative to the
largest reference magnitude: float32 2e-5 forward / 1e-4 backward, float16 5e-3 / 2e-2,
bfloat16 3e-2 / 1e-1, floored at 1e-6 (the input is rounded to the dtype before the reference sees it, so
they bound only the kernel's float32 arithmetic and the output rounding).
"""

import pytest
import torch

from piumr_kernels import backends, sinkhorn
from piumr_kernels.sinkhorn_knopp.reference import sinkhorn_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_reason = backends._availability("triton", torch.device(DEVICE))
pytestmark = pytest.mark.skipif(bool(_reason), reason=_reason or "")

TOLERANCES = {  # dtype -> (forward, backward), relative to the reference's max magnitude
    torch.float32: (2e-5, 1e-4),
    torch.float16: (5e-3, 2e-2),
    torch.bfloat16: (3e-2, 1e-1),
}

# (batch, N, M, tier the launcher must pick)
BOUNDARY_CASES = [
    (130, 4, 4, "packed"),  # two programs of 64 4x4 matrices, the last one partial
    (1, 8, 8, "packed"),  # largest packed matrix, B=1
    (7, 3, 5, "packed"),  # odd sizes padded to 4x8
    (3, 1, 7, "packed"),
    (2, 9, 9, "one_matrix"),  # just past the packed tier
    (2, 8, 9, "one_matrix"),
    (1, 64, 64, "one_matrix"),  # largest register tile
    (2, 5, 300, "one_matrix"),  # 8x512 tile: wide but small
    (1, 65, 64, "streaming"),  # 128x64 padded tile: first streaming size, partial row tile
    (2, 37, 300, "streaming"),  # several row tiles, the last partial; 512-wide rows
    (1, 1024, 5, "streaming"),  # largest streaming height
    (1, 1025, 5, "streaming_wide"),  # just past it: scale vectors in global memory
    (2, 3, 1100, "streaming_wide"),  # several column tiles, the last partial
]


def _tier(n_rows, n_cols):
    from piumr_kernels.sinkhorn_knopp.triton_kernels import launch_plan

    return launch_plan(n_rows, n_cols).tier


def _inputs(shape, log_domain, dtype, generator):
    if log_domain:
        K = 2.0 * torch.randn(shape, dtype=torch.float64, generator=generator)
    else:
        K = torch.rand(shape, dtype=torch.float64, generator=generator) + 0.01
    upstream = torch.randn(shape, dtype=torch.float64, generator=generator)
    return K.to(dtype).to(DEVICE), upstream.to(DEVICE)


def _check_against_reference(K, upstream, log_domain, n_iters=3, **kwargs):
    forward_tol, backward_tol = TOLERANCES[K.dtype]
    K_fused = K.detach().clone().requires_grad_()
    with backends.use_backend("triton"):
        P = sinkhorn(K_fused, n_iters, log_domain=log_domain, **kwargs)
    P.backward(upstream.to(K.dtype))
    K_ref = K.detach().double().requires_grad_()
    P_ref = sinkhorn_reference(
        K_ref,
        n_iters,
        kwargs.get("eps", 1e-8),
        log_domain,
        kwargs.get("row_sum", 1.0),
        kwargs.get("col_sum"),
    )
    P_ref.backward(upstream)
    assert P.shape == K.shape and P.dtype == K.dtype
    torch.testing.assert_close(P.double(), P_ref.detach(), rtol=0, atol=forward_tol * _scale(P_ref))
    torch.testing.assert_close(K_fused.grad.double(), K_ref.grad, rtol=0, atol=backward_tol * _scale(K_ref.grad))


def _scale(reference):
    """Largest magnitude, floored: with N = 1 the exact gradient is ~0 (P = col_sum for any K)."""
    return max(reference.abs().max().item(), 1e-6)


@pytest.mark.parametrize("batch, n_rows, n_cols, tier", BOUNDARY_CASES)
@pytest.mark.parametrize("log_domain", [False, True], ids=["linear", "log"])
def test_tier_matches_reference(batch, n_rows, n_cols, tier, log_domain, poisoned_empty):
    assert _tier(n_rows, n_cols) == tier
    generator = torch.Generator().manual_seed(batch * 1000 + n_rows * 31 + n_cols)
    K, upstream = _inputs((batch, n_rows, n_cols), log_domain, torch.float32, generator)
    _check_against_reference(K, upstream, log_domain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(33, 4, 4), (2, 12, 20), (1, 70, 40)], ids=["packed", "one_matrix", "streaming"])
@pytest.mark.parametrize("log_domain", [False, True], ids=["linear", "log"])
def test_half_precision_per_tier(dtype, shape, log_domain):
    generator = torch.Generator().manual_seed(7)
    K, upstream = _inputs(shape, log_domain, dtype, generator)
    _check_against_reference(K, upstream, log_domain)


@pytest.mark.parametrize("shape", [(5, 6, 3), (3, 20, 11), (1, 50, 140)], ids=["packed", "one_matrix", "streaming"])
def test_non_contiguous_marginals_and_iterations(shape):
    """A transposed view, non-default marginals, one and many iterations."""
    generator = torch.Generator().manual_seed(11)
    K, upstream = _inputs(shape, False, torch.float32, generator)
    K_t = K.transpose(-1, -2)
    assert not K_t.is_contiguous()
    for n_iters in (1, 7):
        _check_against_reference(K_t, upstream.transpose(-1, -2), False, n_iters=n_iters, row_sum=2.0, col_sum=0.5)
        _check_against_reference(K_t, upstream.transpose(-1, -2), True, n_iters=n_iters, row_sum=2.0)


@pytest.mark.parametrize("shape", [(9, 4, 4), (2, 16, 16), (1, 70, 140)], ids=["packed", "one_matrix", "streaming"])
def test_zero_row_and_column_stay_zero(shape):
    """Linear domain: a zero row/column gives zeros, never NaN, even after enough
    iterations that its scale row_sum/eps^n would overflow float32."""
    generator = torch.Generator().manual_seed(3)
    K, _ = _inputs(shape, False, torch.float32, generator)
    K[:, 1, :] = 0
    K[:, :, 2] = 0
    with backends.use_backend("triton"):
        P = sinkhorn(K, n_iters=8)
    assert torch.isfinite(P).all()
    assert (P[:, 1, :] == 0).all() and (P[:, :, 2] == 0).all()
    torch.testing.assert_close(P.double(), sinkhorn_reference(K.double(), 8), rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch, n_rows, n_cols, tier", BOUNDARY_CASES)
@pytest.mark.parametrize("log_domain", [False, True], ids=["linear", "log"])
def test_forward_without_gradient_matches(batch, n_rows, n_cols, tier, log_domain, poisoned_empty):
    """Without a gradient the kernels store no statistics (a different compiled variant; the
    streaming log domain keeps its potentials elsewhere): P must be bit-identical to the
    forward that stores them, and match the reference."""
    generator = torch.Generator().manual_seed(batch * 977 + n_rows * 13 + n_cols)
    K, _ = _inputs((batch, n_rows, n_cols), log_domain, torch.float32, generator)
    with backends.use_backend("triton"):
        P_no_grad = sinkhorn(K, 4, log_domain=log_domain)
        P_with_stats = sinkhorn(K.clone().requires_grad_(), 4, log_domain=log_domain)
    assert torch.equal(P_no_grad, P_with_stats.detach())
    P_ref = sinkhorn_reference(K.double(), 4, 1e-8, log_domain, 1.0, None)
    torch.testing.assert_close(P_no_grad.double(), P_ref, rtol=0, atol=TOLERANCES[torch.float32][0] * _scale(P_ref))


@pytest.mark.parametrize(
    "batch, n_rows, n_cols, slices",
    [
        (2, 37, 300, (2, 3)),  # streaming: 5 row tiles in slices of 3 and 2
        (1, 1025, 5, (2, 2)),  # streaming_wide (the backward's slices): 3 row tiles, 2 + 1
    ],
)
@pytest.mark.parametrize("log_domain", [False, True], ids=["linear", "log"])
def test_streaming_row_slices_match_reference(batch, n_rows, n_cols, slices, log_domain, monkeypatch):
    """Streaming launches split each matrix into row slices whose programs meet in-launch:
    several row tiles per slice and a shorter last slice (a small fill target forces them
    where no GPU sets it), and every work-queue ticket back at zero afterwards."""
    from piumr_kernels.launch_state import zeroed_tickets
    from piumr_kernels.sinkhorn_knopp import triton_kernels

    if DEVICE == "cpu":
        monkeypatch.setattr(triton_kernels, "FILL_PROGRAMS", 2 * batch)
        plan = triton_kernels.launch_plan(n_rows, n_cols, interpreted=True)
        assert triton_kernels.stream_slices(plan, batch, n_rows, torch.device(DEVICE)) == slices
    generator = torch.Generator().manual_seed(batch * 53 + n_rows)
    K, upstream = _inputs((batch, n_rows, n_cols), log_domain, torch.float32, generator)
    _check_against_reference(K, upstream, log_domain, n_iters=4)
    assert not zeroed_tickets(K, 1 + 2 * batch).any()


def _stream_configs():
    from piumr_kernels.sinkhorn_knopp import triton_kernels

    return list(triton_kernels.STREAM_CONFIGS)


@pytest.mark.parametrize("config", _stream_configs(), ids=str)
def test_every_streaming_configuration_matches_reference(config):
    """Each configuration the streaming kernels can be tuned to, forward and backward."""
    from piumr_kernels.sinkhorn_knopp import triton_kernels
    from piumr_kernels.triton_autotune import use_config

    generator = torch.Generator().manual_seed(29)
    K, upstream = _inputs((2, 70, 40), False, torch.float32, generator)
    with use_config(triton_kernels._forward_rows_kernel, config):
        with use_config(triton_kernels._backward_streaming_kernel, config):
            _check_against_reference(K, upstream, False)
