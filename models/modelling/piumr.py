"""PIUmr: X3D with TFAM after selected stages, and its training objective CE + GIRL.

`build_piumr(preset, num_classes)` is the entry point:

    model = build_piumr("M", 52, pretrained="X3D_M.pyth")   # Kinetics backbone, new head
    criterion = PIUmrLoss(lambda_girl=1.0)
    logits, features = model(clips)                         # clips: (B, 3, T, H, W)
    loss, parts = criterion(logits, features, labels)        # parts: {"ce", "girl"}

- TFAM (SPEC §5, `models.modelling.tfam.TFAM`) runs on the output of each selected X3D stage
  (res2..res5, default all four; X3D keeps `T`, so every TFAM sees all `T` frames). Its
  `T x T` parameters are sized by the clip length: `num_frames` (default the preset's,
  see `PRESETS`), and the model then needs clips of exactly that length.
- `features` are the head's pooled 2048-d embedding before dropout and the classifier:
  what GIRL groups and contrasts (SPEC §3).
- The objective is `CE + lambda_girl * GIRL` (paper: loss = CE + GIRL, so 1.0).

Ablations (paper Tables 2 and 3) are named in `ABLATIONS`; `tfam=False` leaves the model
a plain X3D (no TFAM module at all) and `girl=False` makes the loss plain cross-entropy.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.modelling.girl_diagnostics import girl_group_diagnostics
from models.modelling.objective import Objective
from models.modelling.tfam import FUSIONS, TFAM
from models.modelling.x3d import (
    PRESETS,
    STAGE_NAMES,
    X3D,
    X3DPreset,
    check_stage_model,
    forward_with_stage_modules,
    get_preset,
)
from models.modelling.x3d_weights import build_x3d_backbone
from piumr_kernels import GIRLLoss

__all__ = ["ABLATIONS", "Ablation", "PIUmr", "PIUmrLoss", "PRESETS", "STAGE_NAMES", "build_piumr"]


class PIUmr(nn.Module):
    """X3D backbone with a TFAM after each stage in `tfam_stages`.

    `forward(x)` takes clips `(B, 3, T, H, W)` with `T == num_frames` and returns
    `(logits (B, num_classes), features (B, 2048))`. The backbone keeps PyTorchVideo's
    names under `backbone.` (load Kinetics weights with
    `models.modelling.x3d_weights.load_x3d_checkpoint(model.backbone, path)`); TFAMs live in
    `tfam[stage]`. Extra keyword arguments go to every TFAM.
    """

    def __init__(
        self,
        backbone: X3D,
        num_frames: int,
        *,
        tfam_stages: tuple[str, ...] | list[str] = STAGE_NAMES,
        temporal: bool = True,
        frequency: bool = True,
        fusion: str = "consistency",
        **tfam_kwargs,
    ) -> None:
        super().__init__()
        stages = check_stage_model(backbone, num_frames, tfam_stages, "tfam_stages")
        if stages and not (temporal or frequency):
            raise ValueError("TFAM with both branches off is the identity: pass tfam=False (or tfam_stages=()) instead")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.backbone = backbone
        self.num_frames = num_frames
        widths = dict(zip(STAGE_NAMES, backbone.stage_widths))
        self.tfam = nn.ModuleDict(
            {
                stage: TFAM(
                    widths[stage], num_frames, temporal=temporal, frequency=frequency, fusion=fusion, **tfam_kwargs
                )
                for stage in STAGE_NAMES
                if stage in stages
            }
        )

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_with_stage_modules(self.backbone, self.tfam, self.num_frames, x, "TFAM")


class PIUmrLoss(Objective):
    """`CE(logits, labels) + lambda_girl * GIRL(features, labels, groups)`.

    `forward(logits, features, labels, groups=None, num_groups=None) -> (loss, parts)`, the
    parts detached for logging: `ce`, `girl` (0 when off) and, with GIRL on, `girl_var` (the
    variance of the group risks), `girl_positive_fraction` and `girl_group_size` (see
    `models.modelling.girl_diagnostics`). `girl_kwargs` go to
    `piumr_kernels.GIRLLoss` (num_groups=4, tau=0.07, eta=0.2, lambda_var=1.0,
    var_grad=True, detach_weights=True; see SPEC §3): the batch is split into
    `num_groups` random pseudo-groups, or by `groups` when given: ids in `[0, num_groups)`
    (e.g. subjects numbered per batch), `num_groups` of that call then being the number of
    ids. `girl=False` is the "GIRL off" ablation: the loss is CE. `label_smoothing` is the
    cross-entropy's (0: none, the paper).
    """

    def __init__(
        self, lambda_girl: float = 1.0, girl: bool = True, label_smoothing: float = 0.0, **girl_kwargs
    ) -> None:
        super().__init__()
        if isinstance(lambda_girl, bool) or not isinstance(lambda_girl, numbers.Real):
            raise TypeError(f"lambda_girl must be a real number, got {type(lambda_girl).__name__}")
        if not (math.isfinite(lambda_girl) and lambda_girl >= 0):
            raise ValueError(f"lambda_girl must be a finite number >= 0, got {lambda_girl}")
        self.lambda_girl = float(lambda_girl)
        if (
            isinstance(label_smoothing, bool)
            or not isinstance(label_smoothing, numbers.Real)
            or not (0 <= label_smoothing <= 1)
        ):
            raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        if not girl and girl_kwargs:
            raise ValueError(f"GIRL options {sorted(girl_kwargs)} were given with girl=False")
        self.girl = GIRLLoss(**girl_kwargs) if girl else None

    def combine(self, ce, features, labels, groups, num_groups) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.girl is None:
            return ce, {"ce": ce.detach(), "girl": torch.zeros_like(ce).detach()}
        girl, details = self.girl(features, labels, groups, num_groups=num_groups, return_details=True)
        loss = ce + self.lambda_girl * girl
        groups_seen = girl_group_diagnostics(labels, details["group_index"], details["group_risks"].shape[0])
        return loss, {
            "ce": ce.detach(),
            "girl": girl.detach(),
            "girl_var": details["risk_var"],
            "girl_positive_fraction": groups_seen["positive_fraction"],
            "girl_group_size": groups_seen["group_size"],
        }

    def extra_repr(self) -> str:
        return f"lambda_girl={self.lambda_girl}"


def build_piumr(
    preset: str | X3DPreset,
    num_classes: int,
    *,
    tfam: bool = True,
    tfam_stages: tuple[str, ...] | list[str] = STAGE_NAMES,
    temporal: bool = True,
    frequency: bool = True,
    fusion: str = "consistency",
    num_frames: int | None = None,
    pretrained: str | os.PathLike | None = None,
    dropout_rate: float = 0.5,
    **tfam_kwargs,
) -> PIUmr:
    """PIUmr on X3D-`preset` (XS, S, M, L) with `num_classes` outputs.

    `tfam=False` gives plain X3D (no TFAM modules); `tfam_stages` picks the stages TFAM
    follows; `temporal`/`frequency`/`fusion` are TFAM's ablation switches. `num_frames`
    defaults to the preset's clip length (`PRESETS[preset].num_frames`). `pretrained` is a
    PyTorchVideo `X3D_*.pyth` or SlowFast `x3d_*.pyth` file, loaded strictly into the
    backbone (the Kinetics classifier is replaced when `num_classes != 400`; TFAM starts
    fresh).
    """
    spec = get_preset(preset)
    backbone = build_x3d_backbone(spec, num_classes, pretrained, dropout_rate)
    return PIUmr(
        backbone,
        spec.num_frames if num_frames is None else num_frames,
        tfam_stages=tfam_stages if tfam else (),
        temporal=temporal,
        frequency=frequency,
        fusion=fusion,
        **tfam_kwargs,
    )


@dataclass(frozen=True)
class Ablation:
    """One row of the paper's ablation tables: what `build_piumr` and `PIUmrLoss` get."""

    tfam: bool = True
    temporal: bool = True
    frequency: bool = True
    fusion: str = "consistency"
    girl: bool = True

    def model_kwargs(self) -> dict:
        kwargs = asdict(self)
        del kwargs["girl"]
        return kwargs

    def loss_kwargs(self) -> dict:
        return {"girl": self.girl}


# Table 2 (components) and Table 3 (TFAM branches and fusion; GIRL on, as in the full model).
ABLATIONS = {
    "baseline": Ablation(tfam=False, girl=False),  # X3D + CE
    "tfam_only": Ablation(girl=False),  # + TFAM, no GIRL
    "girl_only": Ablation(tfam=False),  # + GIRL, no TFAM
    "temporal_only": Ablation(frequency=False),
    "frequency_only": Ablation(temporal=False),
    "mean_fusion": Ablation(fusion="mean"),
    "full": Ablation(),
}
