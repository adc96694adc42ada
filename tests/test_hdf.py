"""HDF (SPEC §8): DAM against a literal reading of the released code, the model, DSM and SAM.

`literal_dam` below follows HDF's `models/DAM.py` step by step on the full tensor: the
`(B, T, C, H, W)` permutation, `nn.AdaptiveAvgPool3d` / `nn.AdaptiveMaxPool3d((T, 1, 1))`,
the norms, the DCT map as `F.conv2d` of the temporal mean with the basis repeated over
channels, and the two branches applied to `x` separately before the fusion. DAM computes
the same from two fused passes and small tensors.

Tolerances: float64 1e-9 (DAM vs the literal form, forward and gradients); fused backends
vs the reference backend in float32: 2e-5 (forward), 1e-4 (gradients); DSM identities in
float64 to 1e-9, except the flat-weight limit (eta = 1e8: weights flat to ~1e-8 relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch import nn

from models.modelling.hdf import DAM, DSMLoss, build_hdf, channel_bins
from models.modelling.x3d import X3DPreset
from piumr_kernels import backends, dct_basis

# (B, C, T, H, W): C < T (overlapping channel bins), C not a multiple of T, C a multiple of T.
SHAPES = [(2, 3, 5, 6, 7), (2, 7, 4, 5, 6), (1, 8, 4, 7, 5)]
TINY = X3DPreset("tiny", depth_factor=0.2, num_frames=4, crop_size=32)


def _x(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).to(DEVICE)


def _dam(shape, seed=0):
    torch.manual_seed(seed)
    module = DAM(shape[1], shape[2])
    # Move every parameter off HDF's initial value so no term vanishes by construction
    # (Delta and adv_b start at zero, DyT beta at zero).
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return module.to(DEVICE)


def literal_dam(m: DAM, x: torch.Tensor) -> torch.Tensor:
    """HDF's DAM.forward on `x` `(B, C, T, H, W)`, in the code's `(B, T, C, H, W)` layout."""
    batch, channels, frames, height, width = x.shape
    v = x.permute(0, 2, 1, 3, 4)
    # LocalGlobalRobustModule on the adaptive pools (channels pooled into T bins).
    avg_map = nn.AdaptiveAvgPool3d((frames, 1, 1))(v)
    max_map = nn.AdaptiveMaxPool3d((frames, 1, 1))(v)
    wasserstein = torch.norm(avg_map - avg_map.mean(dim=2, keepdim=True), p=2, dim=2, keepdim=True)
    wasserstein = wasserstein.repeat(1, 1, frames, 1, 1)
    fused = m.alpha * avg_map + m.beta * max_map
    diff = torch.norm(avg_map[:, :, 1:] - avg_map[:, :, :-1], p=2, dim=[3, 4], keepdim=True)
    diff = F.pad(diff, (0, 0, 0, 0, 1, 0))
    gamma, delta = m.gamma[None, :, :, None, None], m.delta[None, :, :, None, None]
    temporal_map = torch.sigmoid(gamma * fused + delta * wasserstein - diff)
    temporal_map = temporal_map[..., 0, 0].transpose(1, 2)  # 'b t c 1 1 -> b c t'
    temporal_map = F.linear(temporal_map, m.frame_proj.weight).transpose(1, 2)
    q = F.linear(temporal_map, m.query.weight, m.query.bias)
    k = F.linear(temporal_map, m.key.weight, m.key.bias)
    val = F.linear(temporal_map, m.value.weight, m.value.bias)
    attn = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / frames**0.5, dim=-1)
    t_gate = torch.sigmoid(torch.bmm(attn, val).mean(dim=2))[:, :, None, None, None]
    x_t = v * t_gate + v
    # The frequency branch: Conv2d of the temporal mean, the same filter on every channel.
    weight = dct_basis(m.kernel_size, dtype=x.dtype).to(x.device)[:, None].repeat(1, channels, 1, 1)
    dct_feat = F.conv2d(v.mean(dim=1), weight, padding=m.kernel_size // 2)
    spread = torch.norm(dct_feat - dct_feat.mean(dim=[2, 3], keepdim=True), p=2, dim=[2, 3], keepdim=True)
    per_freq = lambda p: p[None, :, None, None]
    adv = dct_feat + (
        per_freq(m.noise) * per_freq(m.adv_a) * torch.sign(dct_feat)
        + 0.05 * per_freq(m.adv_b) * spread * torch.sign(dct_feat)
    )
    dct_feat = (m.al * dct_feat + m.be * adv) / 2
    std = torch.sqrt(dct_feat.var(dim=1, keepdim=True) + 1e-6)
    dct_feat = torch.tanh(m.dyt_alpha / (std + 1e-6) * dct_feat) * per_freq(m.dyt_gamma) + per_freq(m.dyt_beta)
    freq_map = F.conv2d(dct_feat, m.conv.weight, padding=3).unsqueeze(1)
    x_s = v * torch.sigmoid(freq_map) + v
    return ((m.w_t * x_t + m.w_s * x_s) / 2).permute(0, 2, 1, 3, 4)


def _forward_backward(module, x, upstream, forward=None):
    """Output, input gradient and parameter gradients of `forward` (default: the module)."""
    module.zero_grad()
    x = x.clone().requires_grad_()
    out = (forward or module)(x)
    out.backward(upstream)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dam_matches_literal_code_float64(shape):
    module = _dam(shape).double()
    x = _x(shape, torch.float64, seed=1)
    upstream = _x(shape, torch.float64, seed=2)
    with backends.use_backend("reference"):
        out, grad_x, grads = _forward_backward(module, x, upstream)
    ref_out, ref_grad_x, ref_grads = _forward_backward(module, x, upstream, lambda v: literal_dam(module, v))
    torch.testing.assert_close(out, ref_out, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(grad_x, ref_grad_x, atol=1e-9, rtol=1e-9)
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], atol=1e-9, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("channels,bins", [(3, 5), (7, 4), (8, 4), (24, 16), (1, 3)])
def test_channel_bins_are_adaptive_pooling_bins(channels, bins):
    weights, mask = channel_bins(channels, bins)
    expected = nn.AdaptiveAvgPool1d(bins)(torch.eye(channels, dtype=torch.float64)).T
    torch.testing.assert_close(weights, expected, atol=1e-15, rtol=0)
    assert torch.equal(mask, expected > 0)


def test_every_parameter_receives_gradient_from_hdf_initial_values():
    shape = SHAPES[0]
    module = DAM(shape[1], shape[2]).to(DEVICE)
    x = _x(shape).requires_grad_()
    module(x).backward(_x(shape, seed=3))
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got a zero gradient"
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_initial_values_are_hdfs():
    module = DAM(6, 4)
    scalars = {"alpha": 0.5, "beta": 0.5, "al": 0.5, "be": 0.5, "dyt_alpha": 0.5, "w_t": 0.8, "w_s": 0.3}
    for name, value in scalars.items():
        assert torch.equal(getattr(module, name).detach(), torch.tensor(value)), name
    for name, value in (("gamma", 1), ("delta", 0), ("adv_a", 1), ("adv_b", 0), ("dyt_gamma", 1), ("dyt_beta", 0)):
        assert torch.equal(getattr(module, name), torch.full_like(getattr(module, name), value)), name
    assert module.gamma.shape == (4, 4) and module.adv_a.shape == (49,)
    # The noise is a drawn constant of standard deviation 0.1 (49 draws: a loose band).
    assert 0.05 < float(module.noise.detach().std()) < 0.2


def test_fused_backends_match_reference_backend(backend):
    shape = SHAPES[0]
    module = _dam(shape)
    x, upstream = _x(shape, seed=4), _x(shape, seed=5)
    out, grad_x, grads = _forward_backward(module, x, upstream)
    with backends.use_backend("reference"):
        ref_out, ref_grad_x, ref_grads = _forward_backward(module, x, upstream)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, atol=1e-4, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_forward_touches_x_in_exactly_two_fused_passes(backend):
    from test_tfam import _LargeTensorOps

    if backend == "reference":
        pytest.skip("the reference backend is the unfused baseline")
    shape = SHAPES[0]
    module, x = _dam(shape), _x(shape)
    recorder = _LargeTensorOps(x.numel())
    with torch.no_grad(), recorder:
        module(x)
    assert recorder.ops == [f"tfam_statistics_{backend}", f"tfam_combine_{backend}"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(dtype):
    shape = SHAPES[1]
    module, x = _dam(shape), _x(shape, dtype)
    with torch.no_grad():
        out, ref = module(x), module(x.float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_bad_arguments_raise_clear_errors():
    module = DAM(4, 5)
    with pytest.raises(ValueError, match=r"x must be \(B, C=4, T=5, H, W\)"):
        module(torch.randn(2, 3, 5, 6, 7))
    with pytest.raises(ValueError, match="num_frames must be an int >= 1, got 0"):
        DAM(4, 0)
    with pytest.raises(ValueError, match="kernel_size must be an odd int >= 1, got 4"):
        DAM(4, 5, kernel_size=4)
    with pytest.raises(ValueError, match="dam_stages must be distinct names"):
        build_hdf(TINY, 3, dam_stages=("res2", "res6"))


# --------------------------------------------------------------------------- the model


def test_hdf_model_forward_backward():
    torch.manual_seed(0)
    model = build_hdf(TINY, 7)
    assert {name: (m.channels, m.num_frames) for name, m in model.dam.items()} == {
        "res2": (24, 4),
        "res3": (48, 4),
        "res4": (96, 4),
        "res5": (192, 4),
    }
    x = _x((2, 3, 4, 64, 64), seed=6)  # res5 at 2 x 2: a 1 x 1 map has no spatial spread to learn from
    logits, features = model(x)
    assert logits.shape == (2, 7) and features.shape == (2, 2048)
    (logits.square().sum() + features.sum()).backward()
    for stage, module in model.dam.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), stage
    with pytest.raises(ValueError, match="T = num_frames = 4"):
        model(_x((1, 3, 5, 32, 32)))
    assert list(build_hdf(TINY, 7, dam_stages=("res4",)).dam) == ["res4"]


@pytest.mark.slow
def test_hdf_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    model = build_hdf(TINY, 5).eval()
    x = _x((2, 3, 4, 32, 32), seed=7)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- DSM


def _batch(seed=0, batch=10, dim=6, classes=3):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    labels[-1] = classes  # one anchor without a positive: it gives 0 and still counts in the mean
    logits = torch.randn(batch, classes + 1, generator=generator, dtype=torch.float64)
    return logits, features, labels


def supcon(features, labels, tau):
    """Supervised contrastive loss: self excluded, mean over every anchor (0 without positives)."""
    unit = F.normalize(features, dim=1)
    logits = unit @ unit.T / tau
    n = len(labels)
    losses = []
    for i in range(n):
        others = [k for k in range(n) if k != i]
        log_norm = torch.logsumexp(logits[i, others], dim=0)
        positives = [j for j in others if labels[j] == labels[i]]
        losses.append(
            -sum(logits[i, j] - log_norm for j in positives) / max(len(positives), 1)
            if positives
            else logits.new_zeros(())
        )
    return torch.stack(losses).mean()


def code_form_dsm(features, target, temperature=0.07, beta=0.1, eta=0.2):
    """HDF's DSM (models/DSM.py) with its undefined `positive_mask` taken as same-label
    without self, and SPEC §3's decisions where the code is degenerate: the Gaussian on the
    cosine (not on the row-max-shifted logit), self left out of the weights and the
    normalizer, weights scaled to mean one. Weights carry gradient and the IB term is
    subtracted, as in the code (its `+ 1e-6 I` only shifts the value by a constant: left out)."""
    features = F.normalize(features, dim=1)
    cosine = features @ features.T
    logits = cosine / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    labels = target.view(-1, 1)
    self_mask = torch.eye(len(target), dtype=torch.bool)
    positive_mask = ((labels == labels.T) & ~self_mask).double()
    dro_weights = torch.exp(-0.5 * ((cosine - eta) / eta) ** 2).masked_fill(self_mask, 0)
    dro_weights = (len(target) - 1) * dro_weights / dro_weights.sum(dim=1, keepdim=True)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    contrastive = -(positive_mask * dro_weights * log_prob).sum(dim=1) / positive_mask.sum(dim=1).clamp(min=1e-8)
    ib_penalty = torch.trace(torch.cov(features.T))
    return contrastive.mean() - beta * ib_penalty


def test_dsm_flat_weight_limit_is_supcon_plus_ib():
    logits, features, labels = _batch()
    features.requires_grad_()
    loss, parts = DSMLoss(eta=1e8, label_smoothing=0.1)(logits, features, labels)
    unit = F.normalize(features, dim=1)
    expected_sc = supcon(features, labels, 0.07)
    expected = 10 * F.cross_entropy(logits, labels, label_smoothing=0.1) + 0.1 * (
        expected_sc + 0.1 * torch.trace(torch.cov(unit.T))
    )
    torch.testing.assert_close(parts["girl"], expected_sc.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(loss, features)
    (expected_grad,) = torch.autograd.grad(expected, features)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_dsm_code_variants_reproduce_the_code_form(seed):
    _, features, labels = _batch(seed)
    features.requires_grad_()
    criterion = DSMLoss(lambda_ce=0.0, lambda_sc=1.0, ib_sign=-1, detach_weights=False)
    loss, _ = criterion(torch.zeros(len(labels), 4, dtype=torch.float64), features, labels)
    expected = code_form_dsm(features, labels)
    torch.testing.assert_close(loss, expected, atol=1e-9, rtol=1e-9)
    (grad,) = torch.autograd.grad(loss, features)
    (expected_grad,) = torch.autograd.grad(expected, features)
    torch.testing.assert_close(grad, expected_grad, atol=1e-9, rtol=1e-9)
    # Held-constant weights (the default) change the gradient, not the value.
    detached = DSMLoss(lambda_ce=0.0, lambda_sc=1.0, ib_sign=-1)
    loss_detached, _ = detached(torch.zeros(len(labels), 4, dtype=torch.float64), features, labels)
    torch.testing.assert_close(loss_detached, expected, atol=1e-9, rtol=1e-9)
    (grad_detached,) = torch.autograd.grad(loss_detached, features)
    assert not torch.allclose(grad_detached, expected_grad, atol=1e-6)


def test_dsm_gradient_norm_scaling():
    logits, features, labels = _batch(2)
    criterion = DSMLoss(scaling="gradient", alpha=10.0, beta=0.1)
    fixed = DSMLoss(lambda_ce=1.0, lambda_sc=1.0)
    _, parts = fixed(logits, features, labels)
    dsm = parts["girl"] + 0.1 * parts["ib"]
    for norm, g in ((None, 1.0), (3.5, 3.5), (float("inf"), 3.5), (0.25, 0.25)):
        if norm is not None:
            criterion.observe_grad_norm(norm)  # a non-finite norm (a skipped fp16 step) keeps the last one
        loss, _ = criterion(logits, features, labels)
        expected = 10 * g / (g + 1) * parts["ce"] + 0.1 / (g + 1) * dsm
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    assert "grad_norm" in criterion.state_dict()


def test_dsm_bad_arguments():
    with pytest.raises(ValueError, match="scaling must be one of"):
        DSMLoss(scaling="adaptive")
    with pytest.raises(ValueError, match="ib_sign must be 1 or -1, got 0"):
        DSMLoss(ib_sign=0)
    with pytest.raises(ValueError, match=r"lambda_ib must be a finite number in \[0.0, inf\], got -1"):
        DSMLoss(lambda_ib=-1)
    logits, features, labels = _batch()
    with pytest.raises(ValueError, match="groups: DSM contrasts the whole batch"):
        DSMLoss()(logits, features, labels, groups=torch.zeros_like(labels), num_groups=1)


# --------------------------------------------------------------------------- SAM


def _small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(12, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (12,), generator=generator)


def _sam_step(model, sam, x, y, scaler=None):
    """The training loop's SAM step: backward, ascent, second backward, restore, step."""
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    sam.zero_grad()
    scale(F.cross_entropy(model(x), y)).backward()
    sam.ascent_step()
    scale(F.cross_entropy(model(x), y)).backward()
    sam.restore()
    if scaler is None:
        sam.step()
    else:
        scaler.unscale_(sam)
        scaler.step(sam)
        scaler.update()


def test_sam_step_equals_hand_written_two_pass_step():
    from models.training.sam import SAM

    x, y = _data()
    model, reference = _small_model(), _small_model()
    sam = SAM(torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05), rho=0.05)
    adamw = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.05)
    for _ in range(2):  # the second step also exercises AdamW's moments
        _sam_step(model, sam, x, y)
        # By hand: g at w, e = rho g / ||g||, the gradient at w + e, AdamW at w with it.
        params = dict(reference.named_parameters())
        grads = torch.autograd.grad(F.cross_entropy(reference(x), y), list(params.values()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        shifted = {name: p.detach() + 0.05 * g / (norm + 1e-16) for (name, p), g in zip(params.items(), grads)}
        shifted = {name: p.requires_grad_() for name, p in shifted.items()}
        loss = F.cross_entropy(torch.func.functional_call(reference, shifted, (x,)), y)
        for p, g in zip(params.values(), torch.autograd.grad(loss, list(shifted.values()))):
            p.grad = g
        adamw.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    # SAM is not plain AdamW: the gradient at w + e differs from the one at w.
    plain = _small_model()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=0.01, weight_decay=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        optimizer.step()
    assert not torch.allclose(plain[0].weight, model[0].weight, atol=1e-8)


def test_sam_under_grad_scaler_equals_unscaled_and_skips_a_non_finite_ascent():
    from models.training.sam import SAM

    x, y = _data(1)
    model, reference = _small_model(), _small_model()
    sam = SAM(torch.optim.AdamW(model.parameters(), lr=0.01))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _sam_step(model, sam, x, y, scaler)
    reference_sam = SAM(torch.optim.AdamW(reference.parameters(), lr=0.01))
    _sam_step(reference, reference_sam, x, y)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-10)
    # An overflowing first pass: no step, weights unchanged, the scale backs off.
    before = [p.detach().clone() for p in model.parameters()]
    scale_before = scaler.get_scale()
    sam.zero_grad()
    (scaler.scale(F.cross_entropy(model(x), y)) * float("inf")).backward()
    sam.ascent_step()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    sam.restore()
    scaler.unscale_(sam)
    scaler.step(sam)
    scaler.update()
    assert scaler.get_scale() < scale_before
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_sam_protocol_errors():
    from models.training.sam import SAM

    model = _small_model()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        sam.ascent_step()
    with pytest.raises(RuntimeError, match="not perturbed"):
        sam.restore()
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    sam.ascent_step()
    with pytest.raises(RuntimeError, match="still perturbed"):
        sam.step()
    with pytest.raises(ValueError, match="rho must be a finite number > 0, got 0.0"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.0)
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer"):
        SAM(model, rho=0.05)


def _ddp_sam_worker(rank, world_size, init_file, result_file):
    from models.training.sam import SAM

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = torch.nn.parallel.DistributedDataParallel(_small_model())
    sam = SAM(torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05))
    x, y = _data()
    shard = slice(rank * 6, (rank + 1) * 6)  # each rank its own half of the batch
    _sam_step(model, sam, x[shard], y[shard])
    if rank == 0:
        torch.save(model.module.state_dict(), result_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sam_under_ddp_ascends_along_the_global_gradient(tmp_path):
    """Two gloo ranks, each with half the batch, end at the weights of one process on the
    whole batch: the ascent used the all-reduced gradient, not each rank's own."""
    from models.training.sam import SAM

    result = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_ddp_sam_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2)
    model = _small_model()
    x, y = _data()
    _sam_step(model, SAM(torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)), x, y)
    for name, value in torch.load(result, weights_only=True).items():
        torch.testing.assert_close(value, model.state_dict()[name], atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "model, flags, module_key",
    [
        ("hdf", ["--optimizer", "sam_adamw", "--dsm-scaling", "gradient", "--label-smoothing", "0.1"], "dam.res5."),
        ("piumr", ["--optimizer", "sam_adamw"], "tfam.res5."),  # SAM serves any model
    ],
)
def test_train_command_runs_an_epoch(tmp_path, model, flags, module_key):
    from models import train
    from models.training.checkpointing import load_checkpoint
    from tests.train_helpers import tiny_args

    args = tiny_args(tmp_path / model, epochs=1, train_clips=16, eval_clips=8) + ["--model", model, *flags]
    summary = train.main(args)
    record = summary["history"][0]
    assert summary["epochs_done"] == 1 and torch.isfinite(torch.tensor(record["train_loss"]))
    assert 0.0 <= summary["test"]["action_top1"] <= 1.0
    ckpt = load_checkpoint(tmp_path / model / "last.pt")
    assert ckpt["config"]["model"] == model and ckpt["config"]["optimizer"] == "sam_adamw"
    assert any(key.startswith(module_key) for key in ckpt["model"])


def test_hdf_config_rules():
    from models.errors import ConfigError
    from models.training.config import DFEW_CONFIG, resolve_config

    recipe = resolve_config({"data_root": "/data/DFEW"}, DFEW_CONFIG)  # --data-root keeps the file's dfew
    assert (recipe.dataset, recipe.model, recipe.optimizer, recipe.crop_size, recipe.lr) == (
        "dfew",
        "hdf",
        "sam_adamw",
        112,
        5e-4,
    )
    assert resolve_config({"data_root": "/data/MA-52"}).dataset == "ma52"  # from the synthetic default
    for overrides, message in (
        ({"model": "hdf", "girl_groups": "subject"}, "DSM contrasts the whole batch"),
        ({"dataset": "dfew"}, "the dfew dataset needs --data-root"),
        ({"dfew_fold": 6}, r"expected a fold in 1..5, got 6"),
        ({"label_smoothing": 1.5}, r"expected a value in \[0, 1\], got 1.5"),
        ({"sam_rho": 0.0}, r"'sam_rho': expected a value > 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve_config(overrides)
