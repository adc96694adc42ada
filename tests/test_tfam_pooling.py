"""TFAM's fused passes (tfam_statistics, tfam_combine) on every backend against the float64 reference.

Inputs are rounded to the tested dtype first and the reference runs in float64 on those
rounded values, so the tolerances below measure only the kernels' own error:
- statistics and scale gradients (float32 accumulation; float64 for float64 inputs):
  STAT_TOL;
- values stored in the dtype of `x` (combined output, dx): OUT_TOL, about two roundings.
"""

import pytest
import torch

import piumr_kernels
from piumr_kernels import backends, tfam_combine, tfam_statistics
from piumr_kernels.tfam_pooling import tfam_combine_reference, tfam_statistics_reference

from conftest import DEVICE

STAT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
OUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (B, C, T, H, W): 20 planes per sample (two chunks of 16), H * W above the largest Triton
# block (two blocks), and single-position planes.
SHAPES = [(2, 5, 4, 6, 7), (1, 2, 3, 33, 35), (3, 1, 1, 1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend has no float64")


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, _, frames, height, width = shape
    x = torch.randn(shape, generator=generator).to(dtype)
    ts = torch.randn(batch, frames, generator=generator, dtype=torch.float64)
    ss = torch.randn(batch, height, width, generator=generator, dtype=torch.float64)
    return x.to(DEVICE), ts.to(DEVICE), ss.to(DEVICE)


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_forward_backward_match_float64_reference(backend, shape, dtype, poisoned_empty):
    _skip_unsupported(backend, dtype)
    x, _, _ = _inputs(shape, dtype)
    generator = torch.Generator().manual_seed(1)
    batch, channels, frames, height, width = shape
    grads = [torch.randn(batch, channels, frames, generator=generator).to(DEVICE),
             torch.randn(batch, channels, frames, generator=generator).to(DEVICE),
             torch.randn(batch, height, width, generator=generator).to(DEVICE)]

    x_fused = x.clone().requires_grad_()
    outputs = tfam_statistics(x_fused)
    torch.autograd.backward(outputs, [g.to(_acc(dtype)) for g in grads])
    with backends.use_backend("reference"):
        x_ref = x.double().requires_grad_()
        expected = tfam_statistics_reference(x_ref)
        torch.autograd.backward(expected, [g.double() for g in grads])

    for name, out, ref in zip(("frame_mean", "frame_max", "spatial"), outputs, expected):
        assert out.dtype == _acc(dtype)
        _close(out, ref, STAT_TOL[dtype], name)
    assert x_fused.grad.dtype == dtype
    _close(x_fused.grad, x_ref.grad, OUT_TOL[dtype], "dx")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_forward_backward_match_float64_reference(backend, shape, dtype, poisoned_empty):
    _skip_unsupported(backend, dtype)
    x, ts, ss = _inputs(shape, dtype)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)

    x_fused = x.clone().requires_grad_()
    ts_fused = ts.to(_acc(dtype)).requires_grad_()
    ss_fused = ss.to(_acc(dtype)).requires_grad_()
    out = tfam_combine(x_fused, ts_fused, ss_fused)
    out.backward(grad_out)
    x_ref, ts_ref, ss_ref = (t.double().requires_grad_() for t in (x, ts_fused.detach(), ss_fused.detach()))
    expected = tfam_combine_reference(x_ref, ts_ref, ss_ref)
    expected.backward(grad_out.double())

    assert out.dtype == dtype and x_fused.grad.dtype == dtype
    _close(out, expected, OUT_TOL[dtype], "out")
    _close(x_fused.grad, x_ref.grad, OUT_TOL[dtype], "dx")
    _close(ts_fused.grad, ts_ref.grad, STAT_TOL[dtype] * 10, "d temporal_scale")
    _close(ss_fused.grad, ss_ref.grad, STAT_TOL[dtype] * 10, "d spatial_scale")


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


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_gradcheck_float64(name):
    reason = backends._availability(name, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    x, ts, ss = _inputs((2, 3, 2, 3, 4), torch.float64)
    x, ts, ss = (t.cpu().requires_grad_() for t in (x, ts, ss))
    with backends.use_backend(name):
        assert torch.autograd.gradcheck(lambda v: tfam_statistics(v), (x,))
        assert torch.autograd.gradcheck(tfam_combine, (x, ts, ss))


def test_noncontiguous_input(backend):
    x, ts, ss = _inputs((2, 3, 4, 5, 6), torch.float32)
    x_strided = x.transpose(3, 4).contiguous().transpose(3, 4)
    assert not x_strided.is_contiguous()
    ts, ss = ts.float(), ss.float()
    for out, ref in zip(tfam_statistics(x_strided), tfam_statistics_reference(x)):
        _close(out, ref, 1e-5, "statistics")
    _close(tfam_combine(x_strided, ts, ss), tfam_combine_reference(x, ts, ss), 1e-5, "combine")


def test_compile_fullgraph_matches_eager(backend):
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("torch.compile of Triton kernels needs a GPU (the interpreter runs eagerly only)")
    x, ts, ss = _inputs((2, 3, 4, 5, 6), torch.float32)
    ts, ss = ts.float(), ss.float()

    def passes(v):
        frame_mean, frame_max, spatial = tfam_statistics(v)
        scale_t = ts + frame_mean.mean(1) + frame_max.mean(1)
        return tfam_combine(v, scale_t, ss + spatial)

    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    torch._dynamo.reset()
    eager = passes(x_eager)
    compiled = torch.compile(passes, fullgraph=True)(x_compiled)
    eager.square().sum().backward()
    compiled.square().sum().backward()
    _close(compiled, eager, 1e-5, "forward")
    _close(x_compiled.grad, x_eager.grad, 1e-5, "dx")


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
    kernels = {triton_kernels._statistics_kernel, triton_kernels._statistics_backward_kernel,
               triton_kernels._combine_kernel, triton_kernels._combine_backward_kernel}
    for kernel in kernels:
        for dtype in ("fp16", "bf16", "fp32"):
            tiers = {v.constexprs["BLOCK_HW"] for v in variants if v.kernel is kernel and f"[{dtype}," in v.name}
            assert tiers == set(triton_kernels.BLOCK_HW_TIERS)
    for positions in (1, 49, 196, 784, 3136, 6084):
        assert triton_kernels.block_hw(positions) in triton_kernels.BLOCK_HW_TIERS


def test_exported_at_package_level():
    assert piumr_kernels.tfam_statistics is tfam_statistics
    assert piumr_kernels.tfam_combine is tfam_combine
