"""Kinetics-pretrained X3D weights from the official checkpoint files (SPEC §7).

`load_x3d_checkpoint(model, path)` reads a file the user downloaded and detects its format:

- PyTorchVideo `X3D_{XS,S,M,L}.pyth`: weights under `"model_state"`, already in the
  `create_x3d` names this package's `X3D` uses (`blocks.0.conv.conv_t.weight`, ...).
- SlowFast `x3d_{xs,s,m,l}.pyth`: weights under `"model_state"` with SlowFast names
  (`s1.pathway0_stem.conv_xy`, `s{2-5}.pathway0_res{b}.branch2.a/a_bn/b/b_bn/se.fc1/
  se.fc2/c/c_bn`, `branch1/branch1_bn`, `head.conv_5/conv_5_bn/lin_5/projection`),
  renamed here. SlowFast's stem `conv_xy` (spatial) becomes PyTorchVideo's `conv_t` and
  its `conv` (temporal) becomes `conv_xy`.
  SlowFast puts a BN after *every* projection shortcut; PyTorchVideo only where the width
  changes, so res2's first shortcut (24 -> 24 channels, spatial stride 2) has a BN in
  SlowFast and none here. That BN is folded: its scale `gamma / sqrt(var + eps)` into the
  shortcut conv's weights and its shift into the block's `norm_c` bias (the two branches
  are summed, so a constant added to either is the same). In eval mode the result is
  exactly SlowFast's computation; in training mode SlowFast would normalize that shortcut
  with batch statistics, which this layout cannot.

Files are read with `torch.load(..., weights_only=True)` (no arbitrary code runs); the
Caffe2 `.pkl` files of the original X3D release are not supported. A
`module.` prefix (DistributedDataParallel) is stripped. A classifier (`blocks.5.proj`)
whose shape differs from the model's is not loaded: the model keeps its freshly
initialised classifier for its own class count. BN `num_batches_tracked` counters may be
absent. Every other missing, unexpected or wrongly shaped tensor is reported by name;
with `strict=True` (default) that is an error and nothing is loaded.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field

import torch

from models.errors import CheckpointError
from models.modelling.x3d import PRESETS, X3D, X3DPreset, build_x3d, stage_depths

PYTORCHVIDEO = "pytorchvideo"
SLOWFAST = "slowfast"
CLASSIFIER_KEYS = ("blocks.5.proj.weight", "blocks.5.proj.bias")
BN_EPS = 1e-5  # SlowFast's BN eps for X3D

# SlowFast name pattern -> PyTorchVideo name template, applied to the part after the prefix.
_SLOWFAST_STEM = {"conv_xy": "conv.conv_t", "conv": "conv.conv_xy", "bn": "norm"}
_SLOWFAST_BRANCH2 = {
    "a": "conv_a",
    "a_bn": "norm_a",
    "b": "conv_b",
    "b_bn": "norm_b.0",
    "se.fc1": "norm_b.1.block.0",
    "se.fc2": "norm_b.1.block.2",
    "c": "conv_c",
    "c_bn": "norm_c",
}
_SLOWFAST_HEAD = {
    "conv_5": "pool.pre_conv",
    "conv_5_bn": "pool.pre_norm",
    "lin_5": "pool.post_conv",
    "projection": "proj",
}
_STEM_RE = re.compile(r"s1\.pathway0_stem\.(\w+)\.(\w+)$")
_RES_RE = re.compile(r"s([2-5])\.pathway0_res(\d+)\.(branch1|branch1_bn|branch2\.(?:se\.)?\w+)\.(\w+)$")
_HEAD_RE = re.compile(r"head\.(\w+)\.(\w+)$")
_PTV_BLOCK_RE = re.compile(r"blocks\.([1-4])\.res_blocks\.(\d+)\.")


@dataclass
class LoadReport:
    """What `load_x3d_checkpoint` did. Key names are in the model's (PyTorchVideo) naming."""

    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: checkpoint shape vs model shape"
    replaced_classifier: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)  # SlowFast BNs folded into a conv

    @property
    def problems(self) -> list[str]:
        return (
            [f"missing: {name}" for name in self.missing]
            + [f"unexpected: {name}" for name in self.unexpected]
            + [f"shape mismatch: {entry}" for entry in self.mismatched]
        )


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor state dict inside `path` (under `model_state`/`state_dict`, or the file
    itself), `module.` prefixes stripped. Clear errors for anything else."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(path)!r}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file fails in many ways (IndexError, UnpicklingError, ...)
        raise CheckpointError(
            f"{os.fspath(path)!r} is not a PyTorch checkpoint that torch.load(weights_only=True) "
            f"can read: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    state = content
    if isinstance(content, dict):
        for container in ("model_state", "state_dict", "model"):
            if isinstance(content.get(container), dict):
                state = content[container]
                break
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items())
    ):
        summary = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{os.fspath(path)!r} holds no model weights: expected a dict of tensors, or one under "
            f"'model_state' or 'state_dict'; found {summary}"
        )
    return {key.removeprefix("module."): value for key, value in state.items()}


def detect_format(state: dict[str, torch.Tensor], source: str | os.PathLike = "the checkpoint") -> str:
    """`"pytorchvideo"` or `"slowfast"` for an X3D state dict; CheckpointError naming
    `source` (the file it came from) otherwise."""
    if "blocks.0.conv.conv_t.weight" in state:
        return PYTORCHVIDEO
    if "s1.pathway0_stem.conv_xy.weight" in state:
        return SLOWFAST
    if any(key.startswith(("blocks.", "s1.pathway0_stem.", "s2.pathway0_res")) for key in state):
        architecture = "PyTorchVideo" if any(key.startswith("blocks.") for key in state) else "SlowFast"
        raise CheckpointError(
            f"{os.fspath(source)!r} is a {architecture} checkpoint of another architecture, not X3D: its stem has no "
            "separate spatial conv (X3D's 'blocks.0.conv.conv_t' / 's1.pathway0_stem.conv_xy'); "
            f"first keys: {sorted(state)[:6]}"
        )
    raise CheckpointError(
        f"{os.fspath(source)!r} is not an X3D checkpoint in the PyTorchVideo "
        "('blocks.0.conv.conv_t.weight', ...) or SlowFast "
        f"('s1.pathway0_stem.conv_xy.weight', ...) layout; first keys: {sorted(state)[:6]}"
    )


def convert_slowfast(state: dict[str, torch.Tensor], eps: float = BN_EPS) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SlowFast X3D names -> PyTorchVideo names, folding the shortcut BNs PyTorchVideo lacks.

    Returns the converted state dict and the SlowFast names of the folded BNs. Keys it does
    not recognise are kept unchanged (and so show up as unexpected when loading).
    """
    converted: dict[str, torch.Tensor] = {}
    shortcut_bns: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if match := _STEM_RE.match(key):
            layer, tensor = match.groups()
            if layer in _SLOWFAST_STEM:
                converted[f"blocks.0.{_SLOWFAST_STEM[layer]}.{tensor}"] = value
                continue
        elif match := _RES_RE.match(key):
            stage, block, layer, tensor = match.groups()
            prefix = f"blocks.{int(stage) - 1}.res_blocks.{block}"
            if layer == "branch1":
                converted[f"{prefix}.branch1_conv.{tensor}"] = value
                continue
            if layer == "branch1_bn":
                shortcut_bns.setdefault(prefix, {})[tensor] = value
                continue
            inner = layer.removeprefix("branch2.")
            if inner in _SLOWFAST_BRANCH2:
                converted[f"{prefix}.branch2.{_SLOWFAST_BRANCH2[inner]}.{tensor}"] = value
                continue
        elif match := _HEAD_RE.match(key):
            layer, tensor = match.groups()
            if layer in _SLOWFAST_HEAD:
                converted[f"blocks.5.{_SLOWFAST_HEAD[layer]}.{tensor}"] = value
                continue
        converted[key] = value

    folded = []
    for prefix, bn in shortcut_bns.items():
        conv_key = f"{prefix}.branch1_conv.weight"
        conv = converted.get(conv_key)
        if conv is not None and conv.shape[0] == conv.shape[1]:
            # Same width in and out: PyTorchVideo has no BN on this shortcut, fold it.
            bias_key = f"{prefix}.branch2.norm_c.bias"
            needed = ("weight", "bias", "running_mean", "running_var")
            if bias_key not in converted or any(name not in bn for name in needed):
                raise CheckpointError(
                    f"cannot fold the SlowFast shortcut BN of {prefix}: it needs {conv_key}, "
                    f"{bias_key} and branch1_bn.{{weight,bias,running_mean,running_var}}"
                )
            weight, bias, mean, var = (bn[name].double() for name in needed)
            scale = weight / torch.sqrt(var + eps)
            converted[conv_key] = (conv.double() * scale.view(-1, 1, 1, 1, 1)).to(conv.dtype)
            norm_c_bias = converted[bias_key]
            converted[bias_key] = (norm_c_bias.double() + bias - mean * scale).to(norm_c_bias.dtype)
            folded.append(f"{_slowfast_prefix(prefix)}.branch1_bn")
        else:
            for tensor, value in bn.items():
                converted[f"{prefix}.branch1_norm.{tensor}"] = value
    return converted, folded


def _slowfast_prefix(ptv_prefix: str) -> str:
    stage, block = _PTV_BLOCK_RE.match(ptv_prefix + ".").groups()
    return f"s{int(stage) + 1}.pathway0_res{block}"


def checkpoint_stage_depths(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Residual blocks per stage (res2..res5) in a PyTorchVideo-named state dict."""
    depths = [0, 0, 0, 0]
    for key in state:
        if match := _PTV_BLOCK_RE.match(key):
            stage, block = (int(group) for group in match.groups())
            depths[stage - 1] = max(depths[stage - 1], block + 1)
    return tuple(depths)


def _describe_depths(depths: tuple[int, ...]) -> str:
    names = [name for name, preset in PRESETS.items() if stage_depths(preset.depth_factor) == depths]
    return f"{depths} (X3D-{'/'.join(names)})" if names else str(depths)


def load_x3d_checkpoint(model: X3D, path: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Load an official PyTorchVideo or SlowFast X3D checkpoint into `model` (format detected).

    The classifier is replaced (left as initialised) when the checkpoint's class count
    differs from the model's. With `strict=True` any other missing, unexpected or
    mismatched tensor raises `CheckpointError` naming every one and nothing is loaded;
    with `strict=False` the matching tensors are loaded and the rest reported (warning).
    """
    if not isinstance(model, X3D):
        raise TypeError(
            f"model must be a models.modelling.x3d.X3D (for PIUmr pass model.backbone), got {type(model).__name__}"
        )
    state = read_checkpoint(path)
    report = LoadReport(detect_format(state, path))
    if report.source_format == SLOWFAST:
        state, report.folded = convert_slowfast(state)

    model_depths = stage_depths(model.depth_factor)
    found_depths = checkpoint_stage_depths(state)
    if found_depths != model_depths:
        raise CheckpointError(
            f"{os.fspath(path)!r} is an X3D with stage depths {_describe_depths(found_depths)}, "
            f"the model has {_describe_depths(model_depths)}: build the model with the matching preset"
        )

    expected = model.state_dict()
    to_load = {}
    for key, value in state.items():
        if key not in expected:
            report.unexpected.append(key)
        elif value.shape != expected[key].shape:
            if key in CLASSIFIER_KEYS:
                report.replaced_classifier.append(key)
            else:
                report.mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(expected[key].shape)}")
        else:
            to_load[key] = value
    report.missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    if report.problems:
        message = f"{os.fspath(path)!r} ({report.source_format} format) does not match the model:\n  " + "\n  ".join(
            report.problems
        )
        if strict:
            raise CheckpointError(message)
        warnings.warn(message + "\nloading the matching tensors only (strict=False)", stacklevel=2)
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    return report


def build_x3d_backbone(
    preset: str | X3DPreset, num_classes: int, pretrained: str | os.PathLike | None, dropout_rate: float
) -> X3D:
    """The backbone of `build_piumr` and `build_hdf`: `build_x3d(preset, num_classes)` with
    the checkpoint `pretrained`, when given, loaded strictly (`load_x3d_checkpoint`)."""
    backbone = build_x3d(preset, num_classes, dropout_rate=dropout_rate)
    if pretrained is not None:
        load_x3d_checkpoint(backbone, pretrained)
    return backbone
