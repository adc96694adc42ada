"""HDF, the predecessor of PIUmr: X3D with a DAM after each stage, trained with CE + DSM (SPEC §8).

    model = build_hdf("M", 7)                     # X3D-M + DAM after res2..res5
    criterion = DSMLoss(label_smoothing=0.1)      # lambda_CE CE + lambda_SC (contrastive + IB)
    logits, features = model(clips)              # clips: (B, 3, T, H, W), T == num_frames
    loss, parts = criterion(logits, features, labels)

`DAM` keeps the released code's meaning where the code runs (its temporal map is frame x
channel-bin, not frame x frame) and SPEC §8's decisions where it does not. It touches its
activation `x` in the same two fused passes as TFAM (SPEC §5 memory floor):
`tfam_statistics` (frame mean/max per channel and the DCT bank's input map) and one
`tfam_combine`; everything between runs on `(B, C, T)`, `(B, T, T)` and `(B, D, H, W)`
tensors. `DSMLoss` is GIRL over the whole batch as one group plus the information-bottleneck
term, under fixed or gradient-norm loss scaling.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
import torch.nn.functional as F
from torch import nn

from models.modelling.objective import Objective
from models.modelling.tfam import attention_logits
from models.modelling.x3d import STAGE_NAMES, X3D, X3DPreset, check_stage_model, forward_with_stage_modules, get_preset
from models.modelling.x3d_weights import build_x3d_backbone
from piumr_kernels import dct_filter_bank, girl_loss, tfam_combine, tfam_statistics

__all__ = ["DAM", "DSM_SCALINGS", "DSMLoss", "HDF", "build_hdf", "channel_bins"]

DSM_SCALINGS = ("fixed", "gradient")
ATTENTION_KERNEL = 7  # the frequency map's Conv2d(D -> 1, 7x7, padding 3)


def _real(name: str, value, minimum: float, maximum: float = math.inf) -> float:
    """`value` as a float, or an error naming `name`, the range and what came."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and minimum <= value <= maximum):
        raise ValueError(f"{name} must be a finite number in [{minimum}, {maximum}], got {value}")
    return float(value)


def channel_bins(channels: int, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(bins, channels)` averaging weights and membership mask of AdaptiveAvgPool's bins.

    Bin `j` covers channels `[floor(j C / n), ceil((j + 1) C / n))`, as adaptive pooling
    splits an axis of length `C` into `n` outputs (bins overlap when `C < n`).
    """
    index = torch.arange(bins)
    start = torch.div(index * channels, bins, rounding_mode="floor")
    end = torch.div((index + 1) * channels + bins - 1, bins, rounding_mode="floor")
    channel = torch.arange(channels)
    mask = (channel[None] >= start[:, None]) & (channel[None] < end[:, None])
    return mask.double() / (end - start)[:, None].double(), mask


class DAM(nn.Module):
    """Time-Frequency Distributional Attention Module (SPEC §8): `(B, C, T, H, W)` -> same shape.

    `y = x * (w_t (1 + g[b, t]) + w_s (1 + sigmoid(m)[b, h, w])) / 2` with the temporal gate
    `g` from the frame x channel-bin maps and the frequency map `m` from the DCT bank.
    Every parameter starts at HDF's value: `Gamma` ones and `Delta` zeros `(T, T)`,
    `alpha = beta = 0.5`; `noise` `(D,)` drawn once from `N(0, noise_std^2)` (a learnable
    constant, never resampled), `adv_a` ones, `adv_b` zeros, `al = be = 0.5`; the dynamic
    tanh's `alpha = 0.5`, gamma ones, beta zeros; `w_t = 0.8`, `w_s = 0.3`; the linear and
    convolution layers with PyTorch's default initialization. The module has no randomness:
    train and eval mode compute the same.

    Args:
        channels, num_frames: `C` and `T` of the input (`T` also sets the channel-bin count).
        kernel_size: DCT filter size (`D = kernel_size^2` frequency channels).
        noise_std: standard deviation of the drawn `noise` constant (HDF: 0.1).
        wasserstein_reg: weight of the spread term in the frequency perturbation (HDF: 0.05).
    """

    def __init__(
        self,
        channels: int,
        num_frames: int,
        *,
        kernel_size: int = 7,
        noise_std: float = 0.1,
        wasserstein_reg: float = 0.05,
    ) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("num_frames", num_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
        self.channels = channels
        self.num_frames = num_frames
        self.kernel_size = kernel_size
        self.noise_std = _real("noise_std", noise_std, 0.0)
        self.wasserstein_reg = _real("wasserstein_reg", wasserstein_reg, 0.0)
        frequencies = kernel_size * kernel_size
        # temporal branch
        self.gamma = nn.Parameter(torch.ones(num_frames, num_frames))
        self.delta = nn.Parameter(torch.zeros(num_frames, num_frames))
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.beta = nn.Parameter(torch.tensor(0.5))
        self.frame_proj = nn.Linear(num_frames, num_frames, bias=False)
        self.query = nn.Linear(num_frames, num_frames)
        self.key = nn.Linear(num_frames, num_frames)
        self.value = nn.Linear(num_frames, num_frames)
        # frequency branch
        self.noise = nn.Parameter(torch.randn(frequencies) * noise_std)
        self.adv_a = nn.Parameter(torch.ones(frequencies))
        self.adv_b = nn.Parameter(torch.zeros(frequencies))
        self.al = nn.Parameter(torch.tensor(0.5))
        self.be = nn.Parameter(torch.tensor(0.5))
        self.dyt_alpha = nn.Parameter(torch.tensor(0.5))
        self.dyt_gamma = nn.Parameter(torch.ones(frequencies))
        self.dyt_beta = nn.Parameter(torch.zeros(frequencies))
        self.conv = nn.Conv2d(frequencies, 1, ATTENTION_KERNEL, padding=ATTENTION_KERNEL // 2, bias=False)
        # fusion
        self.w_t = nn.Parameter(torch.tensor(0.8))
        self.w_s = nn.Parameter(torch.tensor(0.3))
        bin_weights, bin_mask = channel_bins(channels, num_frames)
        self.register_buffer("bin_weights", bin_weights.float(), persistent=False)
        self.register_buffer("bin_mask", bin_mask, persistent=False)

    def temporal_maps(self, frame_mean: torch.Tensor, frame_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, C, T)` per-channel frame statistics -> `A`, `M` `(B, T, n)`: frame `i`'s mean
        (max) over channel bin `j` and all pixels (AdaptiveAvg/MaxPool3d((T, 1, 1)) of the
        `(B, T, C, H, W)` tensor)."""
        avg = torch.einsum("bci,jc->bij", frame_mean, self.bin_weights.to(frame_mean.dtype))
        masked = torch.where(self.bin_mask[None, :, :, None], frame_max[:, None], float("-inf"))
        return avg, masked.amax(dim=2).transpose(1, 2)

    def temporal_gate(self, frame_mean: torch.Tensor, frame_max: torch.Tensor) -> torch.Tensor:
        """SPEC §8 steps 1-4: the gate `g` `(B, T)`."""
        avg, peak = self.temporal_maps(frame_mean, frame_max)
        spread = torch.linalg.vector_norm(avg - avg.mean(dim=-1, keepdim=True), dim=-1, keepdim=True)
        step = F.pad((avg[..., 1:] - avg[..., :-1]).abs(), (1, 0))
        score = torch.sigmoid(self.gamma * (self.alpha * avg + self.beta * peak) + self.delta * spread - step)
        mixed = self.frame_proj(score.transpose(1, 2)).transpose(1, 2)  # W_fc S: mixes the frame (row) axis
        attended = F.scaled_dot_product_attention(self.query(mixed), self.key(mixed), self.value(mixed))
        return torch.sigmoid(attended.mean(dim=-1))

    def frequency_logits(self, spatial: torch.Tensor) -> torch.Tensor:
        """SPEC §8 steps 5-8: the map `m` `(B, H, W)` from `s = mean_t sum_c x` `(B, H, W)`."""
        energy, mean, _ = dct_filter_bank(spatial[:, None, None], self.kernel_size, return_stats=True)
        # The norm, not sqrt(H W var): its gradient stays finite on a constant map.
        spread = torch.linalg.vector_norm(energy - mean[..., None, None], dim=(-2, -1), keepdim=True)
        sign = torch.sign(energy)
        adversarial = (
            energy
            + self.noise[:, None, None] * self.adv_a[:, None, None] * sign
            + self.wasserstein_reg * self.adv_b[:, None, None] * spread * sign
        )
        mixed = (self.al * energy + self.be * adversarial) / 2
        std = torch.sqrt(mixed.var(dim=1, keepdim=True) + 1e-6)
        robust = (
            torch.tanh(self.dyt_alpha / (std + 1e-6) * mixed) * self.dyt_gamma[:, None, None]
            + self.dyt_beta[:, None, None]
        )
        return attention_logits(self.conv, robust)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.channels or x.shape[2] != self.num_frames:
            raise ValueError(f"x must be (B, C={self.channels}, T={self.num_frames}, H, W), got shape {tuple(x.shape)}")
        frame_mean, frame_max, spatial = tfam_statistics(x)
        gate = self.temporal_gate(frame_mean, frame_max)
        attention = torch.sigmoid(self.frequency_logits(spatial))
        temporal_scale = self.w_t * (1 + gate) / 2
        spatial_scale = self.w_s * (1 + attention) / 2
        return tfam_combine(x, temporal_scale, spatial_scale)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_frames={self.num_frames}, kernel_size={self.kernel_size}"


class HDF(nn.Module):
    """X3D backbone with a DAM after each stage in `dam_stages`.

    `forward(x)` takes clips `(B, 3, T, H, W)` with `T == num_frames` and returns
    `(logits (B, num_classes), features (B, 2048))`, as `PIUmr` does: the training loop
    treats both alike. The backbone keeps PyTorchVideo's names under `backbone.`; DAMs
    live in `dam[stage]`. Extra keyword arguments go to every DAM.
    """

    def __init__(
        self, backbone: X3D, num_frames: int, *, dam_stages: tuple[str, ...] | list[str] = STAGE_NAMES, **dam_kwargs
    ) -> None:
        super().__init__()
        stages = check_stage_model(backbone, num_frames, dam_stages, "dam_stages")
        self.backbone = backbone
        self.num_frames = num_frames
        widths = dict(zip(STAGE_NAMES, backbone.stage_widths))
        self.dam = nn.ModuleDict(
            {stage: DAM(widths[stage], num_frames, **dam_kwargs) for stage in STAGE_NAMES if stage in stages}
        )

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_with_stage_modules(self.backbone, self.dam, self.num_frames, x, "DAM")


def build_hdf(
    preset: str | X3DPreset,
    num_classes: int,
    *,
    dam_stages: tuple[str, ...] | list[str] = STAGE_NAMES,
    num_frames: int | None = None,
    pretrained: str | os.PathLike | None = None,
    dropout_rate: float = 0.5,
    **dam_kwargs,
) -> HDF:
    """HDF on X3D-`preset` (XS, S, M, L or an `X3DPreset`) with `num_classes` outputs.

    `dam_stages` picks the stages a DAM follows (default res2..res5); `num_frames` defaults
    to the preset's clip length. `pretrained` is an X3D checkpoint loaded strictly into the
    backbone (see `build_piumr`); the DAMs start fresh.
    """
    spec = get_preset(preset)
    backbone = build_x3d_backbone(spec, num_classes, pretrained, dropout_rate)
    return HDF(backbone, spec.num_frames if num_frames is None else num_frames, dam_stages=dam_stages, **dam_kwargs)


class DSMLoss(Objective):
    """HDF's objective: `lambda_CE CE(logits, labels) + lambda_SC DSM(features, labels)` (SPEC §8).

    `DSM = girl_loss(features, labels, num_groups=1, lambda_var=0, tau, eta, detach_weights)
    + ib_sign * lambda_ib * trace(cov(f))`, `f` the L2-normalized features, `cov` unbiased
    over the batch. `ib_sign=+1` (default) penalizes the spread as the paper's figure says
    ("compression by covariance minimization"); `ib_sign=-1` is the released code's form.
    `detach_weights=False` differentiates through the Gaussian weights, as the code does.

    Scaling: `"fixed"` uses `lambda_CE = lambda_ce` (10) and `lambda_SC = lambda_sc` (0.1),
    the code's values; `"gradient"` the paper's `lambda_CE = alpha g / (g + 1)` and
    `lambda_SC = beta / (g + 1)` with `g` the global gradient norm of the previous step,
    which the training loop reports through `observe_grad_norm` (detached, no second
    backward). Until a norm has been observed `g = 1`; `g` lives in the buffer `grad_norm`.

    `forward(logits, features, labels, groups=None, num_groups=None) -> (loss, parts)` with
    the detached parts `{"ce", "girl" (the contrastive term), "ib" (trace(cov f))}`. DSM
    contrasts the whole batch, so `groups` must be None.
    """

    def __init__(
        self,
        *,
        scaling: str = "fixed",
        lambda_ce: float = 10.0,
        lambda_sc: float = 0.1,
        alpha: float = 10.0,
        beta: float = 0.1,
        lambda_ib: float = 0.1,
        ib_sign: int = 1,
        tau: float = 0.07,
        eta: float = 0.2,
        detach_weights: bool = True,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if scaling not in DSM_SCALINGS:
            raise ValueError(f"scaling must be one of {DSM_SCALINGS}, got {scaling!r}")
        if isinstance(ib_sign, bool) or ib_sign not in (1, -1):
            raise ValueError(f"ib_sign must be 1 or -1, got {ib_sign!r}")
        self.scaling = scaling
        self.lambda_ce = _real("lambda_ce", lambda_ce, 0.0)
        self.lambda_sc = _real("lambda_sc", lambda_sc, 0.0)
        self.alpha = _real("alpha", alpha, 0.0)
        self.beta = _real("beta", beta, 0.0)
        self.lambda_ib = _real("lambda_ib", lambda_ib, 0.0)
        self.label_smoothing = _real("label_smoothing", label_smoothing, 0.0, 1.0)
        self.ib_sign = ib_sign
        self.tau = _real("tau", tau, 1e-3)
        self.eta = _real("eta", eta, 1e-3)
        if not isinstance(detach_weights, bool):
            raise TypeError(f"detach_weights must be a bool, got {type(detach_weights).__name__}")
        self.detach_weights = detach_weights
        self.register_buffer("grad_norm", torch.ones((), dtype=torch.float64))

    @torch.no_grad()
    def observe_grad_norm(self, norm: float | torch.Tensor) -> None:
        """Record the step's global gradient norm for the next step's `"gradient"` scaling; a
        non-finite norm (a skipped fp16 step) is ignored."""
        norm = torch.as_tensor(norm, dtype=self.grad_norm.dtype, device=self.grad_norm.device)
        self.grad_norm.copy_(torch.where(torch.isfinite(norm), norm, self.grad_norm))

    def weights(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """`(lambda_CE, lambda_SC)` of the next loss."""
        if self.scaling == "fixed":
            return self.lambda_ce, self.lambda_sc
        g = self.grad_norm.float()
        return self.alpha * g / (g + 1), self.beta / (g + 1)

    def combine(self, ce, features, labels, groups, num_groups) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if groups is not None or num_groups is not None:
            raise ValueError(
                "groups: DSM contrasts the whole batch as one group, expected None "
                f"(use girl_groups='random'), got a {type(groups).__name__}"
            )
        contrastive = girl_loss(
            features,
            labels,
            num_groups=1,
            tau=self.tau,
            eta=self.eta,
            lambda_var=0.0,
            detach_weights=self.detach_weights,
        )
        unit = F.normalize(features, dim=1)
        # trace(cov f) = sum of the per-dimension unbiased variances (no C x C matrix).
        ib = unit.var(dim=0, correction=1).sum() if unit.shape[0] > 1 else unit.new_zeros(())
        lambda_ce, lambda_sc = self.weights()
        loss = lambda_ce * ce + lambda_sc * (contrastive + self.ib_sign * self.lambda_ib * ib)
        return loss, {"ce": ce.detach(), "girl": contrastive.detach(), "ib": ib.detach()}

    def extra_repr(self) -> str:
        return (
            f"scaling={self.scaling!r}, lambda_ib={self.lambda_ib}, ib_sign={self.ib_sign}, tau={self.tau}, "
            f"eta={self.eta}, detach_weights={self.detach_weights}, label_smoothing={self.label_smoothing}"
        )
