"""TFAM (SPEC §5): the module on every backend against a literal full-tensor reading of the spec.

`literal_tfam` below builds `x_t`, `x_t_hat` (frames of `x` really masked and the
statistics recomputed), `x_s` and the fusion exactly as SPEC §5 writes them, with
`dct_filter_bank` applied to `x` itself. TFAM computes the same from its two fused passes
over `x` and small tensors; agreeing with it checks those shortcuts.

Tolerances: float64 1e-9 (TFAM vs the literal form); fused backends vs the reference
backend in float32: 2e-5 (forward) and 1e-4 (gradients, which pass through Sinkhorn,
softmax and attention).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from models.modelling.tfam import TFAM, centered_cosine_affinity
from piumr_kernels import backends, dct_filter_bank

SHAPE = (2, 4, 5, 6, 7)  # T = 5 so the eval mask drops frame 3
CONFIGS = {
    "full": dict(),
    "mean_fusion": dict(fusion="mean"),
    "temporal_only": dict(frequency=False),
    "frequency_only": dict(temporal=False),
}


def _x(dtype=torch.float32, seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).to(DEVICE)


def _module(seed=0, **kwargs):
    torch.manual_seed(seed)
    module = TFAM(SHAPE[1], SHAPE[2], **kwargs)
    # Move every parameter off its initial value so no term vanishes by construction
    # (e.g. the zero-initialized mixing layer, DyT beta).
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return module.to(DEVICE)


def literal_tfam(module: TFAM, x: torch.Tensor) -> torch.Tensor:
    """SPEC §5 on full tensors, eval mode (fixed frame mask, no frequency noise)."""

    def temporal_branch(v):
        gate = module.temporal(v.mean(dim=(3, 4)), v.amax(dim=(3, 4)))
        return v * gate[:, None, :, None, None] + v

    def frequency_branch(v):
        freq = module.frequency
        energy, _, var = dct_filter_bank(v, freq.kernel_size, return_stats=True)
        var_map = var[:, :, None, None]
        z = energy + freq.beta_f[:, None, None] * var_map * torch.sign(energy)
        robust = freq.dyt_gamma[:, None, None] * torch.tanh(freq.dyt_alpha * z) + freq.dyt_beta[:, None, None]
        return v * torch.sigmoid(freq.conv(robust))[:, :, None] + v, robust, var

    if module.temporal is None and module.frequency is None:
        return x
    if module.frequency is None:
        return temporal_branch(x)
    x_s, robust, var = frequency_branch(x)
    if module.temporal is None:
        return x_s
    x_t = temporal_branch(x)
    if module.fusion == "mean":
        return 0.5 * x_t + 0.5 * x_s
    keep = ((torch.arange(x.shape[2], device=x.device) + 1) % module.eval_mask_period != 0).to(x.dtype)
    x_t_hat = temporal_branch(x * keep[None, None, :, None, None])
    s_t = F.cosine_similarity(x_t.mean(dim=(2, 3, 4)), x_t_hat.mean(dim=(2, 3, 4)), dim=-1)
    mean = robust.mean(dim=(2, 3))
    noise_mean = module.frequency.eval_noise.to(x.dtype) / math.sqrt(x.shape[3] * x.shape[4])
    s_s = F.cosine_similarity(
        mean, mean + var.clamp(module.frequency.eps_lo, module.frequency.eps_hi) * noise_mean, dim=-1
    )
    s_t, s_s = s_t.clamp_min(0), s_s.clamp_min(0)
    weight_t = (s_t / (s_t + s_s + 1e-6))[:, None, None, None, None]
    weight_s = (s_s / (s_t + s_s + 1e-6))[:, None, None, None, None]
    return weight_t * x_t + weight_s * x_s


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_literal_spec_float64(config):
    module = _module(**CONFIGS[config]).double().eval()
    x = _x(torch.float64)
    with backends.use_backend("reference"), torch.no_grad():
        torch.testing.assert_close(module(x), literal_tfam(module, x), atol=1e-9, rtol=1e-9)


def test_ablation_switches_change_only_what_they_claim():
    x = _x(torch.float64)
    full = _module().double().eval()
    outputs = {}
    for name, kwargs in CONFIGS.items():
        module = _module(**kwargs).double().eval()
        module.load_state_dict(full.state_dict(), strict=False)
        with torch.no_grad():
            outputs[name] = module(x)
    ones = torch.ones(())
    # Same gate and attention in every configuration, so the mixes are exact combinations.
    x_t, x_s = outputs["temporal_only"], outputs["frequency_only"]
    torch.testing.assert_close(outputs["mean_fusion"], 0.5 * x_t + 0.5 * x_s)
    # Consistency fusion: a per-sample convex combination of the same two branches, not 0.5/0.5.
    diff = x_t - x_s
    weight_t = ((outputs["full"] - x_s) * diff).sum(dim=(1, 2, 3, 4)) / diff.square().sum(dim=(1, 2, 3, 4))
    # lambda_t + lambda_s = 1 - O(1e-6) (the 1e-6 in the denominator), hence the tolerance.
    torch.testing.assert_close(outputs["full"], x_s + weight_t[:, None, None, None, None] * diff, atol=1e-5, rtol=1e-5)
    assert ((weight_t > 0) & (weight_t < ones)).all()
    assert not torch.allclose(weight_t, torch.full_like(weight_t, 0.5))
    # Temporal-only scales whole frames, frequency-only whole positions.
    ratio_t = x_t / x
    assert torch.allclose(ratio_t, ratio_t[..., :1, :1].expand_as(ratio_t))
    ratio_s = x_s / x
    assert torch.allclose(ratio_s, ratio_s[:, :1, :1].expand_as(ratio_s))


def test_both_branches_off_is_identity():
    module = TFAM(SHAPE[1], SHAPE[2], temporal=False, frequency=False)
    assert list(module.parameters()) == []
    x = _x()
    assert module(x) is x
    assert module.train()(x) is x


def test_every_parameter_receives_gradient_in_training():
    module = TFAM(SHAPE[1], SHAPE[2]).to(DEVICE).train()
    x = _x().requires_grad_()
    torch.manual_seed(0)
    module(x).square().mean().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got a zero gradient"
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train_fixed_seed"])
def test_fused_backends_match_reference_backend(backend, training):
    module = _module().train(training)
    x = _x()

    def run(name):
        module.zero_grad()
        x_in = x.clone().requires_grad_()
        torch.manual_seed(123)
        with backends.use_backend(name):
            out = module(x_in)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE))
        return out.detach(), x_in.grad, {n: p.grad.clone() for n, p in module.named_parameters()}

    out, grad_x, grads = run(backend)
    ref_out, ref_grad_x, ref_grads = run("reference")
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, atol=1e-4, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_eval_is_deterministic_and_training_is_not():
    module = _module()
    x = _x()
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(x), module(x))
    module.train()
    with torch.no_grad():
        assert not torch.equal(module(x), module(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(backend, dtype):
    module = _module().eval()
    x = _x(dtype)
    with torch.no_grad():
        out = module(x)
        ref = module(x.float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_compile_fullgraph_matches_eager():
    module = _module().eval()
    x = _x()
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    eager_out = module(x_eager)
    eager_out.square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    compiled_out = compiled(x_compiled)
    compiled_out.square().sum().backward()
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=1e-5, rtol=1e-5)
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(parameter.grad, eager_grads[name], atol=1e-4, rtol=1e-4)


def test_frame_masks():
    module = TFAM(3, 8, mask_prob=0.99).train()
    keep = module.frame_keep_mask(500, torch.device("cpu"))
    assert (keep.sum(dim=-1) >= 1).all()
    module.eval()
    expected = torch.tensor([1, 1, 1, 0, 1, 1, 1, 0.0])
    assert torch.equal(module.frame_keep_mask(2, torch.device("cpu")), expected.expand(2, 8))
    assert torch.equal(TFAM(3, 3).eval().frame_keep_mask(1, torch.device("cpu")), torch.ones(1, 3))


def test_zero_centered_descriptor_has_zero_affinity():
    # Integer values, so the temporal mean is exactly 0 and frame 2 (all zeros) centers to 0.
    u, w = torch.randint(-5, 6, (2, 1, 6)).double().unbind(0)
    descriptors = torch.stack([u, -u, torch.zeros_like(u), w, -w], dim=-1)
    affinity = centered_cosine_affinity(descriptors)
    assert torch.equal(affinity[0, 2], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(affinity[0, :, 2], torch.zeros(5, dtype=torch.float64))


def test_mixing_layer_starts_at_equal_weights():
    module = TFAM(3, 4)
    assert torch.count_nonzero(module.temporal.mix.weight) == 0
    assert torch.count_nonzero(module.temporal.mix.bias) == 0


def test_bad_arguments_raise_clear_errors():
    module = TFAM(SHAPE[1], SHAPE[2])
    with pytest.raises(ValueError, match=r"x must be \(B, C=4, T=5, H, W\)"):
        module(torch.randn(2, 3, 5, 6, 7))
    with pytest.raises(ValueError, match=r"x must be \(B, C=4, T=5, H, W\)"):
        module(torch.randn(2, 4, 6, 6, 7))
    with pytest.raises(ValueError, match="fusion must be one of"):
        TFAM(4, 5, fusion="max")
    with pytest.raises(ValueError, match="mask_prob"):
        TFAM(4, 5, mask_prob=1.0)
    with pytest.raises(ValueError, match="num_frames must be an int >= 1"):
        TFAM(4, 0)


class _LargeTensorOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that reads or writes a tensor with as many elements as `x`."""

    def __init__(self, numel):
        super().__init__()
        self.numel = numel
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.numel() == self.numel for t in tensors):
            self.ops.append(func.__name__.split(".")[0])
        return out


def test_forward_touches_x_in_exactly_two_fused_passes(backend):
    if backend == "reference":
        pytest.skip("the reference backend is the unfused baseline")
    module = _module().train()
    x = _x()
    recorder = _LargeTensorOps(x.numel())
    with torch.no_grad(), recorder:
        module(x)
    assert recorder.ops == [f"tfam_statistics_{backend}", f"tfam_combine_{backend}"]
