"""TFAM's fused passes (tfam_statistics, tfam_combine): the semantics specific to them.

Forward and backward against the float64 reference in every dtype (with poisoned outputs),
fp64 gradcheck, opcheck and torch.compile run for every op in tests/test_op_contract.py
(shapes and tolerances in tests/op_harness.py).
"""

import contextlib

import pytest
import torch
from conftest import DEVICE

import piumr_kernels
from piumr_kernels import backends, tfam_combine, tfam_statistics
from piumr_kernels.tfam_pooling import tfam_combine_reference, tfam_statistics_reference


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, _, frames, height, width = shape
    x = torch.randn(shape, generator=generator).to(dtype)
    ts = torch.randn(batch, frames, generator=generator, dtype=torch.float64)
    ss = torch.randn(batch, height, width, generator=generator, dtype=torch.float64)
    return x.to(DEVICE), ts.to(DEVICE), ss.to(DEVICE)


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_gradient_goes_to_first_maximum_on_ties(backend, dtype):
    # Small integers: every plane holds its maximum several times.
    x = torch.randint(-2, 3, (2, 3, 2, 5, 6), generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    x_fused = x.clone().requires_grad_()
    _, frame_max, _ = tfam_statistics(x_fused)
    frame_max.sum().backward()
    planes = x.flatten(3)
    first = (planes == planes.amax(-1, keepdim=True)).int().argmax(-1)
    expected = torch.nn.functional.one_hot(first, planes.shape[-1]).view(x.shape).to(dtype)
    assert torch.equal(x_fused.grad, expected)


@pytest.mark.parametrize("positions", [[(0, 1, 2, 3)], [(1, 0, 0, 20), (1, 0, 0, 700)]], ids=["one", "two-blocks"])
def test_nan_is_the_maximum_at_its_first_position(backend, positions):
    """torch.max semantics on every backend: a plane holding NaN has max NaN and the max
    gradient goes to its first NaN (also when the NaNs sit in different tiles of a plane)."""
    x = torch.randn(2, 3, 2, 28, 28, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    for c, t, h, w in positions:
        x[1, c, t, h + w // 28, w % 28] = float("nan")
    x_fused = x.clone().requires_grad_()
    _, frame_max, _ = tfam_statistics(x_fused)
    _, expected_max, _ = tfam_statistics_reference(x)
    assert torch.equal(frame_max.isnan(), expected_max.isnan()) and frame_max.isnan().sum() == 1
    torch.testing.assert_close(frame_max.nan_to_num(), expected_max.nan_to_num(), rtol=0, atol=0)
    frame_max.nan_to_num().sum().backward()
    x_ref = x.clone().requires_grad_()
    tfam_statistics_reference(x_ref)[1].nan_to_num().sum().backward()
    assert torch.equal(x_fused.grad, x_ref.grad)


def test_noncontiguous_input(backend):
    x, ts, ss = _inputs((2, 3, 4, 5, 6), torch.float32)
    x_strided = x.transpose(3, 4).contiguous().transpose(3, 4)
    assert not x_strided.is_contiguous()
    ts, ss = ts.float(), ss.float()
    for out, ref in zip(tfam_statistics(x_strided), tfam_statistics_reference(x)):
        _close(out, ref, 1e-5, "statistics")
    _close(tfam_combine(x_strided, ts, ss), tfam_combine_reference(x, ts, ss), 1e-5, "combine")


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="x must be 5-D"):
        tfam_statistics(x[0])
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        tfam_statistics(x.long())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tfam_statistics(x.numpy())
    with pytest.raises(ValueError, match="C, T, H, W >= 1"):
        tfam_statistics(x[:, :0])
    with pytest.raises(ValueError, match=r"temporal_scale must be \(B, T\)"):
        tfam_combine(x, torch.ones(2, 5), torch.ones(2, 5, 6))
    with pytest.raises(ValueError, match=r"spatial_scale must be \(B, H, W\)"):
        tfam_combine(x, torch.ones(2, 4), torch.ones(2, 6, 5))
    with pytest.raises(TypeError, match="spatial_scale must have a floating dtype"):
        tfam_combine(x, torch.ones(2, 4), torch.ones(2, 5, 6, dtype=torch.int64))


def test_triton_rejects_float64():
    if backends._availability("triton", torch.device(DEVICE)):
        pytest.skip("triton unavailable here")
    with backends.use_backend("triton"), pytest.raises(TypeError, match="triton backend supports"):
        tfam_statistics(torch.randn(1, 1, 1, 2, 2, dtype=torch.float64, device=DEVICE))


def test_aot_variants_cover_every_launch():
    pytest.importorskip("triton")
    from piumr_kernels.tfam_pooling import triton_kernels

    variants = triton_kernels.aot_variants()
    names = [v.name for v in variants]
    assert len(names) == len(set(names))
    kernels = {
        triton_kernels._statistics_kernel,
        triton_kernels._statistics_backward_kernel,
        triton_kernels._combine_kernel,
        triton_kernels._combine_backward_kernel,
    }
    for kernel in kernels:
        for dtype in ("fp16", "bf16", "fp32"):
            tiers = {v.constexprs["BLOCK_HW"] for v in variants if v.kernel is kernel and f"[{dtype}," in v.name}
            assert tiers == set(triton_kernels.BLOCK_HW_TIERS)
    for positions in (1, 49, 196, 784, 3136, 6084):
        assert triton_kernels.block_hw(positions) in triton_kernels.BLOCK_HW_TIERS


def test_exported_at_package_level():
    assert piumr_kernels.tfam_statistics is tfam_statistics
    assert piumr_kernels.tfam_combine is tfam_combine


def _linked_model(x, weights, link, detach_max=False):
    """A TFAM-shaped graph: scales from the statistics of x, then the combine of the same x."""
    frame_mean, frame_max, spatial, tied = tfam_statistics(x, link=True) if link else (*tfam_statistics(x), None)
    frame_max = frame_max.detach() if detach_max else frame_max
    temporal = torch.tanh(frame_mean.mean(1) * weights[0] + frame_max.mean(1) * weights[1])
    spatial_scale = torch.sigmoid(spatial * weights[2])
    return tfam_combine(x, temporal, spatial_scale, link=tied)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("detach_max", [False, True], ids=["all-statistics", "max-unused"])
def test_linked_passes_match_the_reference(backend, dtype, detach_max):
    """Linked statistics and combine (one dx write on triton) give the fp64 reference's output
    and gradients of x and of the weights that make the scales."""
    x, _, _ = _inputs((2, 5, 4, 6, 7), dtype, seed=7)
    weights = torch.randn(3, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEVICE)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(DEVICE)
    x_ref, w_ref = x.double().requires_grad_(), weights.clone().requires_grad_()
    with backends.use_backend("reference"):
        expected = _linked_model(x_ref, w_ref, False, detach_max)
    expected_grads = torch.autograd.grad(expected, (x_ref, w_ref), grad)
    x_fused, w_fused = x.clone().requires_grad_(), weights.float().requires_grad_()
    out = _linked_model(x_fused, w_fused, True, detach_max)
    grads = torch.autograd.grad(out, (x_fused, w_fused), grad.to(dtype))
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    _close(out, expected, tol, "out")
    _close(grads[0], expected_grads[0], tol, "dx")
    _close(grads[1], expected_grads[1], 10 * tol, "dweights")


@pytest.mark.parametrize("index", [1])
@pytest.mark.parametrize(
    "shape", [(2, 5, 4, 6, 7), (1, 3, 4, 10, 20), (1, 2, 3, 20, 30)], ids=["tile64", "tile256", "tile1024"]
)
def test_triton_every_autotuned_config_matches_the_reference(index, shape, poisoned_empty):
    """Config `index` of every autotuned TFAM kernel (what a GPU may pick; the rest of the suite
    runs the first), with the element-wise passes at each BLOCK_HW tier: the passes linked (one
    dx write) and separate, output and gradients of x and the scale weights against fp64."""
    if backends._availability("triton", torch.device("cpu")):
        pytest.skip("triton cannot run on CPU tensors here")
    from piumr_kernels import triton_autotune
    from piumr_kernels.tfam_pooling import triton_kernels

    kernels = triton_autotune.autotuned_kernels(triton_kernels)
    assert max(len(kernel.tuning_configs) for kernel in kernels) == 2  # every index is tested
    x, _, _ = _inputs(shape, torch.float32, seed=10)
    weights = torch.randn(3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    x_ref, w_ref = x.double().requires_grad_(), weights.clone().requires_grad_()
    with backends.use_backend("reference"):
        expected = _linked_model(x_ref, w_ref, False)
    expected_grads = torch.autograd.grad(expected, (x_ref, w_ref), grad)
    for link in (True, False):
        x_fused, w_fused = x.clone().requires_grad_(), weights.float().requires_grad_()
        with contextlib.ExitStack() as stack, backends.use_backend("triton"):
            for kernel in kernels:
                stack.enter_context(triton_autotune.use_config(kernel, kernel.tuning_configs[index]))
            out = _linked_model(x_fused, w_fused, link)
            grads = torch.autograd.grad(out, (x_fused, w_fused), grad.float())
        _close(out, expected, 2e-5, f"out (link={link})")
        _close(grads[0], expected_grads[0], 2e-5, f"dx (link={link})")
        _close(grads[1], expected_grads[1], 2e-4, f"dweights (link={link})")


def test_linked_dx_without_scale_gradients(backend):
    """Scales that need no gradient: the combine backward reduces nothing and the linked
    statistics backward still adds the combine's dx term."""
    x, ts, ss = _inputs((2, 3, 4, 5, 6), torch.float32, seed=4)
    ts, ss = ts.float(), ss.float()
    x_fused = x.clone().requires_grad_()
    frame_mean, _, _, tied = tfam_statistics(x_fused, link=True)
    out = tfam_combine(x_fused, ts, ss, link=tied)
    (out.sum() + frame_mean.sum()).backward()
    x_ref = x.clone().requires_grad_()
    (tfam_combine_reference(x_ref, ts, ss).sum() + tfam_statistics_reference(x_ref)[0].sum()).backward()
    _close(x_fused.grad, x_ref.grad, 1e-5, "dx")


def test_link_only_on_triton_with_gradient(backend):
    x = torch.randn(1, 2, 3, 4, 5, device=DEVICE)
    assert tfam_statistics(x, link=True)[3] is None  # no gradient needed
    tied = tfam_statistics(x.requires_grad_(), link=True)[3]
    assert (tied is not None) == (backend == "triton")


def test_link_misuse_raises_clear_errors():
    x = torch.randn(1, 2, 3, 4, 5, requires_grad=True)
    ts, ss = torch.ones(1, 3), torch.ones(1, 4, 5)
    with backends.use_backend("triton") if backends.backend_available("triton") else backends.use_backend("reference"):
        tied = tfam_statistics(x, link=True)[3]
        if tied is None:
            pytest.skip("triton unavailable here")
        with pytest.raises(ValueError, match="link: it belongs to tfam_statistics of another"):
            tfam_combine(x.detach().clone(), ts, ss, link=tied)
        tfam_combine(x, ts, ss, link=tied)
        with pytest.raises(ValueError, match="link: it was already passed"):
            tfam_combine(x, ts, ss, link=tied)
    with pytest.raises(TypeError, match="link must be None or the TFAMLink"):
        tfam_combine(x, ts, ss, link=object())
    with pytest.raises(TypeError, match="link must be a bool"):
        tfam_statistics(x, link="yes")
