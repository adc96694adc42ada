"""TFAM, PIUmr's temporal-frequency attention module (paper 3.1, SPEC §5).

`TFAM(channels, num_frames)` maps `x` `(B, C, T, H, W)` to the same shape:

    x_out = x * (lambda_t * (1 + g[b, t]) + lambda_s * (1 + A_s[b, h, w]))

with `g` the temporal gate (frame x frame affinities -> Sinkhorn-normalized kernels ->
gated self-attention) and `A_s` the spatial attention of the DCT frequency branch.
`x` is read twice and written once, TFAM's memory floor: one fused statistics pass
(`tfam_statistics`: frame mean and max over H, W, and the T-and-C mean map the DCT bank
filters) and one fused combining pass (`tfam_combine`), linked so that the backward
reads `x` once and writes `dx` once (see `piumr_kernels.tfam_pooling`). Every other step
runs on tensors of size `(B, C, T)`, `(B, T, T)` or `(B, D, H, W)`, so the perturbed
temporal branch of the consistency fusion never touches `x` either:
`pool(x_t) = mean_t (1 + g_t) a_t`.

Decisions (SPEC §5 and this file):
- Affinities are cosines of frame descriptors centered over time (`a_t - mean_t a_t`); a
  frame whose centered descriptor is zero has affinity 0.
- `Var(M)` in the adaptive temperature is the population variance over the `T x T` map.
- Eval-mode frame mask for `x_t_hat`: frames `t = 3, 7, 11, ...` (every 4th, counted from
  1), so a clip with fewer than 4 frames keeps all of them and none is ever empty.
  Training: each frame dropped with probability `mask_prob`, the frame with the largest
  draw always kept.
- `s_s` only needs `mean_{h,w}(eta')`, the mean of `H W` standard normals, so it draws
  that mean directly (`N(0, 1 / (H W))` per `(b, d)`, the same distribution as drawing
  `eta'` of the shape of `E_rob`). In eval mode the draw is a fixed-seed vector
  `(D,)` made once at construction (`eval_seed`), shared by every sample, so a sample's
  output does not depend on its batch or position in it.
- `lambda = s / (s_t + s_s + 1e-6)` exactly as written: if both stabilities clamp to 0
  the output is 0 (not observed in practice: both cosines are of near-identical vectors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from piumr_kernels import dct_filter_bank, sinkhorn, tfam_combine, tfam_statistics

FUSIONS = ("consistency", "mean")
ATTENTION_KERNEL = 7  # the frequency branch's Conv2d(D -> 1, 7x7, padding 3)


def centered_cosine_affinity(descriptors: torch.Tensor) -> torch.Tensor:
    """`(B, C, T)` frame descriptors -> `(B, T, T)` cosines of `a_t - mean_t a_t`.

    Centering over time removes the static part of the clip (background, appearance), so
    the map describes motion. A zero centered descriptor has affinity 0 with every frame.
    """
    centered = descriptors - descriptors.mean(dim=-1, keepdim=True)
    unit = F.normalize(centered, dim=1, eps=1e-8)
    return torch.einsum("bci,bcj->bij", unit, unit)


def _row_variance(kernel: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the (population) variance along each row: `(B, N, N)` -> `(B,)`."""
    return kernel.var(dim=-1, correction=0).mean(dim=-1)


def attention_logits(conv: nn.Conv2d, robust: torch.Tensor) -> torch.Tensor:
    """`conv(robust)` for a `Conv2d(D -> 1, k x k, padding k // 2, bias=False)`, `(B, 1, H, W)`.

    On CPU it runs as one matrix product over the `D` channels for all `k^2` taps, then
    `fold` adds up the shifted taps: the same numbers, 5-20x faster than oneDNN's
    convolution with a single output channel (forward and backward). Elsewhere the
    convolution itself (cuDNN handles this shape well).
    """
    if robust.device.type != "cpu":
        return conv(robust)
    kernel = conv.kernel_size[0]
    # fold sums columns[tap, (h, w)] into (h + i - pad, w + j - pad): flipping the taps
    # turns that adjoint placement into the cross-correlation Conv2d computes.
    taps = conv.weight[0].flip(-2, -1).flatten(1)
    columns = torch.einsum("dt,bdn->btn", taps, robust.flatten(2))
    return F.fold(columns, robust.shape[-2:], kernel, padding=kernel // 2)


class TemporalGate(nn.Module):
    """Temporal branch (paper 3.1.2): frame mean/max descriptors -> gate `g` `(B, T)`.

    Affinities -> per-sample adaptive temperature `tau = tau_min + tau_scale *
    sqrt(0.5 (Var M_avg + Var M_max) + 1e-6)` -> `softmax_j(-M^2 / tau)` -> symmetrized ->
    `sinkhorn` -> mixed with `softmax(Linear(4 -> 2))` of the kernels' row and column
    variances (zero-initialized: equal weights) -> deviation penalty `gamma_w * dev_i` ->
    `A_t = sigmoid(Gamma * K_mix + beta)` -> `Linear(T, T, bias=False)` -> single-head
    self-attention with embedding `T` (scale `1/sqrt(T)`) -> mean over the last axis ->
    sigmoid.
    """

    def __init__(
        self, num_frames: int, *, sinkhorn_iters: int, tau_min: float, tau_scale: float, gamma_w: float
    ) -> None:
        super().__init__()
        self.num_frames = num_frames
        self.sinkhorn_iters = sinkhorn_iters
        self.tau_min = tau_min
        self.tau_scale = tau_scale
        self.gamma_w = gamma_w
        self.mix = nn.Linear(4, 2)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)
        self.gamma = nn.Parameter(torch.ones(num_frames, num_frames))
        self.beta = nn.Parameter(torch.zeros(()))
        self.frame_proj = nn.Linear(num_frames, num_frames, bias=False)
        self.query = nn.Linear(num_frames, num_frames)
        self.key = nn.Linear(num_frames, num_frames)
        self.value = nn.Linear(num_frames, num_frames)

    def _transport_kernel(self, affinity: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        kernel = torch.softmax(-affinity.square() / tau, dim=-1)
        kernel = 0.5 * (kernel + kernel.transpose(-1, -2))
        return sinkhorn(kernel, self.sinkhorn_iters)

    def forward(self, frame_mean: torch.Tensor, frame_max: torch.Tensor) -> torch.Tensor:
        m_avg = centered_cosine_affinity(frame_mean)
        m_max = centered_cosine_affinity(frame_max)
        m_avg = m_avg - m_avg.mean(dim=(-2, -1), keepdim=True)
        m_max = m_max - m_max.mean(dim=(-2, -1), keepdim=True)
        spread = 0.5 * (m_avg.var(dim=(-2, -1), correction=0) + m_max.var(dim=(-2, -1), correction=0))
        tau = (self.tau_min + self.tau_scale * torch.sqrt(spread + 1e-6))[:, None, None]
        k_global = self._transport_kernel(m_avg, tau)
        k_local = self._transport_kernel(m_max, tau)
        kernel_stats = torch.stack(
            [
                _row_variance(k_global),
                _row_variance(k_global.transpose(-1, -2)),
                _row_variance(k_local),
                _row_variance(k_local.transpose(-1, -2)),
            ],
            dim=-1,
        )
        weights = torch.softmax(self.mix(kernel_stats), dim=-1)[:, :, None, None]
        k_mix = weights[:, 0] * k_global + weights[:, 1] * k_local
        deviation = (k_mix - k_mix.mean(dim=-1, keepdim=True)).abs().mean(dim=-1, keepdim=True)
        k_mix = k_mix - self.gamma_w * deviation
        a_t = torch.sigmoid(self.gamma * k_mix + self.beta)
        h = self.frame_proj(a_t)
        attended = F.scaled_dot_product_attention(self.query(h), self.key(h), self.value(h))
        return torch.sigmoid(attended.mean(dim=-1))


class FrequencyAttention(nn.Module):
    """Frequency branch (paper 3.1.1): the spatial map `s` `(B, H, W)` -> `A_s` `(B, H, W)`.

    `E, var = dct_filter_bank(s)` (D = kernel_size^2 = 49 filters; filtering the T-and-C
    mean map equals filtering `x`); `E + beta_f * var * sign(E)` (beta_f per frequency,
    init 0.1) plus, in training only, `alpha_f * clamp(var, eps_lo, eps_hi) * eta` with
    fresh `eta ~ N(0, I)`; dynamic tanh `gamma_d tanh(alpha z) + beta_d` (alpha init
    0.5); `sigmoid(Conv2d(D -> 1, 7x7, padding 3, bias=False))`.
    """

    def __init__(self, *, kernel_size: int, alpha_f: float, eps_lo: float, eps_hi: float, eval_seed: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.alpha_f = alpha_f
        self.eps_lo = eps_lo
        self.eps_hi = eps_hi
        n_filters = kernel_size * kernel_size
        self.beta_f = nn.Parameter(torch.full((n_filters,), 0.1))
        self.dyt_alpha = nn.Parameter(torch.tensor(0.5))
        self.dyt_gamma = nn.Parameter(torch.ones(n_filters))
        self.dyt_beta = nn.Parameter(torch.zeros(n_filters))
        self.conv = nn.Conv2d(n_filters, 1, kernel_size=ATTENTION_KERNEL, padding=ATTENTION_KERNEL // 2, bias=False)
        generator = torch.Generator().manual_seed(eval_seed)
        self.register_buffer("eval_noise", torch.randn(n_filters, generator=generator), persistent=False)

    def _noise_scale(self, var: torch.Tensor) -> torch.Tensor:
        return var.clamp(self.eps_lo, self.eps_hi)

    def forward(self, spatial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> `(A_s (B, H, W), E_rob (B, D, H, W), var (B, D))`."""
        energy, _, var = dct_filter_bank(spatial[:, None, None], self.kernel_size, return_stats=True)
        var_map = var[:, :, None, None]
        z = energy + self.beta_f[:, None, None] * var_map * torch.sign(energy)
        if self.training:
            z = z + self.alpha_f * self._noise_scale(var_map) * torch.randn_like(energy)
        robust = self.dyt_gamma[:, None, None] * torch.tanh(self.dyt_alpha * z) + self.dyt_beta[:, None, None]
        attention = torch.sigmoid(attention_logits(self.conv, robust))[:, 0]
        return attention, robust, var

    def stability(self, robust: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """`s_s = cos(mean_hw E_rob, mean_hw (E_rob + clamp(var) * eta'))` per sample, `(B,)`."""
        mean = robust.mean(dim=(-2, -1))
        positions = robust.shape[-2] * robust.shape[-1]
        if self.training:
            noise_mean = torch.randn_like(mean)
        else:
            noise_mean = self.eval_noise.to(mean.dtype).expand_as(mean)
        perturbed = mean + self._noise_scale(var) * noise_mean / math.sqrt(positions)
        return F.cosine_similarity(mean, perturbed, dim=-1)


class TFAM(nn.Module):
    """Temporal-frequency attention module (SPEC §5): `(B, C, T, H, W)` -> same shape.

    Args:
        channels, num_frames: `C` and `T` of the input (the `T x T` parameters are sized
            by `num_frames`; X3D presets use 4, 13 or 16).
        temporal, frequency: the two branches (ablation switches; both off = identity).
        fusion: `"consistency"` (weights from the stabilities `s_t`, `s_s`, detached and
            clamped at 0: `lambda_t = s_t / (s_t + s_s + 1e-6)`) or `"mean"` (0.5 / 0.5).
            Only used when both branches are on; one branch alone gets weight 1.
        sinkhorn_iters, tau_min, tau_scale, gamma_w: temporal kernel (see TemporalGate).
        alpha_f, eps_lo, eps_hi: frequency-branch noise (see FrequencyAttention).
        mask_prob: training frame-drop probability for the perturbed temporal branch.
        eval_mask_period: in eval mode frames `t` with `(t + 1) % period == 0` are masked.
        kernel_size: DCT filter size (D = kernel_size^2 filters).
        eval_seed: seed of the fixed eval-mode spectral noise of `s_s`.

    Training draws fresh noise (frequency branch, frame mask, `s_s`); eval mode is
    deterministic.
    """

    def __init__(
        self,
        channels: int,
        num_frames: int,
        *,
        temporal: bool = True,
        frequency: bool = True,
        fusion: str = "consistency",
        sinkhorn_iters: int = 3,
        tau_min: float = 0.05,
        tau_scale: float = 1.0,
        gamma_w: float = 0.05,
        alpha_f: float = 0.1,
        eps_lo: float = 1e-4,
        eps_hi: float = 1.0,
        mask_prob: float = 0.25,
        eval_mask_period: int = 4,
        kernel_size: int = 7,
        eval_seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("channels", channels),
            ("num_frames", num_frames),
            ("sinkhorn_iters", sinkhorn_iters),
            ("eval_mask_period", eval_mask_period),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if not 0.0 <= mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in [0, 1), got {mask_prob!r}")
        if not 0.0 < eps_lo <= eps_hi:
            raise ValueError(f"need 0 < eps_lo <= eps_hi, got eps_lo={eps_lo!r}, eps_hi={eps_hi!r}")
        if not tau_min > 0 or tau_scale < 0:
            raise ValueError(f"need tau_min > 0 and tau_scale >= 0, got {tau_min!r}, {tau_scale!r}")
        self.channels = channels
        self.num_frames = num_frames
        self.fusion = fusion
        self.mask_prob = mask_prob
        self.eval_mask_period = eval_mask_period
        self.temporal = (
            TemporalGate(
                num_frames, sinkhorn_iters=sinkhorn_iters, tau_min=tau_min, tau_scale=tau_scale, gamma_w=gamma_w
            )
            if temporal
            else None
        )
        self.frequency = (
            FrequencyAttention(
                kernel_size=kernel_size, alpha_f=alpha_f, eps_lo=eps_lo, eps_hi=eps_hi, eval_seed=eval_seed
            )
            if frequency
            else None
        )

    def frame_keep_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """`(B, T)` 1/0 mask of the perturbed temporal branch `x_t_hat` (see the class doc)."""
        frames = self.num_frames
        if self.training:
            draws = torch.rand(batch, frames, device=device)
            keep = (draws >= self.mask_prob) | (draws == draws.amax(dim=-1, keepdim=True))
        else:
            keep = (torch.arange(frames, device=device) + 1) % self.eval_mask_period != 0
            keep = keep.expand(batch, frames)
        return keep.float()

    def _temporal_stability(self, frame_mean, frame_max, gate) -> torch.Tensor:
        """`s_t = cos(pool(x_t), pool(x_t_hat))`, from the frame descriptors alone, `(B,)`."""
        keep = self.frame_keep_mask(frame_mean.shape[0], frame_mean.device).to(frame_mean.dtype)[:, None]
        gate_hat = self.temporal(frame_mean * keep, frame_max * keep)
        pooled = ((1 + gate)[:, None] * frame_mean).mean(dim=-1)
        pooled_hat = ((1 + gate_hat)[:, None] * keep * frame_mean).mean(dim=-1)
        return F.cosine_similarity(pooled, pooled_hat, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.channels or x.shape[2] != self.num_frames:
            raise ValueError(f"x must be (B, C={self.channels}, T={self.num_frames}, H, W), got shape {tuple(x.shape)}")
        if self.temporal is None and self.frequency is None:
            return x
        batch, _, frames, height, width = x.shape
        frame_mean, frame_max, spatial, link = tfam_statistics(x, link=True)
        if self.temporal is not None:
            gate = self.temporal(frame_mean, frame_max)
        if self.frequency is not None:
            attention, robust, var = self.frequency(spatial)
        if self.temporal is None:
            temporal_scale = spatial.new_zeros(batch, frames)
            spatial_scale = 1 + attention
        elif self.frequency is None:
            temporal_scale = 1 + gate
            spatial_scale = spatial.new_zeros(batch, height, width)
        else:
            if self.fusion == "mean":
                weight_t = weight_s = 0.5
            else:
                with torch.no_grad():
                    s_t = self._temporal_stability(frame_mean, frame_max, gate).clamp_min(0)
                    s_s = self.frequency.stability(robust, var).clamp_min(0)
                    total = s_t + s_s + 1e-6
                    weight_t, weight_s = (s_t / total)[:, None], (s_s / total)[:, None, None]
            temporal_scale = weight_t * (1 + gate)
            spatial_scale = weight_s * (1 + attention)
        return tfam_combine(x, temporal_scale, spatial_scale, link=link)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_frames={self.num_frames}, fusion={self.fusion!r}, "
            f"mask_prob={self.mask_prob}, eval_mask_period={self.eval_mask_period}"
        )
