"""X3D backbone (Feichtenhofer, CVPR 2020) in PyTorchVideo's `create_x3d` layout (SPEC §7).

Module and parameter names follow `pytorchvideo.models.modelling.x3d.create_x3d` exactly, so the
official PyTorchVideo checkpoints `X3D_{XS,S,M,L}.pyth` load without renaming (SlowFast's
`x3d_*.pyth` go through `models.modelling.x3d_weights`). The layout, as in PyTorchVideo:

- `blocks.0` stem: `conv.conv_t` is the *spatial* 1x3x3 conv (stride 1x2x2) and
  `conv.conv_xy` the depthwise temporal 5x1x1 conv (PyTorchVideo swaps the two names),
  then `norm` (BN) and ReLU.
- `blocks.1`..`blocks.4` = res2..res5: `res_blocks.{b}` bottlenecks 1x1x1 -> depthwise
  3x3x3 -> 1x1x1 (`branch2.conv_a/norm_a`, `conv_b`, `norm_b.0` BN and `norm_b.1` the
  squeeze-excitation `block.0`/`block.2` 1x1x1 convs, `conv_c/norm_c`), ReLU after
  conv_a, Swish after the SE, ReLU after the sum. SE (ratio 0.0625) on blocks 0, 2, 4...
  of every stage. The first block of each stage has a 1x1x1 strided shortcut
  `branch1_conv`; it has a BN (`branch1_norm`) only where the width changes (res3..res5),
  not in res2 (SlowFast has one there; the converter folds it).
- `blocks.5` head: `pool.pre_conv` 1x1x1 + BN + ReLU, average pooling, `pool.post_conv`
  1x1x1 to 2048 + ReLU, dropout, `proj` linear classifier.

Widths: stem 12 x width factor 2.0 = 24; stages 24/48/96/192 with bottleneck width
2.25x (54/108/216/432); head 432 -> 2048. Depths 1/2/5/3 x depth factor, rounded up:
2.2 (XS, S, M) gives 3/5/11/7 blocks, 5.0 (L) gives 5/10/25/15. X3D never strides in
time, so `T` is kept through every stage.

Two deliberate differences from the pip release's defaults, neither of which changes a
parameter: the head pools adaptively (global average over T, H, W) instead of a fixed
kernel computed from the preset's clip size, so any clip size works and the result is
identical at the preset's size; and the head has no softmax (the pip release applies one
by default), so the model returns logits for `nn.CrossEntropyLoss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

STAGE_NAMES = ("res2", "res3", "res4", "res5")

# SPEC §7 architecture facts (the values of create_x3d's defaults).
WIDTH_FACTOR = 2.0
BOTTLENECK_FACTOR = 2.25
STEM_WIDTH = 12
HEAD_WIDTH = 2048
SE_RATIO = 0.0625
BASE_STAGE_DEPTHS = (1, 2, 5, 3)


@dataclass(frozen=True)
class X3DPreset:
    """A published X3D size: its depth factor and the clip it was trained on."""

    name: str
    depth_factor: float
    num_frames: int
    crop_size: int

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """`(C, T, H, W)` of one input clip at the published size."""
        return (3, self.num_frames, self.crop_size, self.crop_size)


PRESETS = {
    "XS": X3DPreset("XS", 2.2, 4, 160),
    "S": X3DPreset("S", 2.2, 13, 160),
    "M": X3DPreset("M", 2.2, 16, 224),
    "L": X3DPreset("L", 5.0, 16, 312),
}


def get_preset(preset: str | X3DPreset) -> X3DPreset:
    """The preset named `preset` (case-insensitive: XS, S, M, L), or `preset` itself."""
    if isinstance(preset, X3DPreset):
        return preset
    if not isinstance(preset, str):
        raise TypeError(f"preset must be one of {sorted(PRESETS)} (a str), got {type(preset).__name__}")
    key = preset.upper().removeprefix("X3D_").removeprefix("X3D-")
    if key not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[key]


def round_width(width: float, multiplier: float, min_width: int = 8, divisor: int = 8) -> int:
    """Scale a channel count and round it to a multiple of `divisor` (X3D's rule)."""
    width *= multiplier
    rounded = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * width:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, multiplier: float) -> int:
    return int(math.ceil(multiplier * repeats))


def stage_widths() -> tuple[int, ...]:
    """Output channels of res2..res5 (24, 48, 96, 192): where TFAM plugs in."""
    dims = [STEM_WIDTH]
    for _ in range(len(BASE_STAGE_DEPTHS) - 1):
        dims.append(round_width(dims[-1], 2.0))
    return tuple(round_width(dim, WIDTH_FACTOR) for dim in dims)


def stage_depths(depth_factor: float) -> tuple[int, ...]:
    return tuple(round_repeats(depth, depth_factor) for depth in BASE_STAGE_DEPTHS)


def _bn(channels: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(channels, eps=1e-5, momentum=0.1)


class Conv2plus1d(nn.Module):
    """Stem convs. Names as in PyTorchVideo: `conv_t` is the spatial 1x3x3 conv and runs
    first, `conv_xy` is the depthwise temporal 5x1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_t = nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
        self.conv_xy = nn.Conv3d(
            out_channels, out_channels, (5, 1, 1), padding=(2, 0, 0), groups=out_channels, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_xy(self.conv_t(x))


class Stem(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = Conv2plus1d(in_channels, out_channels)
        self.norm = _bn(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))


class SqueezeExcitation(nn.Module):
    """fvcore's 3-D squeeze-excitation: global mean, 1x1x1 conv, ReLU, 1x1x1 conv, sigmoid."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv3d(channels, reduced, 1, bias=True),
            nn.ReLU(),
            nn.Conv3d(reduced, channels, 1, bias=True),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.block(x.mean(dim=(2, 3, 4), keepdim=True))


class Bottleneck(nn.Module):
    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, stride: int, use_se: bool) -> None:
        super().__init__()
        self.conv_a = nn.Conv3d(dim_in, dim_inner, 1, bias=False)
        self.norm_a = _bn(dim_inner)
        self.act_a = nn.ReLU(inplace=True)
        self.conv_b = nn.Conv3d(
            dim_inner, dim_inner, 3, stride=(1, stride, stride), padding=1, groups=dim_inner, bias=False
        )
        # PyTorchVideo keeps the SE inside norm_b (as its second element), hence `norm_b.1.block`.
        se = SqueezeExcitation(dim_inner, round_width(dim_inner, SE_RATIO)) if use_se else nn.Identity()
        self.norm_b = nn.Sequential(_bn(dim_inner), se)
        self.act_b = nn.SiLU(inplace=True)  # Swish
        self.conv_c = nn.Conv3d(dim_inner, dim_out, 1, bias=False)
        self.norm_c = _bn(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_a(self.norm_a(self.conv_a(x)))
        x = self.act_b(self.norm_b(self.conv_b(x)))
        return self.norm_c(self.conv_c(x))


class ResBlock(nn.Module):
    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, stride: int, use_se: bool) -> None:
        super().__init__()
        needs_projection = dim_in != dim_out or stride > 1
        self.branch1_conv = (
            nn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False) if needs_projection else None
        )
        self.branch1_norm = _bn(dim_out) if dim_in != dim_out else None
        self.branch2 = Bottleneck(dim_in, dim_inner, dim_out, stride, use_se)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.branch1_conv is not None:
            shortcut = self.branch1_conv(shortcut)
        if self.branch1_norm is not None:
            shortcut = self.branch1_norm(shortcut)
        return self.activation(shortcut + self.branch2(x))


class ResStage(nn.Module):
    def __init__(self, depth: int, dim_in: int, dim_inner: int, dim_out: int, stride: int = 2) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(
                dim_in if index == 0 else dim_out,
                dim_inner,
                dim_out,
                stride if index == 0 else 1,
                use_se=index % 2 == 0,
            )
            for index in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x


class ProjectedPool(nn.Module):
    """Head trunk: 1x1x1 conv + BN + ReLU, global average pool, 1x1x1 conv + ReLU."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int) -> None:
        super().__init__()
        self.pre_conv = nn.Conv3d(dim_in, dim_inner, 1, bias=False)
        self.pre_norm = _bn(dim_inner)
        self.pre_act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.post_conv = nn.Conv3d(dim_inner, dim_out, 1, bias=False)
        self.post_act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.pre_act(self.pre_norm(self.pre_conv(x))))
        return self.post_act(self.post_conv(x))


class Head(nn.Module):
    def __init__(self, dim_in: int, dim_inner: int, num_classes: int, dropout_rate: float) -> None:
        super().__init__()
        self.pool = ProjectedPool(dim_in, dim_inner, HEAD_WIDTH)
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.proj = nn.Linear(HEAD_WIDTH, num_classes, bias=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 2048-d clip embedding the classifier reads, `(B, 2048)`."""
        return self.pool(x).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class X3D(nn.Module):
    """X3D network: `blocks` = [stem, res2, res3, res4, res5, head], PyTorchVideo names.

    `forward(x)` takes `(B, 3, T, H, W)` clips and returns logits `(B, num_classes)` (no
    softmax). Any `T, H, W` works (adaptive pooling); the presets' published clip sizes are
    in `PRESETS`. Kinetics-pretrained weights expect RGB / 255 normalized with mean 0.45,
    std 0.225. Use `build_x3d(preset, num_classes)` for a published size.
    """

    def __init__(self, num_classes: int = 400, *, depth_factor: float = 2.2, dropout_rate: float = 0.5) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
        self.num_classes = num_classes
        self.depth_factor = depth_factor
        widths = stage_widths()
        blocks: list[nn.Module] = [Stem(3, round_width(STEM_WIDTH, WIDTH_FACTOR))]
        dim_in = blocks[0].norm.num_features
        for depth, dim_out in zip(stage_depths(depth_factor), widths):
            dim_inner = int(BOTTLENECK_FACTOR * dim_out)
            blocks.append(ResStage(depth, dim_in, dim_inner, dim_out))
            dim_in = dim_out
        blocks.append(Head(dim_in, dim_inner, num_classes, dropout_rate))
        self.blocks = nn.ModuleList(blocks)
        init_weights(self)

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return stage_widths()

    @property
    def head(self) -> Head:
        return self.blocks[-1]

    def stages(self) -> dict[str, nn.Module]:
        """res2..res5 by name, in order."""
        return dict(zip(STAGE_NAMES, self.blocks[1:5]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-classifier features `(B, 2048)`."""
        check_clip(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.head.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classify(self.forward_features(x))


def check_stage_model(backbone: object, num_frames: object, stages, argument: str) -> tuple[str, ...]:
    """`stages` as a tuple, for a model that runs a module after those stages of `backbone`
    on clips of `num_frames` frames (PIUmr's TFAMs, HDF's DAMs); a clear error for a
    `backbone` that is not an X3D, a `num_frames` that is not an int >= 1, or `stages` (the
    parameter `argument`) that are not distinct stage names."""
    if not isinstance(backbone, X3D):
        raise TypeError(f"backbone must be a models.modelling.x3d.X3D, got {type(backbone).__name__}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    stages = tuple(stages)
    if any(stage not in STAGE_NAMES for stage in stages) or len(set(stages)) != len(stages):
        raise ValueError(f"{argument} must be distinct names from {STAGE_NAMES}, got {stages}")
    return stages


def forward_with_stage_modules(
    backbone: X3D, modules: nn.ModuleDict, num_frames: int, x: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits, features)` of `backbone` on clips `x` with `modules[stage]` applied after each
    stage it names (PIUmr's TFAMs, HDF's DAMs, whose T x T parameters need `T == num_frames`)."""
    check_clip(x)
    if len(modules) and x.shape[2] != num_frames:
        raise ValueError(
            f"x must have T = num_frames = {num_frames} frames ({kind}'s T x T parameters are "
            f"sized by it), got shape {tuple(x.shape)}"
        )
    x = backbone.blocks[0](x)  # stem
    for name, stage in backbone.stages().items():
        x = stage(x)
        if name in modules:
            x = modules[name](x)
    features = backbone.head.features(x)
    return backbone.head.classify(features), features


def check_clip(x: object, name: str = "x") -> None:
    """A video batch `(B, 3, T, H, W)` in a floating dtype, else a clear error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, 3, T, H, W), got {type(x).__name__}")
    if x.dim() != 5 or x.shape[1] != 3:
        raise ValueError(f"{name} must be a clip batch of shape (B, 3, T, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def init_weights(model: nn.Module) -> None:
    """PyTorchVideo's initialisation (`init_net_weights`): He-normal (fan-out) convs, BN
    at identity, classifier N(0, 0.01)."""
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)


def build_x3d(preset: str | X3DPreset = "M", num_classes: int = 400, *, dropout_rate: float = 0.5) -> X3D:
    """X3D-XS/S/M/L with `num_classes` outputs (randomly initialised; see
    `models.modelling.x3d_weights.load_x3d_checkpoint` for Kinetics weights)."""
    return X3D(num_classes, depth_factor=get_preset(preset).depth_factor, dropout_rate=dropout_rate)
