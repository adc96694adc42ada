"""PIUmr model assembly (X3D + TFAM) and its objective CE + lambda * GIRL.

Small clips throughout (CPU). Tolerances: eager vs torch.compile and reference vs cpp
backends agree to 1e-4 relative / 1e-5 absolute in float32 (different summation orders
over a 20+-layer network); loss identities are exact.
"""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F

import piumr_kernels
from models.modelling.piumr import ABLATIONS, PIUmr, PIUmrLoss, build_piumr
from models.modelling.tfam import TFAM
from models.modelling.x3d import PRESETS, build_x3d
from piumr_kernels import backends

SMALL = {"XS": (4, 32), "S": (13, 16), "M": (16, 16), "L": (16, 16)}  # (T, H = W) per preset family


def clip(preset: str, batch: int = 4, seed: int = 0) -> torch.Tensor:
    frames, size = SMALL[preset]
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def tfams(model: PIUmr) -> dict[str, TFAM]:
    return {name: module for name, module in model.named_modules() if isinstance(module, TFAM)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_forward_backward_each_preset(preset):
    torch.manual_seed(0)
    model = build_piumr(preset, 6)
    x = clip(preset, batch=6)
    logits, features = model(x)
    assert logits.shape == (6, 6) and features.shape == (6, 2048)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])  # each group: a positive pair and a negative
    loss, parts = PIUmrLoss(num_groups=2)(logits, features, labels, groups=groups)
    assert parts["girl"] > 0
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    for stage, module in model.tfam.items():
        assert any(p.grad.abs().sum() > 0 for p in module.parameters()), stage


def test_tfam_follows_every_stage_by_default_with_stage_widths():
    model = build_piumr("XS", 10)
    assert {name: (m.channels, m.num_frames) for name, m in model.tfam.items()} == {
        "res2": (24, 4),
        "res3": (48, 4),
        "res4": (96, 4),
        "res5": (192, 4),
    }
    assert set(tfams(model)) == {f"tfam.{stage}" for stage in ("res2", "res3", "res4", "res5")}


def test_selected_stages_only():
    model = build_piumr("XS", 10, tfam_stages=("res5", "res3"))
    assert list(model.tfam) == ["res3", "res5"]
    assert model.tfam["res5"].channels == 192


def test_tfam_off_is_plain_x3d():
    torch.manual_seed(0)
    model = build_piumr("XS", 10, tfam=False).eval()
    assert tfams(model) == {}
    reference = build_x3d("XS", 10).eval()
    assert [k.removeprefix("backbone.") for k in model.state_dict()] == list(reference.state_dict())
    reference.load_state_dict(model.backbone.state_dict())
    x = clip("XS", seed=1)
    with torch.no_grad():
        logits, features = model(x)
        torch.testing.assert_close(logits, reference(x), rtol=0, atol=0)
        torch.testing.assert_close(features, reference.forward_features(x), rtol=0, atol=0)
    # Without TFAM any clip length works.
    with torch.no_grad():
        assert model(torch.randn(1, 3, 7, 32, 32))[0].shape == (1, 10)


@pytest.mark.parametrize(
    "name, temporal, frequency, fusion",
    [
        ("temporal_only", True, False, "consistency"),
        ("frequency_only", False, True, "consistency"),
        ("mean_fusion", True, True, "mean"),
        ("full", True, True, "consistency"),
    ],
)
def test_tfam_ablation_rows_build_what_they_claim(name, temporal, frequency, fusion):
    row = ABLATIONS[name]
    model = build_piumr("XS", 10, **row.model_kwargs())
    assert len(model.tfam) == 4 and row.girl
    for module in model.tfam.values():
        assert (module.temporal is not None, module.frequency is not None, module.fusion) == (
            temporal,
            frequency,
            fusion,
        )


def test_component_ablation_rows():
    assert not any(tfams(build_piumr("XS", 10, **ABLATIONS["baseline"].model_kwargs())).values())
    assert not ABLATIONS["baseline"].girl
    assert len(build_piumr("XS", 10, **ABLATIONS["tfam_only"].model_kwargs()).tfam) == 4
    assert not ABLATIONS["tfam_only"].girl
    assert len(build_piumr("XS", 10, **ABLATIONS["girl_only"].model_kwargs()).tfam) == 0
    assert PIUmrLoss(**ABLATIONS["girl_only"].loss_kwargs()).girl is not None


def test_each_tfam_switch_changes_the_output():
    """Same weights, one switch flipped: the eval-mode outputs differ."""
    x = clip("XS", seed=2)
    outputs = {}
    for name in ("temporal_only", "frequency_only", "mean_fusion", "full"):
        torch.manual_seed(0)  # identical backbone and TFAM parameters where they exist
        model = build_piumr("XS", 10, dropout_rate=0.0, **ABLATIONS[name].model_kwargs()).eval()
        # Break the symmetric initialisation so both branches matter.
        with torch.no_grad():
            for module in model.tfam.values():
                if module.temporal is not None:
                    module.temporal.beta.fill_(0.7)
                if module.frequency is not None:
                    module.frequency.conv.weight.mul_(3.0)
            outputs[name] = model(x)[1]
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not torch.allclose(outputs[first], outputs[second], rtol=1e-4, atol=1e-6), (first, second)


def test_girl_off_loss_is_cross_entropy():
    logits, features = torch.randn(8, 5, requires_grad=True), torch.randn(8, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    loss, parts = PIUmrLoss(girl=False)(logits, features, labels)
    assert torch.equal(loss, F.cross_entropy(logits, labels))
    assert torch.equal(parts["ce"], loss.detach()) and parts["girl"].item() == 0.0
    assert not parts["ce"].requires_grad


def test_girl_on_loss_is_ce_plus_weighted_girl():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 4, generator=generator)
    features = torch.randn(8, 16, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # explicit groups: deterministic GIRL
    with backends.use_backend("reference"):
        loss, parts = PIUmrLoss(lambda_girl=0.5, tau=0.1)(logits, features, labels, groups)
        girl = piumr_kernels.girl_loss(features, labels, tau=0.1, groups=groups)
    assert girl > 0
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels) + 0.5 * girl, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts["girl"], girl.detach(), rtol=0, atol=0)
    loss.backward()
    assert features.grad.abs().sum() > 0


@pytest.mark.skipif(bool(backends._availability("cpp", torch.device("cpu"))), reason="C++ extension not built")
def test_reference_and_cpp_backends_agree():
    torch.manual_seed(0)
    model = build_piumr("XS", 10).eval()
    x = clip("XS", seed=4)
    with torch.no_grad():
        with backends.use_backend("reference"):
            expected = model(x)
        with backends.use_backend("cpp"):
            got = model(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "compiler",
    # aot_eager traces the whole model in one graph through every op's fake implementation
    # and autograd registration; inductor also generates code (minutes of C++ compiling on CPU).
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_torch_compile_fullgraph_matches_eager(compiler):
    torch.manual_seed(0)
    model = build_piumr("XS", 10).eval()
    x = clip("XS", batch=2, seed=5)
    torch._dynamo.reset()
    # Inductor's vectorized C++ code for this model corrupts the heap on AVX-512/AMX hosts with
    # torch 2.13 (the process aborts; reproduced on the commit before this one too, with the
    # reference backend); scalar codegen still checks the whole graph end to end.
    with torch.no_grad(), torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=compiler)(x)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_pretrained_backbone_through_build_piumr(tmp_path):
    donor = build_x3d("XS", 400)
    with torch.no_grad():
        for parameter in donor.parameters():
            parameter.normal_()
    path = tmp_path / "X3D_XS.pyth"
    torch.save({"model_state": donor.state_dict()}, path)
    model = build_piumr("XS", 52, pretrained=path)
    assert torch.equal(
        model.backbone.blocks[3].res_blocks[4].branch2.conv_b.weight,
        donor.blocks[3].res_blocks[4].branch2.conv_b.weight,
    )
    assert model.backbone.head.proj.weight.shape == (52, 2048)


def test_num_frames_override_and_mismatch_error():
    model = build_piumr("XS", 10, num_frames=8)
    assert model.tfam["res2"].num_frames == 8
    with pytest.raises(ValueError, match="num_frames = 8"):
        model(torch.randn(1, 3, 4, 32, 32))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tfam_stages": ("res1",)}, "tfam_stages"),
        ({"tfam_stages": ("res2", "res2")}, "tfam_stages"),
        ({"temporal": False, "frequency": False}, "identity"),
        ({"fusion": "max"}, "fusion"),
        ({"num_frames": 0}, "num_frames"),
    ],
)
def test_bad_model_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        build_piumr("XS", 10, **kwargs)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="lambda_girl"):
        PIUmrLoss(lambda_girl=-1.0)
    with pytest.raises(ValueError, match="girl=False"):
        PIUmrLoss(girl=False, tau=0.1)


def test_bad_clip_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        build_piumr("XS", 10)(torch.randn(2, 4, 32, 32))
