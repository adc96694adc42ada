"""DCT filter bank (SPEC §2): every backend against an fp64 reference built the straightforward way.

The ground truth here is independent of piumr_kernels: the basis from the SPEC formula with
explicit loops, then `x.mean(2)` and `F.conv2d` with every filter repeated over all `C`
input channels (zero padding k // 2), and two-pass float64 stats.

Tolerances (largest error / largest |reference value| of each output, the input first
rounded to its dtype so only the op's own rounding counts): float64 1e-10, float32 2e-5,
float16 4e-3, bfloat16 3e-2 (output rounding of E, stats and the gradient map).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import piumr_kernels
from piumr_kernels import DCTFilterBank, backends, dct_basis, dct_filter_bank

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (B, C, T, H, W): maps larger, equal to and smaller than the 7x7 filter, single rows and columns.
SHAPES = [(2, 3, 4, 9, 11), (2, 2, 3, 7, 7), (3, 2, 2, 4, 4), (1, 1, 1, 1, 1), (2, 1, 5, 1, 6), (1, 3, 1, 10, 2)]


def formula_basis(k: int) -> torch.Tensor:
    """SPEC §2 literally: D_d[i, j] = c(u) c(v) cos(pi (2i+1) u / 2k) cos(pi (2j+1) v / 2k), u = d mod k."""

    def c(f):
        return math.sqrt((1.0 if f == 0 else 2.0) / k)

    basis = torch.empty(k * k, k, k, dtype=torch.float64)
    for d in range(k * k):
        u, v = d % k, d // k
        for i in range(k):
            for j in range(k):
                basis[d, i, j] = (
                    c(u)
                    * c(v)
                    * math.cos(math.pi * (2 * i + 1) * u / (2 * k))
                    * math.cos(math.pi * (2 * j + 1) * v / (2 * k))
                )
    return basis


def straightforward(x: torch.Tensor, k: int, frequencies=None):
    """fp64 E, mean, var the way HDF writes it: Conv2d(mean_t x, basis repeated over C)."""
    x = x.to(torch.float64)
    basis = formula_basis(k)
    if frequencies is not None:
        basis = basis[list(frequencies)]
    weight = basis[:, None].repeat(1, x.shape[1], 1, 1)
    E = F.conv2d(x.mean(dim=2), weight, padding=k // 2)
    mean = E.mean(dim=(2, 3))
    var = ((E - mean[:, :, None, None]) ** 2).mean(dim=(2, 3))
    return E, mean, var


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.to(torch.float64)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() + 1e-30
    error = (actual - expected).abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3e} > {tol:.1e} * {scale:.3e}"


def random_input(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend has no float64 (SPEC §2)")


# ----------------------------------------------------------------------------- basis


@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
def test_basis_is_orthonormal(k):
    flat = dct_basis(k).reshape(k * k, k * k)
    assert torch.allclose(flat @ flat.T, torch.eye(k * k, dtype=torch.float64), atol=1e-13)


@pytest.mark.parametrize("k", [3, 7])
def test_basis_filter_zero_is_constant_one_over_k(k):
    assert torch.allclose(dct_basis(k)[0], torch.full((k, k), 1.0 / k, dtype=torch.float64), atol=1e-15)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_basis_order_matches_formula(k):
    basis = dct_basis(k)
    assert basis.shape == (k * k, k, k) and basis.dtype == torch.float64
    assert torch.allclose(basis, formula_basis(k), atol=1e-14)
    # Filter 1 (u = 1, v = 0) varies along H (rows) only, filter k (u = 0, v = 1) along W only.
    assert torch.allclose(basis[1], basis[1][:, :1].expand(k, k))
    assert torch.allclose(basis[k], basis[k][:1, :].expand(k, k))


def test_basis_dtype_is_a_cast_of_float64():
    assert dct_basis(7, torch.float32).dtype == torch.float32
    assert torch.equal(dct_basis(7, torch.float16), dct_basis(7).to(torch.float16))


# ----------------------------------------------------------------------------- forward and backward


def check_against_fp64(dtype, shape, frequencies, k=7):
    """E, stats and dx (non-uniform upstream gradients on all three) against `straightforward`."""
    x = random_input(shape, dtype, seed=sum(shape)).requires_grad_()
    E, mean, var = dct_filter_bank(x, k, frequencies, return_stats=True)
    assert E.dtype == mean.dtype == var.dtype == dtype

    x64 = x.detach().to(torch.float64).requires_grad_()
    E_ref, mean_ref, var_ref = straightforward(x64, k, frequencies)
    tol = TOLERANCE[dtype]
    assert_close(E, E_ref, tol, "E")
    assert_close(mean, mean_ref, tol, "mean")
    assert_close(var, var_ref, tol, "var")

    generator = torch.Generator().manual_seed(1)
    grad_E = torch.randn(E_ref.shape, generator=generator, dtype=torch.float64)
    grad_mean = torch.randn(mean_ref.shape, generator=generator, dtype=torch.float64)
    grad_var = torch.randn(var_ref.shape, generator=generator, dtype=torch.float64)
    (dx,) = torch.autograd.grad((E, mean, var), x, (grad_E.to(dtype), grad_mean.to(dtype), grad_var.to(dtype)))
    (dx_ref,) = torch.autograd.grad((E_ref, mean_ref, var_ref), x64, (grad_E, grad_mean, grad_var))
    assert dx.dtype == dtype
    assert_close(dx, dx_ref, tol, "dx")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_selected_filters_match_fp64(backend, dtype, shape):
    """Every dtype and shape; a selection with repeats, out of order, both extreme indices."""
    skip_unsupported(backend, dtype)
    check_against_fp64(dtype, shape, [5, 0, 48, 13, 13])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 2, 3, 6, 21), (1, 2, 2, 3, 40), (1, 1, 2, 17, 33)])
def test_wide_maps_match_fp64(backend, dtype, shape):
    """Rows longer than a vector block and not a multiple of it (the cpp W pass runs a row's
    vector loop on into the next rows): the full bank and a selection with repeats."""
    skip_unsupported(backend, dtype)
    if backend == "triton":
        pytest.skip("interpreter time: the triton tiles are covered by the shapes above")
    check_against_fp64(dtype, shape, None)
    check_against_fp64(dtype, shape, [47, 1, 1, 8])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_any_selection_gives_the_full_banks_values(backend, dtype):
    """A selection returns exactly the full bank's maps and stats: the cpp W pass computes a
    slot (filters sharing u) whole when at least half of it is asked for (here u = 4 with
    four of seven v, one asked twice) and filter by filter otherwise (u = 0, 6)."""
    if backend != "cpp":
        pytest.skip("a property of the cpp W pass (the reference's conv2d blocks by output channel)")
    x = random_input((2, 3, 2, 9, 20), dtype)
    selection = [4, 18, 25, 39, 18, 0, 48]
    E_all, mean_all, var_all = dct_filter_bank(x, 7, return_stats=True)
    E, mean, var = dct_filter_bank(x, 7, selection, return_stats=True)
    assert torch.equal(E, E_all[:, selection])
    assert torch.equal(mean, mean_all[:, selection]) and torch.equal(var, var_all[:, selection])


@pytest.mark.parametrize("shape", SHAPES)
def test_full_bank_matches_fp64(backend, shape):
    if backend == "triton" and shape not in SHAPES[1:3]:
        pytest.skip("interpreter time: the full bank on triton runs on the 7x7 and 4x4 maps")
    check_against_fp64(torch.float32, shape, None)


@pytest.mark.parametrize("k", [3, 5])
def test_other_kernel_sizes(backend, k):
    x = random_input((2, 2, 3, 6, 5), torch.float32).requires_grad_()
    E = dct_filter_bank(x, k)
    x64 = x.detach().to(torch.float64).requires_grad_()
    (E_ref,) = straightforward(x64, k)[:1]
    assert_close(E, E_ref, TOLERANCE[torch.float32], "E")
    grad_E = torch.randn_like(E_ref)
    (dx,) = torch.autograd.grad(E, x, grad_E.float())
    (dx_ref,) = torch.autograd.grad(E_ref, x64, grad_E)
    assert_close(dx, dx_ref, TOLERANCE[torch.float32], "dx")


def test_gradient_of_E_alone(backend):
    """Without return_stats only dE flows (the stats' gradients are zero)."""
    x = random_input((2, 3, 2, 8, 6), torch.float32).requires_grad_()
    E = dct_filter_bank(x, 7, [0, 9, 30])
    x64 = x.detach().to(torch.float64).requires_grad_()
    E_ref = straightforward(x64, 7, [0, 9, 30])[0]
    grad_E = torch.randn_like(E_ref)
    (dx,) = torch.autograd.grad(E, x, grad_E.float())
    (dx_ref,) = torch.autograd.grad(E_ref, x64, grad_E)
    assert_close(dx, dx_ref, TOLERANCE[torch.float32], "dx")


def test_non_contiguous_input(backend):
    base = random_input((3, 2, 10, 6, 4), torch.float32)
    # Strided over B, C, T, H and W at once: transposed plane, every other frame, reversed batch.
    x = base.transpose(3, 4)[::2, :, ::2].requires_grad_()
    assert not x.is_contiguous()
    E, mean, var = dct_filter_bank(x, 7, return_stats=True)
    x64 = x.detach().to(torch.float64).requires_grad_()
    E_ref, mean_ref, var_ref = straightforward(x64, 7)
    tol = TOLERANCE[torch.float32]
    assert_close(E, E_ref, tol, "E")
    assert_close(var, var_ref, tol, "var")
    grad_E = torch.randn_like(E_ref)
    (dx,) = torch.autograd.grad(E, x, grad_E.float())
    (dx_ref,) = torch.autograd.grad(E_ref, x64, grad_E)
    assert_close(dx, dx_ref, tol, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["flat", "strided"])
def test_triton_split_plane_reduction_matches_fp64(dtype, transposed, poisoned_empty):
    """70 planes over 4 splits of 18, 18, 18 and 16 (the last one short, none a multiple of the
    reduction's plane block), flat and transposed planes, forward and backward."""
    if backends._availability("triton", torch.device("cpu")) != "":
        pytest.skip("triton cannot run on CPU tensors here")
    from piumr_kernels.dct.triton_kernels import plane_splits

    batch, channels, frames, height, width = 1, 7, 10, 5, 6
    assert plane_splits(batch, height * width, channels * frames) == (4, 18)
    plane = (width, height) if transposed else (height, width)
    base = random_input((batch, channels, frames, *plane), dtype)
    x = (base.transpose(3, 4) if transposed else base).requires_grad_()
    frequencies = [0, 8, 48]
    with piumr_kernels.use_backend("triton"):
        E, mean, var = dct_filter_bank(x, 7, frequencies, return_stats=True)
    x64 = x.detach().to(torch.float64).requires_grad_()
    E_ref, mean_ref, var_ref = straightforward(x64, 7, frequencies)
    tol = TOLERANCE[dtype]
    assert_close(E, E_ref, tol, "E")
    assert_close(mean, mean_ref, tol, "mean")
    assert_close(var, var_ref, tol, "var")
    grad_E = torch.randn_like(E_ref)
    (dx,) = torch.autograd.grad(E, x, grad_E.to(dtype))
    (dx_ref,) = torch.autograd.grad(E_ref, x64, grad_E)
    assert_close(dx, dx_ref, tol, "dx")


def test_triton_split_adjoint_matches_fp64(poisoned_empty):
    """17 filters over 4 filter splits of 5, 5, 5 and 2 in the backward's adjoint (2 maps of one
    pixel tile each): every split's partial map is summed by the split finishing last."""
    if backends._availability("triton", torch.device("cpu")) != "":
        pytest.skip("triton cannot run on CPU tensors here")
    from piumr_kernels.dct.triton_kernels import MIN_FILTERS_PER_SPLIT, _splits

    frequencies = list(range(0, 49, 3))
    assert _splits(2, len(frequencies), MIN_FILTERS_PER_SPLIT) == (4, 5)
    x = random_input((2, 3, 2, 6, 5), torch.float32).requires_grad_()
    with piumr_kernels.use_backend("triton"):
        E, mean, var = dct_filter_bank(x, 7, frequencies, return_stats=True)
    x64 = x.detach().to(torch.float64).requires_grad_()
    E_ref, mean_ref, var_ref = straightforward(x64, 7, frequencies)
    grads = [torch.randn_like(E_ref), torch.randn_like(mean_ref), torch.randn_like(var_ref)]
    (dx,) = torch.autograd.grad((E, mean, var), x, [g.float() for g in grads])
    (dx_ref,) = torch.autograd.grad((E_ref, mean_ref, var_ref), x64, grads)
    assert_close(dx, dx_ref, TOLERANCE[torch.float32], "dx")


@pytest.mark.parametrize("index", [1])
def test_triton_every_autotuned_config_matches_fp64(index, poisoned_empty):
    """Config `index` of every autotuned DCT kernel (what a GPU may pick; the rest of the suite
    runs the first): split plane reduction and split adjoint, forward and backward."""
    if backends._availability("triton", torch.device("cpu")) != "":
        pytest.skip("triton cannot run on CPU tensors here")
    from piumr_kernels import triton_autotune
    from piumr_kernels.dct import triton_kernels

    kernels = triton_autotune.autotuned_kernels(triton_kernels)
    assert max(len(kernel.tuning_configs) for kernel in kernels) == 2  # every index is tested
    frequencies = list(range(0, 49, 3))
    x = random_input((1, 7, 10, 5, 6), torch.float32).requires_grad_()
    with contextlib.ExitStack() as stack, piumr_kernels.use_backend("triton"):
        for kernel in kernels:
            stack.enter_context(triton_autotune.use_config(kernel, kernel.tuning_configs[index]))
        E, mean, var = dct_filter_bank(x, 7, frequencies, return_stats=True)
        x64 = x.detach().to(torch.float64).requires_grad_()
        E_ref, mean_ref, var_ref = straightforward(x64, 7, frequencies)
        tol = TOLERANCE[torch.float32]
        assert_close(E, E_ref, tol, "E")
        assert_close(mean, mean_ref, tol, "mean")
        assert_close(var, var_ref, tol, "var")
        grads = [torch.randn_like(E_ref), torch.randn_like(mean_ref), torch.randn_like(var_ref)]
        (dx,) = torch.autograd.grad((E, mean, var), x, [g.float() for g in grads])
    (dx_ref,) = torch.autograd.grad((E_ref, mean_ref, var_ref), x64, grads)
    assert_close(dx, dx_ref, tol, "dx")


def test_fused_gradient_is_an_expanded_view(backend):
    if backend == "reference":
        pytest.skip("the reference gradient is whatever eager autograd makes")
    x = random_input((2, 3, 4, 5, 5), torch.float32).requires_grad_()
    E = dct_filter_bank(x, 7, [0, 9, 30])
    (dx,) = torch.autograd.grad(E, x, torch.randn_like(E))
    assert dx.shape == x.shape and dx.stride()[1:3] == (0, 0)
    assert torch.equal(dx, dx[:, :1, :1].expand_as(dx))


def test_empty_batch(backend):
    E, mean, var = dct_filter_bank(torch.randn(0, 2, 3, 5, 5), 7, return_stats=True)
    assert E.shape == (0, 49, 5, 5) and mean.shape == var.shape == (0, 49)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpp_every_instruction_set(isa, monkeypatch):
    if not backends.backend_available("cpp"):
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv("PIUMR_KERNELS_CPU_ISA", isa)
    x = random_input((3, 5, 3, 13, 19), torch.float32).requires_grad_()
    with piumr_kernels.use_backend("cpp"):
        E, mean, var = dct_filter_bank(x, 7, return_stats=True)
    x64 = x.detach().to(torch.float64).requires_grad_()
    E_ref, mean_ref, var_ref = straightforward(x64, 7)
    assert_close(E, E_ref, TOLERANCE[torch.float32], "E")
    assert_close(var, var_ref, TOLERANCE[torch.float32], "var")
    grads = (torch.randn_like(E_ref), torch.randn_like(mean_ref), torch.randn_like(var_ref))
    (dx,) = torch.autograd.grad((E, mean, var), x, tuple(g.float() for g in grads))
    (dx_ref,) = torch.autograd.grad((E_ref, mean_ref, var_ref), x64, grads)
    assert_close(dx, dx_ref, TOLERANCE[torch.float32], "dx")


# (B, C, T, H, W) for the cpp forward's blocked loops: C*T planes as whole 8-plane sweeps plus
# leftovers (20 = 2 * 8 + 4, 9 = 8 + 1), planes (or row bands) of whole 64-element prefetch
# blocks plus a remainder (260, 192, 26), and W-pass rows whose vector loop runs on into the
# next row (W = 20, 13) or fits exactly (W = 32).
CPP_BLOCKED_SHAPES = [(2, 5, 4, 13, 20), (1, 3, 3, 6, 32), (3, 2, 10, 2, 13)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", CPP_BLOCKED_SHAPES)
def test_cpp_blocked_loops_match_fp64(shape, dtype, threads, poisoned_empty):
    """Every remainder of the reduction sweeps, prefetch blocks, row bands (2 threads split a
    small batch into bands of rows) and W-pass rows, with every output poisoned until written."""
    if not backends.backend_available("cpp"):
        pytest.skip("the C++ extension is not built")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with piumr_kernels.use_backend("cpp"):
            check_against_fp64(dtype, shape, [48, 0, 9, 24])
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------- stats accuracy


def test_stats_stay_accurate_with_a_large_mean(backend):
    """float32 values 1e4 + 1e-2 * randn: the variance is 1e-4 while E^2 is ~1e8.

    kernel_size=1 (the filter is [[1]]) makes E = s = x, so the stats see exactly this
    data (larger filters add zero-padding edges whose spread is of the order of the mean).
    The moments about E[0, 0], merged per row/tile, keep the variance to ~1e-7 relative;
    the naive float32 E[E^2] - E[E]^2 is off by the float32 spacing of 1e8 (~8), i.e.
    by 1e4 to 1e5 times the variance.
    """
    x = (1e4 + 1e-2 * random_input((2, 1, 1, 24, 20), torch.float64)).to(torch.float32)
    E, mean, var = dct_filter_bank(x, 1, return_stats=True)
    _, mean_ref, var_ref = straightforward(x, 1)
    assert ((var.double() - var_ref).abs() / var_ref).max() < 1e-5
    assert ((mean.double() - mean_ref).abs() / mean_ref).max() < 1e-6
    E32 = x[:, :, 0]
    naive = (E32 * E32).mean(dim=(2, 3)) - E32.mean(dim=(2, 3)) ** 2
    assert ((naive.double() - var_ref).abs() / var_ref).max() > 100


# ----------------------------------------------------------------------------- compile, module, errors


def test_module_matches_function(backend):
    module = DCTFilterBank(5, frequencies=[3, 0])
    assert module.num_filters == 2 and "kernel_size=5" in repr(module)
    x = random_input((1, 2, 2, 6, 6), torch.float32)
    assert torch.equal(module(x), dct_filter_bank(x, 5, [3, 0]))
    E, mean, var = module(x, return_stats=True)
    assert mean.shape == var.shape == (1, 2)
    assert DCTFilterBank().num_filters == 49
    assert len(list(DCTFilterBank().parameters())) == 0


def test_frequencies_as_tensor_selects_in_order(backend):
    x = random_input((1, 2, 2, 6, 6), torch.float32)
    all_filters = dct_filter_bank(x, 7)
    picked = dct_filter_bank(x, 7, torch.tensor([30, 2]))
    assert torch.equal(picked, all_filters[:, [30, 2]])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randn(2, 3, 4, 5)), ValueError, "x must be 5-D"),
        (dict(x=torch.ones(1, 1, 1, 4, 4, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(kernel_size=4), ValueError, "kernel_size must be odd"),
        (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
        (dict(kernel_size=-3), ValueError, "kernel_size must be >= 1"),
        (dict(kernel_size=7.0), TypeError, "kernel_size must be an int"),
        (dict(kernel_size=True), TypeError, "kernel_size must be an int"),
        (dict(frequencies=[0, 49]), ValueError, r"frequencies must be filter indices in \[0, 49\).*got 49"),
        (dict(frequencies=[-1]), ValueError, r"frequencies must be filter indices in \[0, 49\)"),
        (dict(kernel_size=3, frequencies=[9]), ValueError, r"\[0, 9\)"),
        (dict(frequencies=[]), ValueError, "at least one filter"),
        (dict(frequencies=[1.0]), TypeError, "frequencies must hold ints"),
        (dict(frequencies="abc"), TypeError, "frequencies must be None or a sequence of ints"),
        (dict(frequencies=torch.tensor([0.0])), TypeError, "1-D integer tensor"),
        (dict(x=torch.randn(1, 0, 2, 4, 4)), ValueError, "C >= 1"),
        (dict(x=torch.randn(1, 2, 0, 4, 4)), ValueError, "T >= 1"),
        (dict(x=torch.randn(1, 2, 2, 0, 4)), ValueError, "H >= 1"),
    ],
)
def test_bad_input_errors(backend, kwargs, error, match):
    arguments = dict(x=torch.randn(1, 2, 2, 4, 4), kernel_size=7, frequencies=None)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        dct_filter_bank(arguments["x"], arguments["kernel_size"], arguments["frequencies"])


def test_bad_basis_and_module_arguments():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        dct_basis(6)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        dct_basis(7, torch.int32)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        DCTFilterBank(2)
    with pytest.raises(ValueError, match="frequencies must be filter indices"):
        DCTFilterBank(3, frequencies=[10])


def test_triton_rejects_float64():
    if backends._availability("triton", torch.device("cpu")) != "":
        pytest.skip("triton cannot run on CPU tensors here")
    with piumr_kernels.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        dct_filter_bank(torch.randn(1, 1, 1, 3, 3, dtype=torch.float64))


def test_triton_tables_are_built_once_and_never_cached_from_fake_inputs():
    """The triton launchers reuse the float32 1-D basis (built in float64) and the filter indices
    per (kernel_size, frequencies, device); a fake input builds its own and caches nothing."""
    if backends._availability("triton", torch.device("cpu")) != "":
        pytest.skip("triton cannot run on CPU tensors here")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from piumr_kernels.dct import triton_kernels
    from piumr_kernels.dct.reference import dct_basis_1d

    frequencies = [5, 0, 48, 13]
    triton_kernels._bank_tables.cache_clear()
    with FakeTensorMode():
        fake = triton_kernels._bank_tensors(7, frequencies, torch.empty(1, device="meta"))
    assert triton_kernels._bank_tables.cache_info().currsize == 0
    basis, freq = triton_kernels._bank_tensors(7, frequencies, torch.empty(1))
    again = triton_kernels._bank_tensors(7, frequencies, torch.empty(2))
    assert again[0] is basis and again[1] is freq
    assert fake[0].shape == basis.shape and fake[0].device.type == "meta"
    assert freq.tolist() == frequencies
    assert torch.equal(basis, dct_basis_1d(7).to(torch.float32))
