"""TFAM's two large-tensor passes in plain PyTorch: the ground truth for tests and the
eager benchmark baseline. Autograd through these defines the gradients the fused
backends must match.

- `tfam_statistics_reference(x)`: the frame mean and frame max over `H, W` (each
  `(B, C, T)`) and the spatial map `s = (1/T) sum_t sum_c x` (`(B, H, W)`).
- `tfam_combine_reference(x, temporal_scale, spatial_scale)`:
  `x * (temporal_scale[b, t] + spatial_scale[b, h, w])`.

Math is float32 for float16/bfloat16/float32 inputs and float64 for float64; statistics
come back in that accumulation dtype, the combined output in the dtype of `x`.
"""

from __future__ import annotations

import torch

from ..fused_op import accumulation_dtype


def tfam_statistics_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(frame_mean, frame_max, spatial_sum)` of `x` `(B, C, T, H, W)`.

    The max gradient goes to the first position holding the maximum (torch.max semantics).
    """
    xf = x.to(accumulation_dtype(x.dtype))
    planes = xf.flatten(3)
    frame_mean = planes.mean(-1)
    frame_max = planes.max(-1).values
    spatial = xf.sum(1).mean(1)
    return frame_mean, frame_max, spatial


def tfam_combine_reference(x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor) -> torch.Tensor:
    """`x * (temporal_scale[:, None, :, None, None] + spatial_scale[:, None, None])`."""
    acc = accumulation_dtype(x.dtype)
    scale = temporal_scale.to(acc)[:, None, :, None, None] + spatial_scale.to(acc)[:, None, None]
    return (x.to(acc) * scale).to(x.dtype)
