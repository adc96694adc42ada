"""X3D backbone and official-checkpoint loading (SPEC §7).

The official key lists are written out here independently of models/ (PyTorchVideo's
`create_x3d` names and SlowFast's X3D names, with shapes), so a naming slip in the model or
the converter cannot hide. Synthetic checkpoints carry those names and shapes with random
values. Tolerances: the folded-BN check runs in float64 and must agree to 1e-10 (folding
is exact algebra, only rounding differs).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from models.modelling.x3d import PRESETS, X3D, build_x3d
from models.modelling.x3d_weights import CheckpointError, convert_slowfast, load_x3d_checkpoint

# (stage width, bottleneck width, SE width) for res2..res5, the same in every preset.
STAGES = ((24, 54, 8), (48, 108, 8), (96, 216, 16), (192, 432, 32))
DEPTHS = {"XS": (3, 5, 11, 7), "S": (3, 5, 11, 7), "M": (3, 5, 11, 7), "L": (5, 10, 25, 15)}
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn_entries(prefix: str, channels: int) -> dict[str, tuple]:
    return {f"{prefix}.{name}": (() if name == "num_batches_tracked" else (channels,)) for name in BN_TENSORS}


def ptv_layout(depths: tuple[int, ...], num_classes: int = 400) -> dict[str, tuple]:
    """PyTorchVideo create_x3d state-dict names and shapes."""
    layout = {"blocks.0.conv.conv_t.weight": (24, 3, 1, 3, 3), "blocks.0.conv.conv_xy.weight": (24, 1, 5, 1, 1)}
    layout |= bn_entries("blocks.0.norm", 24)
    dim_in = 24
    for stage, ((width, inner, se), depth) in enumerate(zip(STAGES, depths), start=1):
        for block in range(depth):
            p = f"blocks.{stage}.res_blocks.{block}"
            block_in = dim_in if block == 0 else width
            if block == 0:
                layout[f"{p}.branch1_conv.weight"] = (width, block_in, 1, 1, 1)
                if block_in != width:
                    layout |= bn_entries(f"{p}.branch1_norm", width)
            layout[f"{p}.branch2.conv_a.weight"] = (inner, block_in, 1, 1, 1)
            layout |= bn_entries(f"{p}.branch2.norm_a", inner)
            layout[f"{p}.branch2.conv_b.weight"] = (inner, 1, 3, 3, 3)
            layout |= bn_entries(f"{p}.branch2.norm_b.0", inner)
            if block % 2 == 0:
                layout[f"{p}.branch2.norm_b.1.block.0.weight"] = (se, inner, 1, 1, 1)
                layout[f"{p}.branch2.norm_b.1.block.0.bias"] = (se,)
                layout[f"{p}.branch2.norm_b.1.block.2.weight"] = (inner, se, 1, 1, 1)
                layout[f"{p}.branch2.norm_b.1.block.2.bias"] = (inner,)
            layout[f"{p}.branch2.conv_c.weight"] = (width, inner, 1, 1, 1)
            layout |= bn_entries(f"{p}.branch2.norm_c", width)
        dim_in = width
    layout["blocks.5.pool.pre_conv.weight"] = (432, 192, 1, 1, 1)
    layout |= bn_entries("blocks.5.pool.pre_norm", 432)
    layout["blocks.5.pool.post_conv.weight"] = (2048, 432, 1, 1, 1)
    layout["blocks.5.proj.weight"] = (num_classes, 2048)
    layout["blocks.5.proj.bias"] = (num_classes,)
    return layout


def slowfast_layout(depths: tuple[int, ...], num_classes: int = 400) -> dict[str, tuple]:
    """SlowFast X3D state-dict names and shapes (BN after every projection shortcut)."""
    layout = {"s1.pathway0_stem.conv_xy.weight": (24, 3, 1, 3, 3), "s1.pathway0_stem.conv.weight": (24, 1, 5, 1, 1)}
    layout |= bn_entries("s1.pathway0_stem.bn", 24)
    dim_in = 24
    for stage, ((width, inner, se), depth) in enumerate(zip(STAGES, depths), start=2):
        for block in range(depth):
            p = f"s{stage}.pathway0_res{block}"
            block_in = dim_in if block == 0 else width
            if block == 0:
                layout[f"{p}.branch1.weight"] = (width, block_in, 1, 1, 1)
                layout |= bn_entries(f"{p}.branch1_bn", width)
            layout[f"{p}.branch2.a.weight"] = (inner, block_in, 1, 1, 1)
            layout |= bn_entries(f"{p}.branch2.a_bn", inner)
            layout[f"{p}.branch2.b.weight"] = (inner, 1, 3, 3, 3)
            layout |= bn_entries(f"{p}.branch2.b_bn", inner)
            if block % 2 == 0:
                layout[f"{p}.branch2.se.fc1.weight"] = (se, inner, 1, 1, 1)
                layout[f"{p}.branch2.se.fc1.bias"] = (se,)
                layout[f"{p}.branch2.se.fc2.weight"] = (inner, se, 1, 1, 1)
                layout[f"{p}.branch2.se.fc2.bias"] = (inner,)
            layout[f"{p}.branch2.c.weight"] = (width, inner, 1, 1, 1)
            layout |= bn_entries(f"{p}.branch2.c_bn", width)
        dim_in = width
    layout["head.conv_5.weight"] = (432, 192, 1, 1, 1)
    layout |= bn_entries("head.conv_5_bn", 432)
    layout["head.lin_5.weight"] = (2048, 432, 1, 1, 1)
    layout["head.projection.weight"] = (num_classes, 2048)
    layout["head.projection.bias"] = (num_classes,)
    return layout


def random_state(layout: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values of a plausible scale: fan-in-scaled weights, BN stats away from identity."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        elif len(shape) > 1:
            fan_in = math.prod(shape[1:])
            state[name] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        elif name.endswith("weight"):  # BN scale
            state[name] = 1.0 + 0.3 * torch.randn(shape, generator=generator)
        else:
            state[name] = 0.2 * torch.randn(shape, generator=generator)
    return state


def save(tmp_path, content, name="ckpt.pyth"):
    path = tmp_path / name
    torch.save(content, path)
    return path


# ----------------------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "preset, published_millions, exact",
    [("XS", 3.79, 3_794_274), ("S", 3.79, 3_794_274), ("M", 3.79, 3_794_274), ("L", 6.15, 6_153_384)],
)
def test_parameter_count_matches_published(preset, published_millions, exact):
    count = sum(p.numel() for p in build_x3d(preset, 400).parameters())
    assert round(count / 1e6, 2) == published_millions  # PyTorchVideo model zoo table
    assert count == exact


def test_state_dict_names_explicit_for_x3d_m():
    state = build_x3d("M").state_dict()
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    stem = {
        "blocks.0.conv.conv_t.weight": (24, 3, 1, 3, 3),  # spatial conv, PyTorchVideo's name
        "blocks.0.conv.conv_xy.weight": (24, 1, 5, 1, 1),  # depthwise temporal conv
        "blocks.0.norm.weight": (24,),
        "blocks.0.norm.bias": (24,),
        "blocks.0.norm.running_mean": (24,),
        "blocks.0.norm.running_var": (24,),
        "blocks.0.norm.num_batches_tracked": (),
    }
    assert {k: v for k, v in shapes.items() if k.startswith("blocks.0.")} == stem

    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    se_block = (
        ["blocks.3.res_blocks.2.branch2.conv_a.weight"]
        + [f"blocks.3.res_blocks.2.branch2.norm_a.{t}" for t in bn]
        + ["blocks.3.res_blocks.2.branch2.conv_b.weight"]
        + [f"blocks.3.res_blocks.2.branch2.norm_b.0.{t}" for t in bn]
        + [
            "blocks.3.res_blocks.2.branch2.norm_b.1.block.0.weight",
            "blocks.3.res_blocks.2.branch2.norm_b.1.block.0.bias",
            "blocks.3.res_blocks.2.branch2.norm_b.1.block.2.weight",
            "blocks.3.res_blocks.2.branch2.norm_b.1.block.2.bias",
            "blocks.3.res_blocks.2.branch2.conv_c.weight",
        ]
        + [f"blocks.3.res_blocks.2.branch2.norm_c.{t}" for t in bn]
    )
    assert [k for k in shapes if k.startswith("blocks.3.res_blocks.2.")] == se_block
    assert shapes["blocks.3.res_blocks.2.branch2.norm_b.1.block.0.weight"] == (16, 216, 1, 1, 1)
    assert shapes["blocks.3.res_blocks.2.branch2.conv_b.weight"] == (216, 1, 3, 3, 3)

    plain_block = (
        ["blocks.3.res_blocks.3.branch2.conv_a.weight"]
        + [f"blocks.3.res_blocks.3.branch2.norm_a.{t}" for t in bn]
        + ["blocks.3.res_blocks.3.branch2.conv_b.weight"]
        + [f"blocks.3.res_blocks.3.branch2.norm_b.0.{t}" for t in bn]
        + ["blocks.3.res_blocks.3.branch2.conv_c.weight"]
        + [f"blocks.3.res_blocks.3.branch2.norm_c.{t}" for t in bn]
    )
    assert [k for k in shapes if k.startswith("blocks.3.res_blocks.3.")] == plain_block

    # First blocks: res2's shortcut has no BN (same width), res3's has one.
    assert [k for k in shapes if k.startswith("blocks.1.res_blocks.0.branch1")] == [
        "blocks.1.res_blocks.0.branch1_conv.weight"
    ]
    assert [k for k in shapes if k.startswith("blocks.2.res_blocks.0.branch1")] == [
        "blocks.2.res_blocks.0.branch1_conv.weight"
    ] + [f"blocks.2.res_blocks.0.branch1_norm.{t}" for t in bn]

    head = {
        "blocks.5.pool.pre_conv.weight": (432, 192, 1, 1, 1),
        "blocks.5.pool.pre_norm.weight": (432,),
        "blocks.5.pool.pre_norm.bias": (432,),
        "blocks.5.pool.pre_norm.running_mean": (432,),
        "blocks.5.pool.pre_norm.running_var": (432,),
        "blocks.5.pool.pre_norm.num_batches_tracked": (),
        "blocks.5.pool.post_conv.weight": (2048, 432, 1, 1, 1),
        "blocks.5.proj.weight": (400, 2048),
        "blocks.5.proj.bias": (400,),
    }
    assert {k: v for k, v in shapes.items() if k.startswith("blocks.5.")} == head


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_state_dict_matches_official_layout(preset):
    state = build_x3d(preset, 52).state_dict()
    assert {name: tuple(t.shape) for name, t in state.items()} == ptv_layout(DEPTHS[preset], 52)


def test_blocks_and_activations():
    model = build_x3d("XS")
    first = model.blocks[1].res_blocks[0].branch2
    assert isinstance(first.act_b, nn.SiLU) and isinstance(first.act_a, nn.ReLU)
    assert isinstance(model.blocks[1].res_blocks[1].branch2.norm_b[1], nn.Identity)
    assert isinstance(model.head.pool.pool, nn.AdaptiveAvgPool3d)
    assert not any(isinstance(m, nn.Softmax) for m in model.modules())
    stem = model.blocks[0].conv
    assert stem.conv_t.stride == (1, 2, 2) and stem.conv_xy.groups == 24


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_output_shapes_small_clips(preset):
    model = build_x3d(preset, 52).eval()
    x = torch.randn(2, 3, 4, 48, 40)
    with torch.no_grad():
        assert model(x).shape == (2, 52)
        assert model.forward_features(x).shape == (2, 2048)


def test_output_shape_at_published_size_xs():
    preset = PRESETS["XS"]
    model = build_x3d("XS", 7).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, *preset.clip_shape))
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()


def test_presets_clip_sizes():
    assert {name: p.clip_shape for name, p in PRESETS.items()} == {
        "XS": (3, 4, 160, 160),
        "S": (3, 13, 160, 160),
        "M": (3, 16, 224, 224),
        "L": (3, 16, 312, 312),
    }


def test_keeps_time_and_strides_space():
    model = build_x3d("XS").eval()
    x = torch.randn(1, 3, 5, 64, 64)
    shapes = []
    with torch.no_grad():
        for block in model.blocks[:-1]:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(24, 5, 32, 32), (24, 5, 16, 16), (48, 5, 8, 8), (96, 5, 4, 4), (192, 5, 2, 2)]


def test_forward_backward_every_parameter():
    model = build_x3d("XS", 5)
    logits = model(torch.randn(2, 3, 4, 32, 32))
    logits.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (torch.randn(2, 3, 32, 32), ValueError, "(B, 3, T, H, W)"),
        (torch.randn(2, 1, 4, 32, 32), ValueError, "(B, 3, T, H, W)"),
        (torch.zeros(2, 3, 4, 32, 32, dtype=torch.long), TypeError, "floating"),
        ([1, 2], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(bad, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        build_x3d("XS")(bad)


@pytest.mark.parametrize("kwargs, words", [({"num_classes": 0}, "num_classes"), ({"dropout_rate": 1.0}, "dropout")])
def test_bad_constructor_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        X3D(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        build_x3d("XL")


# ----------------------------------------------------------------------------- checkpoints


def test_pytorchvideo_checkpoint_loads_and_replaces_head(tmp_path):
    state = random_state(ptv_layout(DEPTHS["M"], 400))
    path = save(tmp_path, {"model_state": state, "epoch": 200}, "X3D_M.pyth")
    model = build_x3d("M", 52)
    fresh_head = model.head.proj.weight.clone()
    report = load_x3d_checkpoint(model, path)
    assert report.source_format == "pytorchvideo"
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert sorted(report.replaced_classifier) == ["blocks.5.proj.bias", "blocks.5.proj.weight"]
    loaded = model.state_dict()
    for name, value in state.items():
        if not name.startswith("blocks.5.proj"):
            assert torch.equal(loaded[name], value), name
    assert torch.equal(model.head.proj.weight, fresh_head)


def test_pytorchvideo_checkpoint_same_class_count_keeps_head(tmp_path):
    state = random_state(ptv_layout(DEPTHS["XS"], 400))
    # DistributedDataParallel prefixes, and no BN counters: both accepted.
    state = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = build_x3d("XS", 400)
    report = load_x3d_checkpoint(model, save(tmp_path, state))
    assert report.replaced_classifier == [] and report.missing == []
    assert torch.equal(model.head.proj.weight, state["module.blocks.5.proj.weight"])


def test_slowfast_checkpoint_loads_with_renamed_keys(tmp_path):
    sf = random_state(slowfast_layout(DEPTHS["L"], 400), seed=1)
    path = save(tmp_path, {"model_state": sf, "epoch": 300, "cfg": "X3D:\n  DEPTH_FACTOR: 5.0\n"}, "x3d_l.pyth")
    model = build_x3d("L", 52)
    report = load_x3d_checkpoint(model, path)
    assert report.source_format == "slowfast"
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert sorted(report.replaced_classifier) == ["blocks.5.proj.bias", "blocks.5.proj.weight"]
    assert report.folded == ["s2.pathway0_res0.branch1_bn"]
    got = model.state_dict()
    pairs = {
        "blocks.0.conv.conv_t.weight": "s1.pathway0_stem.conv_xy.weight",
        "blocks.0.conv.conv_xy.weight": "s1.pathway0_stem.conv.weight",
        "blocks.0.norm.running_var": "s1.pathway0_stem.bn.running_var",
        "blocks.3.res_blocks.24.branch2.norm_b.1.block.2.bias": "s4.pathway0_res24.branch2.se.fc2.bias",
        "blocks.4.res_blocks.0.branch1_norm.running_mean": "s5.pathway0_res0.branch1_bn.running_mean",
        "blocks.4.res_blocks.0.branch1_conv.weight": "s5.pathway0_res0.branch1.weight",
        "blocks.2.res_blocks.9.branch2.norm_b.0.weight": "s3.pathway0_res9.branch2.b_bn.weight",
        "blocks.2.res_blocks.9.branch2.conv_c.weight": "s3.pathway0_res9.branch2.c.weight",
        "blocks.5.pool.pre_conv.weight": "head.conv_5.weight",
        "blocks.5.pool.pre_norm.bias": "head.conv_5_bn.bias",
        "blocks.5.pool.post_conv.weight": "head.lin_5.weight",
    }
    for ptv_name, sf_name in pairs.items():
        assert torch.equal(got[ptv_name], sf[sf_name]), ptv_name
    # The folded shortcut differs from the raw SlowFast tensors.
    assert not torch.equal(got["blocks.1.res_blocks.0.branch1_conv.weight"], sf["s2.pathway0_res0.branch1.weight"])
    # Everything but the head and the folded pair was copied: count the loaded tensors.
    assert len(report.loaded) == len(sf) - 5 - 2  # 5 BN tensors folded away, 2 head tensors replaced


def test_folded_slowfast_bn_equals_unfolded_computation(tmp_path):
    # float64 checkpoint and model: the fold is exact algebra, so only fp64 rounding remains.
    sf = {
        k: v.double() if v.is_floating_point() else v for k, v in random_state(slowfast_layout(DEPTHS["M"]), 2).items()
    }
    folded = build_x3d("M", 400).double()
    load_x3d_checkpoint(folded, save(tmp_path, {"model_state": sf}))

    # The unfolded SlowFast computation: the raw shortcut conv, its BN, the raw norm_c bias.
    unfolded = copy.deepcopy(folded)
    block = unfolded.blocks[1].res_blocks[0]
    block.branch1_conv.weight.data.copy_(sf["s2.pathway0_res0.branch1.weight"])
    block.branch2.norm_c.bias.data.copy_(sf["s2.pathway0_res0.branch2.c_bn.bias"])
    block.branch1_norm = nn.BatchNorm3d(24).double()
    block.branch1_norm.load_state_dict(
        {name: sf[f"s2.pathway0_res0.branch1_bn.{name}"] for name in block.branch1_norm.state_dict()}
    )
    folded, unfolded = folded.eval(), unfolded.eval()
    x = torch.randn(2, 3, 4, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        res2_folded = folded.blocks[1](folded.blocks[0](x))
        res2_unfolded = unfolded.blocks[1](unfolded.blocks[0](x))
        assert res2_folded.abs().max() > 0.1  # a real signal, not a collapsed one
        torch.testing.assert_close(res2_folded, res2_unfolded, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(folded(x), unfolded(x), rtol=1e-10, atol=1e-10)
        # Without the fold (plain renaming, BN dropped) the outputs would differ.
        block.branch1_norm = None
        assert not torch.allclose(unfolded.blocks[1](unfolded.blocks[0](x)), res2_folded, atol=1e-3)


def test_convert_slowfast_keeps_shortcut_bn_where_width_changes():
    sf = random_state(slowfast_layout(DEPTHS["M"]))
    converted, folded = convert_slowfast(sf)
    assert folded == ["s2.pathway0_res0.branch1_bn"]
    assert "blocks.1.res_blocks.0.branch1_norm.weight" not in converted
    for stage in (2, 3, 4):
        assert torch.equal(
            converted[f"blocks.{stage}.res_blocks.0.branch1_norm.weight"],
            sf[f"s{stage + 1}.pathway0_res0.branch1_bn.weight"],
        )


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "notes.pyth"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_x3d_checkpoint(build_x3d("XS"), path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_x3d_checkpoint(build_x3d("XS"), tmp_path / "absent.pyth")


class _Arbitrary:
    pass


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pyth"
    with open(path, "wb") as handle:
        pickle.dump({"model_state": _Arbitrary()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_x3d_checkpoint(build_x3d("XS"), path)


def test_checkpoint_without_tensors(tmp_path):
    path = save(tmp_path, {"epoch": 3, "note": "no weights"})
    with pytest.raises(CheckpointError, match="holds no model weights"):
        load_x3d_checkpoint(build_x3d("XS"), path)


@pytest.mark.parametrize(
    "state",
    [
        # PyTorchVideo slow_r50: a single 3-D stem conv.
        {
            "blocks.0.conv.weight": torch.randn(64, 3, 1, 7, 7),
            "blocks.1.res_blocks.0.branch2.conv_a.weight": torch.randn(64, 64, 1, 1, 1),
        },
        # SlowFast SLOW_8x8_R50: stem conv without X3D's conv_xy.
        {
            "s1.pathway0_stem.conv.weight": torch.randn(64, 3, 1, 7, 7),
            "s2.pathway0_res0.branch2.a.weight": torch.randn(64, 64, 1, 1, 1),
        },
    ],
    ids=["pytorchvideo-slow_r50", "slowfast-slow_r50"],
)
def test_other_architecture_is_a_clear_error_naming_the_file(tmp_path, state):
    path = save(tmp_path, {"model_state": state})
    with pytest.raises(CheckpointError, match="another architecture, not X3D") as raised:
        load_x3d_checkpoint(build_x3d("M"), path)
    assert repr(str(path)) in str(raised.value)


def test_unrelated_state_dict_is_a_clear_error_naming_the_file(tmp_path):
    path = save(tmp_path, nn.Linear(3, 4).state_dict())
    with pytest.raises(CheckpointError, match="not an X3D checkpoint") as raised:
        load_x3d_checkpoint(build_x3d("M"), path)
    assert repr(str(path)) in str(raised.value)


def test_wrong_preset_is_a_clear_error(tmp_path):
    path = save(tmp_path, {"model_state": random_state(ptv_layout(DEPTHS["L"]))})
    with pytest.raises(CheckpointError, match=r"X3D-L.*X3D-XS/S/M"):
        load_x3d_checkpoint(build_x3d("M"), path)


def test_every_problem_is_named_and_strict_loads_nothing(tmp_path):
    state = random_state(ptv_layout(DEPTHS["M"]))
    del state["blocks.2.res_blocks.1.branch2.conv_a.weight"]
    state["blocks.3.res_blocks.0.branch2.conv_b.weight"] = torch.randn(216, 1, 1, 3, 3)
    state["blocks.5.pool.post_norm.weight"] = torch.randn(2048)
    path = save(tmp_path, {"model_state": state})
    model = build_x3d("M")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError) as raised:
        load_x3d_checkpoint(model, path)
    message = str(raised.value)
    assert "missing: blocks.2.res_blocks.1.branch2.conv_a.weight" in message
    assert "unexpected: blocks.5.pool.post_norm.weight" in message
    assert (
        "shape mismatch: blocks.3.res_blocks.0.branch2.conv_b.weight: (216, 1, 1, 3, 3) vs (216, 1, 3, 3, 3)" in message
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    with pytest.warns(UserWarning, match="strict=False"):
        report = load_x3d_checkpoint(model, path, strict=False)
    assert report.missing == ["blocks.2.res_blocks.1.branch2.conv_a.weight"]
    assert report.unexpected == ["blocks.5.pool.post_norm.weight"]
    assert torch.equal(model.blocks[0].conv.conv_t.weight, state["blocks.0.conv.conv_t.weight"])


def test_load_rejects_non_x3d_model(tmp_path):
    with pytest.raises(TypeError, match="models.modelling.x3d.X3D"):
        load_x3d_checkpoint(nn.Linear(2, 2), tmp_path / "x.pyth")
