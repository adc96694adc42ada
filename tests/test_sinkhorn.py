"""Sinkhorn–Knopp on every backend against the fp64 reference (SPEC §1).

Tolerances, relative to the largest magnitude of the fp64 result, floored at 1e-3 (inputs are
rounded to the tested dtype first, so only the kernel's own arithmetic is measured):
  float64 1e-10, float32 1e-4, float16 1e-2, bfloat16 4e-2 (forward and gradient).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st

import piumr_kernels
from piumr_kernels import backends
from piumr_kernels.sinkhorn_knopp import op as sinkhorn_op
from piumr_kernels.sinkhorn_knopp.reference import sinkhorn_reference

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def _kernel(shape, log_domain, dtype, seed=0):
    """Fresh random kernel: positive values in linear domain, real log-values in log domain."""
    generator = torch.Generator().manual_seed(seed)
    if log_domain:
        K = 2.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        K = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.05
    return K.to(dtype).to(DEVICE)


def _assert_close(actual, expected, dtype, what):
    # The floor keeps analytically-zero results (a single row: P is fixed by the column step)
    # from demanding relative accuracy on rounding noise.
    scale = expected.abs().max().clamp_min(1e-3)
    error = (actual.double() - expected).abs().max()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3e} vs scale {scale:.3e}"


def _check_against_reference(K, n_iters=3, **kwargs):
    """Forward and gradient (non-uniform upstream gradient) against autograd on fp64."""
    K = K.detach().requires_grad_()
    P = piumr_kernels.sinkhorn(K, n_iters, **kwargs)
    assert P.shape == K.shape and P.dtype == K.dtype
    upstream = torch.randn(K.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(K.device)
    (grad,) = torch.autograd.grad(P, K, upstream.to(K.dtype))

    K64 = K.detach().double().requires_grad_()
    P64 = sinkhorn_reference(K64, n_iters, **kwargs)
    (grad64,) = torch.autograd.grad(P64, K64, upstream)
    _assert_close(P, P64, K.dtype, "forward")
    _assert_close(grad, grad64, K.dtype, "gradient")


@pytest.mark.parametrize("shape", [(20, 4, 4), (20, 16, 16), (2, 37, 45)], ids=str)
def test_log_domain_peaky_kernel(backend, shape):
    """Log-values spread over hundreds (a small temperature): most exp() terms underflow,
    where the cpp kernels' vectorized exp flushes to 0 and their log sees sums near 1."""
    generator = torch.Generator().manual_seed(11)
    K = (60.0 * torch.randn(shape, generator=generator, dtype=torch.float64)).float().to(DEVICE)
    _check_against_reference(K, log_domain=True)


@pytest.mark.parametrize("log_domain", [False, True], ids=["linear", "log"])
def test_marginals_and_many_iterations(backend, log_domain):
    K = _kernel((6, 5, 7), log_domain, torch.float32, seed=3)
    _check_against_reference(K, n_iters=20, log_domain=log_domain, row_sum=0.5, col_sum=0.25, eps=1e-6)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous_input(backend, layout):
    base = _kernel((4, 12, 10), False, torch.float32, seed=5)
    if layout == "transposed":
        K = base.transpose(-1, -2)
    elif layout == "sliced":
        K = base[:, ::2, 1:]
    else:
        K = base[:1].expand(3, -1, -1)
    assert not K.is_contiguous()
    _check_against_reference(K)


# Full 16-matrix blocks of 4x4, 8x8 and 16x16 take the cpp backend's chunked tiles.
@pytest.mark.parametrize("shape", [(3, 6, 5), (16, 4, 4), (16, 8, 8), (16, 16, 16)], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_zero_rows_and_columns_give_zeros(backend, eps, shape):
    K = _kernel(shape, False, torch.float32, seed=7)
    K[0, 2, :] = 0
    K[1, :, 3] = 0
    P = piumr_kernels.sinkhorn(K, 5, eps=eps)
    assert torch.isfinite(P).all()
    assert (P[0, 2, :] == 0).all() and (P[1, :, 3] == 0).all()
    torch.testing.assert_close(P.double(), sinkhorn_reference(K.double(), 5, eps=eps), atol=1e-5, rtol=1e-4)
    # Gradients over 3 iterations: through a zero row the exact gradient grows as
    # (row_sum / eps) ** n_iters when eps > 0 (~1e40 at 5 iterations, past float32).
    _check_against_reference(K, 3, eps=eps)


# Every tier: cpp 16-lane chunked tile, cpp plain rows; triton register, streaming (70x70).
@pytest.mark.parametrize("shape", [(16, 16, 16), (2, 40, 40), (1, 70, 70)], ids=str)
def test_overflowing_zero_row_gradient_stays_where_the_reference_has_it(backend, shape):
    """5 iterations at eps=1e-8: a zero row's gradient, (1e8)**5, overflows float32. The
    running scale products must not turn that into NaN across the whole matrix: outside
    that row, non-finite gradient entries only where the float32 reference has them, the
    rest equal to it (inside it, triton's streaming tier overflows entries near 1e38 that
    the reference still holds)."""
    K = _kernel(shape, False, torch.float32, seed=3)
    K[0, 2, :] = 0
    upstream = _kernel(shape, False, torch.float32, seed=4)
    K_ref = K.detach().clone().requires_grad_()
    (sinkhorn_reference(K_ref, 5) * upstream).sum().backward()
    K = K.detach().requires_grad_()
    (piumr_kernels.sinkhorn(K, 5) * upstream).sum().backward()
    finite, finite_ref = torch.isfinite(K.grad), torch.isfinite(K_ref.grad)
    assert not finite_ref[0, 2].all(), "the case must overflow"
    finite[0, 2] = finite_ref[0, 2] = False
    assert not (~finite & finite_ref).any(), "non-finite gradient entries where the reference is finite"
    both = finite & finite_ref
    error = (K.grad[both] - K_ref.grad[both]).abs().max()
    assert error <= 1e-4 * K_ref.grad[both].abs().max().clamp_min(1e-3)


def test_log_domain_masked_entries(backend):
    K = _kernel((4, 6, 6), True, torch.float32, seed=9)
    K[:, 0, 1] = float("-inf")
    K[:, 3, 4] = float("-inf")
    _check_against_reference(K, log_domain=True)
    P = piumr_kernels.sinkhorn(K, 3, log_domain=True)
    assert (P[:, 0, 1] == 0).all()


def test_empty_batch(backend):
    K = torch.rand(0, 4, 4, device=DEVICE)
    assert piumr_kernels.sinkhorn(K).shape == (0, 4, 4)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("shape", [(20, 4, 4), (2, 64, 40)], ids=["lanes", "rows"])
def test_cpp_every_cpu_variant(monkeypatch, isa, shape):
    """The cpp kernels are compiled once per instruction set; each variant is checked."""
    if not backends.backend_available("cpp"):
        pytest.skip("cpp extension not built")
    monkeypatch.setenv("PIUMR_KERNELS_CPU_ISA", isa)
    with piumr_kernels.use_backend("cpp"):
        for log_domain in (False, True):
            _check_against_reference(_kernel(shape, log_domain, torch.float32), log_domain=log_domain)


# --- memory saved for backward --------------------------------------------------------------


def _saved_bytes(fn, K):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(K)
    return sum(saved)


@pytest.mark.parametrize("shape,n_iters", [((64, 4, 4), 20), ((4, 48, 40), 3), ((2, 150, 200), 3)], ids=str)
def test_fused_backward_saves_only_input_and_vectors(backend, shape, n_iters):
    """Fused backends keep K plus O(n_iters * (N + M)) per matrix; eager keeps 2 * n_iters matrices."""
    K = _kernel(shape, False, torch.float32).requires_grad_()
    saved = _saved_bytes(lambda k: piumr_kernels.sinkhorn(k, n_iters), K)
    batch, n, m = shape
    input_bytes = K.numel() * K.element_size()
    vector_bytes = batch * n_iters * (n + m) * 4
    if backend == "reference":
        assert saved >= 2 * n_iters * input_bytes
    else:
        assert saved <= input_bytes + vector_bytes


# --- properties (hypothesis) ------------------------------------------------------------


def _fast_backend():
    return "cpp" if backends.backend_available("cpp") else "reference"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    batch=st.integers(1, 5),
    row_sum=st.floats(0.1, 10.0),
    log_domain=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_marginals_reached(n, m, batch, row_sum, log_domain, seed):
    K = _kernel((batch, n, m), log_domain, torch.float64, seed=seed).cpu()
    with piumr_kernels.use_backend(_fast_backend()):
        P = piumr_kernels.sinkhorn(K, 300, eps=0.0, log_domain=log_domain, row_sum=row_sum)
    col_sum = row_sum * n / m
    torch.testing.assert_close(P.sum(-2), torch.full((batch, m), col_sum, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(P.sum(-1), torch.full((batch, n), row_sum, dtype=torch.float64), rtol=1e-6, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20),
    m=st.integers(1, 20),
    n_iters=st.integers(1, 6),
    log_domain=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_permutation_equivariance(n, m, n_iters, log_domain, seed):
    K = _kernel((2, n, m), log_domain, torch.float64, seed=seed).cpu()
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.randperm(n, generator=generator), torch.randperm(m, generator=generator)
    with piumr_kernels.use_backend(_fast_backend()):
        P = piumr_kernels.sinkhorn(K, n_iters, log_domain=log_domain)
        P_permuted = piumr_kernels.sinkhorn(K[:, rows][:, :, cols], n_iters, log_domain=log_domain)
    torch.testing.assert_close(P_permuted, P[:, rows][:, :, cols], rtol=1e-12, atol=1e-14)


# --- drop-in proof -----------------------------------------------------------------------


def test_drop_in_tfam_kernel_normalization(backend):
    """SPEC §5 step 4 written out by hand: softmax(-M^2 / tau), symmetrize, 3 Sinkhorn iterations."""
    generator = torch.Generator().manual_seed(21)
    frames = torch.randn(8, 16, 32, generator=generator, dtype=torch.float64)  # (B, T, C)
    centered = frames - frames.mean(1, keepdim=True)
    unit = centered / centered.norm(dim=-1, keepdim=True)
    affinity = unit @ unit.transpose(1, 2)
    affinity = affinity - affinity.mean((1, 2), keepdim=True)
    tau = 0.05 + affinity.var((1, 2), keepdim=True).sqrt()
    kernel = torch.softmax(-(affinity**2) / tau, dim=-1)
    kernel = (kernel + kernel.transpose(1, 2)) / 2

    expected = kernel.clone()
    for _ in range(3):
        expected = expected / (expected.sum(-1, keepdim=True) + 1e-8)
        expected = expected / (expected.sum(-2, keepdim=True) + 1e-8)

    dtype = torch.float32 if backend == "triton" else torch.float64
    normalized = piumr_kernels.SinkhornKernel(n_iters=3)(kernel.to(dtype).to(DEVICE))
    torch.testing.assert_close(normalized.double().cpu(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("log_domain", [False, True], ids=["linear", "log"])
def test_drop_in_swav_prototype_assignment(backend, log_domain):
    """SwAV/DINOv2 prototype assignment written the straightforward way vs SinkhornKernel."""
    generator = torch.Generator().manual_seed(22)
    batch, prototypes, temperature = 24, 10, 0.05
    scores = torch.randn(batch, prototypes, generator=generator, dtype=torch.float64) * 0.3

    Q = torch.exp(scores / temperature).t()  # (prototypes, batch)
    Q /= Q.sum()
    for _ in range(3):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= prototypes
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= batch
    expected = (Q * batch).t()

    dtype = torch.float32 if backend == "triton" else torch.float64
    layer = piumr_kernels.SinkhornKernel(
        n_iters=3, eps=0.0, log_domain=log_domain, row_sum=1 / prototypes, col_sum=1 / batch
    )
    kernel = (scores / temperature).t() if log_domain else torch.exp(scores / temperature).t()
    assignment = (layer(kernel.to(dtype).to(DEVICE)) * batch).t()
    torch.testing.assert_close(assignment.double().cpu(), expected, rtol=1e-4, atol=1e-6)


# --- API, dispatch and errors -------------------------------------------------------------


def test_module_matches_function_and_repr():
    layer = piumr_kernels.SinkhornKernel(n_iters=4, log_domain=True, row_sum=2.0)
    K = _kernel((3, 5, 5), True, torch.float32)
    torch.testing.assert_close(layer(K), piumr_kernels.sinkhorn(K, 4, log_domain=True, row_sum=2.0))
    assert "n_iters=4" in repr(layer) and "log_domain=True" in repr(layer)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: piumr_kernels.sinkhorn(torch.rand(4)), ValueError, "K must have at least 2 dimensions"),
        (
            lambda: piumr_kernels.sinkhorn(torch.ones(2, 3, 3, dtype=torch.int64)),
            TypeError,
            "K must have a floating dtype",
        ),
        (lambda: piumr_kernels.sinkhorn([[1.0]]), TypeError, "K must be a torch.Tensor"),
        (lambda: piumr_kernels.sinkhorn(torch.rand(2, 3, 3), n_iters=0), ValueError, "n_iters must be >= 1, got 0"),
        (lambda: piumr_kernels.sinkhorn(torch.rand(2, 3, 3), n_iters=2.5), TypeError, "n_iters must be an int"),
        (lambda: piumr_kernels.sinkhorn(torch.rand(2, 3, 3), eps=-1e-3), ValueError, "eps must be >= 0"),
        (lambda: piumr_kernels.sinkhorn(torch.rand(2, 3, 3), row_sum=0.0), ValueError, "row_sum must be > 0"),
        (lambda: piumr_kernels.sinkhorn(torch.rand(2, 3, 3), col_sum=-1.0), ValueError, "col_sum must be > 0"),
        (lambda: piumr_kernels.sinkhorn(torch.rand(2, 0, 3)), ValueError, "N >= 1 rows and M >= 1 columns"),
        (lambda: piumr_kernels.SinkhornKernel(n_iters=-1), ValueError, "n_iters must be >= 1"),
    ],
)
def test_bad_arguments_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_value_checks_are_opt_in(monkeypatch):
    negative = torch.rand(2, 3, 3) - 0.5
    with pytest.raises(ValueError, match="non-negative"):
        piumr_kernels.sinkhorn(negative, validate=True)
    masked = torch.randn(2, 3, 3)
    masked[0, 1, :] = float("-inf")
    with pytest.raises(ValueError, match="whole row or column of -inf"):
        piumr_kernels.sinkhorn(masked, log_domain=True, validate=True)
    monkeypatch.setenv("PIUMR_KERNELS_VALIDATE", "1")
    with pytest.raises(ValueError, match="non-negative"):
        piumr_kernels.sinkhorn(negative)


def test_forced_unavailable_backend_is_an_error(monkeypatch):
    meta = torch.empty(2, 3, 3, device="meta")
    with piumr_kernels.use_backend("cpp"), pytest.raises(piumr_kernels.BackendUnavailableError, match="cpp"):
        piumr_kernels.sinkhorn(meta)
    monkeypatch.setenv("PIUMR_KERNELS_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="PIUMR_KERNELS_BACKEND must be one of"):
        piumr_kernels.sinkhorn(torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="backend must be one of"), piumr_kernels.use_backend("fast"):
        pass


def test_triton_rejects_float64():
    if backends._availability("triton", torch.device(DEVICE)):
        pytest.skip("triton not available")
    with piumr_kernels.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        piumr_kernels.sinkhorn(torch.rand(2, 3, 3, dtype=torch.float64, device=DEVICE))


def test_auto_dispatch_and_environment(monkeypatch):
    cpu = torch.rand(2, 3, 3)
    expected = "cpp" if backends.backend_available("cpp") else "reference"
    assert backends.resolve_backend(cpu) == expected
    monkeypatch.setenv("PIUMR_KERNELS_BACKEND", "reference")
    assert backends.resolve_backend(cpu) == "reference"
    with piumr_kernels.use_backend("auto"):
        assert backends.resolve_backend(cpu) == expected


def test_info_reports_backends_and_versions():
    report = piumr_kernels.info()
    assert set(report["backends"]) == {"reference", "cpp", "triton"}
    for name, entry in report["backends"].items():
        assert entry["available"] or entry["reason"], f"{name} unavailable without a reason"
    assert report["torch"] == torch.__version__
    assert report["version"] == piumr_kernels.__version__
    if backends.backend_available("cpp"):
        assert report["cpu_isa"] in {"baseline", "avx2", "avx512"}


@pytest.mark.skipif(not backends.backend_available("cpp") or DEVICE != "cpu", reason="needs the cpp backend")
def test_cpp_dispatches_like_torch_ops():
    """The cpp call goes through torch.ops: fake tensors get the registered fake, autograd
    records a graph."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode(), piumr_kernels.use_backend("cpp"):
        K = torch.rand(5, 16, 16, requires_grad=True)
        P = piumr_kernels.sinkhorn(K, 3)
        assert isinstance(P, FakeTensor) and P.shape == K.shape and P.grad_fn is not None
        P.sum().backward()
        assert K.grad.shape == K.shape


def test_fused_autograd_follows_graph_rules(backend):
    """The fused ops' autograd behaves like PyTorch's own: retain_graph allows a second
    backward with the same gradient, without it the second backward raises autograd's error,
    a P that does not require grad gets no node, and forward-mode AD is refused clearly."""
    K = _kernel((18, 16, 16), False, torch.float32).requires_grad_()
    upstream = torch.randn(K.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    P = piumr_kernels.sinkhorn(K, 3)
    (first,) = torch.autograd.grad(P, K, upstream, retain_graph=True)
    (second,) = torch.autograd.grad(P, K, upstream)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(P, K, upstream)
    with torch.no_grad():
        assert piumr_kernels.sinkhorn(K, 3).grad_fn is None
    if backend != "reference":
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="(?i)forward.*(AD|mode)|jvp"):
            piumr_kernels.sinkhorn(fwAD.make_dual(K.detach(), torch.ones_like(K)), 3)


def test_cpp_stats_rule_matches_fake():
    """The Python rule for storing stats and the fake shapes agree with the real op."""
    if not backends.backend_available("cpp"):
        pytest.skip("cpp extension not built")
    for shape, n_iters in [((3, 4, 4), 20), ((2, 16, 16), 3), ((2, 64, 64), 3)]:
        K = torch.rand(shape, requires_grad=True)
        save = sinkhorn_op.saves_stats("cpp", K, n_iters, *shape[1:])
        real = torch.ops.piumr_kernels.sinkhorn_cpp(K.detach(), n_iters, 1e-8, False, 1.0, 1.0, save)
        fake = sinkhorn_op._fake_forward(K.detach(), n_iters, 1e-8, False, 1.0, 1.0, save)
        assert [t.shape for t in real] == [t.shape for t in fake]
        assert save == (2 * n_iters * sum(shape[1:]) <= 3 * math.prod(shape[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("log_domain", [False, True], ids=["linear", "log"])
@pytest.mark.parametrize("shape", [(21, 4, 4), (18, 16, 16), (2, 37, 45)], ids=str)
def test_cpp_backward_with_and_without_stats(shape, log_domain, dtype):
    """Both cpp backward paths, stored per-iteration vectors and the replayed forward, give
    the reference gradient whatever the rule in `saves_stats` picks for the shape."""
    if not backends.backend_available("cpp"):
        pytest.skip("cpp extension not built")
    K = _kernel(shape, log_domain, dtype, seed=17).cpu()
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    K64 = K.double().requires_grad_()
    (expected,) = torch.autograd.grad(sinkhorn_reference(K64, 3, log_domain=log_domain), K64, upstream)
    col_sum = shape[1] / shape[2]  # the default: the same total mass as the rows
    for save_stats in (False, True):
        _, row_stats, col_stats = torch.ops.piumr_kernels.sinkhorn_cpp(K, 3, 1e-8, log_domain, 1.0, col_sum, save_stats)
        assert row_stats.numel() == (3 * shape[1] * shape[0] if save_stats else 0)
        grad = torch.ops.piumr_kernels.sinkhorn_cpp_backward(
            upstream.to(dtype), K, row_stats, col_stats, 3, 1e-8, log_domain, 1.0, col_sum
        )
        _assert_close(grad, expected, dtype, f"gradient (save_stats={save_stats})")
