"""TFAM's fused large-tensor ops (SPEC §5, memory floor): checks, dispatch, torch.library.

TFAM touches its activation `x` `(B, C, T, H, W)` in exactly two passes; everything else
it computes is on tensors of size `(B, C, T)`, `(B, T, T)` or `(B, D, H, W)`:

- `tfam_statistics(x)` reads `x` once and returns the frame mean and frame max over
  `H, W` (each `(B, C, T)`, the temporal branch's descriptors) and the spatial map
  `s[b, h, w] = (1/T) sum_t sum_c x` (`(B, H, W)`, the only input the DCT filter bank
  needs). Backward is one pass writing `dx = dmean/(H W) + ds/T + dmax at the argmax`;
  the forward saves only the argmax index per frame (int32, `(B, C, T)`).
- `tfam_combine(x, temporal_scale, spatial_scale)` reads `x` once and writes
  `x * (temporal_scale[b, t] + spatial_scale[b, h, w])`. Backward is one pass over the
  upstream gradient and `x` that writes `dx` and reduces `sum_{c,h,w} dout * x` `(B, T)`
  and `sum_{c,t} dout * x` `(B, H, W)`.

Statistics and scale gradients are float32 (float64 for float64 inputs); the combined
output and `dx` have the dtype of `x`. The fused backends take contiguous tensors (a
non-contiguous `x` is copied first). The max and its gradient follow `torch.max` on every
backend: ties go to the first position holding the maximum, and a NaN is the maximum (at
its first position).
"""

from __future__ import annotations

import torch

from torch import nn

from .. import backends
from .._checks import check_float_tensor, check_same_device
from ..fused_op import FusedOp, accumulation_dtype
from .reference import tfam_combine_reference, tfam_statistics_reference


def _fake_statistics(x):
    batch, channels, frames, height, width = x.shape
    acc = accumulation_dtype(x.dtype)
    return (
        x.new_empty((batch, channels, frames), dtype=acc),
        x.new_empty((batch, channels, frames), dtype=acc),
        x.new_empty((batch, height, width), dtype=acc),
        x.new_empty((batch, channels, frames), dtype=torch.int32),
    )


def _fake_statistics_backward(grad_mean, grad_max, grad_spatial, argmax, x):
    return torch.empty_like(x)


def _statistics_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output[3])
    ctx.mark_non_differentiable(output[3])


def _statistics_backward(ctx, backward_op, grad_mean, grad_max, grad_spatial, _grad_argmax):
    x, argmax = ctx.saved_tensors
    # An output nobody used gets a zero gradient of its (small) statistics shape.
    small = [(grad_mean, argmax), (grad_max, argmax), (grad_spatial, None)]
    if all(grad is None for grad, _ in small):
        return None
    acc = accumulation_dtype(x.dtype)
    batch, _, _, height, width = x.shape
    grads = [
        (grad if grad is not None else x.new_zeros(like.shape if like is not None else (batch, height, width),
                                                   dtype=acc)).contiguous()
        for grad, like in small
    ]
    return backward_op(*grads, argmax, x)


def _fake_combine(x, temporal_scale, spatial_scale):
    return torch.empty_like(x)


def _fake_combine_backward(grad_out, x, temporal_scale, spatial_scale):
    return torch.empty_like(x), torch.empty_like(temporal_scale), torch.empty_like(spatial_scale)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, backward_op, grad_out):
    if grad_out is None:
        return None, None, None
    x, temporal_scale, spatial_scale = ctx.saved_tensors
    return backward_op(grad_out.contiguous(), x, temporal_scale, spatial_scale)


def _triton_statistics():
    from . import triton_kernels

    return triton_kernels.statistics_forward, triton_kernels.statistics_backward


def _triton_combine():
    from . import triton_kernels

    return triton_kernels.combine_forward, triton_kernels.combine_backward


TFAM_STATISTICS = FusedOp(
    "tfam_statistics", _fake_statistics, _fake_statistics_backward, _statistics_setup, _statistics_backward,
    _triton_statistics,
)
TFAM_COMBINE = FusedOp(
    "tfam_combine", _fake_combine, _fake_combine_backward, _combine_setup, _combine_backward, _triton_combine
)
TFAM_STATISTICS.register()
TFAM_COMBINE.register()


def _check_video(x: torch.Tensor) -> None:
    check_float_tensor("x", x, dim=5)
    if any(size < 1 for size in x.shape[1:]):
        raise ValueError(f"x must be (B, C, T, H, W) with C, T, H, W >= 1, got shape {tuple(x.shape)}")


def _fused_backend(x: torch.Tensor) -> str:
    backend = backends.resolve_backend(x, cpp_op="tfam_statistics_cpp")
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError("x: the triton backend supports float16, bfloat16 and float32, got float64")
    return backend


def tfam_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One read of `x` `(B, C, T, H, W)` -> `(frame_mean, frame_max, spatial)`.

    `frame_mean[b, c, t] = mean_{h,w} x`, `frame_max[b, c, t] = max_{h,w} x` (TFAM's
    temporal descriptors, SPEC §5) and `spatial[b, h, w] = (1/T) sum_t sum_c x`, the map
    the DCT filter bank filters (`dct_filter_bank(spatial[:, None, None])` equals
    `dct_filter_bank(x)`). Float32 results (float64 for float64 `x`). The max gradient
    goes to the first position of the maximum; a plane holding NaN has max NaN and its
    gradient goes to the first NaN (`torch.max` semantics, every backend).

    Range: the sums run in float32 (float64 for float64 `x`), so float16 input near its
    largest value (65504) is fine; the results are finite while `H * W * max |x|` and
    `C * T * max |x|` stay below the accumulation dtype's largest value (float32: 3.4e38).
    """
    _check_video(x)
    backend = _fused_backend(x)
    if backend == "reference":
        return tfam_statistics_reference(x)
    frame_mean, frame_max, spatial, _ = TFAM_STATISTICS(backend, x.contiguous())
    return frame_mean, frame_max, spatial


def tfam_combine(x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor) -> torch.Tensor:
    """One pass: `x * (temporal_scale[b, t] + spatial_scale[b, h, w])`, in the dtype of `x`.

    `x` `(B, C, T, H, W)`, `temporal_scale` `(B, T)`, `spatial_scale` `(B, H, W)`; the
    scales are used in float32 (float64 for float64 `x`) and their gradients come back
    in that dtype. The product is rounded to `x`'s dtype, so it is inf where it exceeds
    that dtype's range (float16: 65504). TFAM's whole output is this op with
    `temporal_scale = lambda_t (1 + g)` and `spatial_scale = lambda_s (1 + A_s)`.
    """
    _check_video(x)
    batch, _, frames, height, width = x.shape
    check_float_tensor("temporal_scale", temporal_scale, dim=2)
    check_float_tensor("spatial_scale", spatial_scale, dim=3)
    if tuple(temporal_scale.shape) != (batch, frames):
        raise ValueError(
            f"temporal_scale must be (B, T) = {(batch, frames)} for x of shape {tuple(x.shape)}, "
            f"got {tuple(temporal_scale.shape)}"
        )
    if tuple(spatial_scale.shape) != (batch, height, width):
        raise ValueError(
            f"spatial_scale must be (B, H, W) = {(batch, height, width)} for x of shape {tuple(x.shape)}, "
            f"got {tuple(spatial_scale.shape)}"
        )
    check_same_device({"x": x, "temporal_scale": temporal_scale, "spatial_scale": spatial_scale})
    backend = _fused_backend(x)
    if backend == "reference":
        return tfam_combine_reference(x, temporal_scale, spatial_scale)
    acc = accumulation_dtype(x.dtype)
    return TFAM_COMBINE(backend, x.contiguous(), temporal_scale.to(acc).contiguous(), spatial_scale.to(acc).contiguous())


class TFAMStatistics(nn.Module):
    """`nn.Module` form of :func:`tfam_statistics` (no parameters)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tfam_statistics(x)


class TFAMCombine(nn.Module):
    """`nn.Module` form of :func:`tfam_combine` (no parameters)."""

    def forward(self, x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor) -> torch.Tensor:
        return tfam_combine(x, temporal_scale, spatial_scale)
