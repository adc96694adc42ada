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

When the scales are computed from the statistics of the same `x` (TFAM), the two `dx`
terms can share one write: `tfam_statistics(x, link=True)` also returns a `TFAMLink`
that `tfam_combine(..., link=link)` takes. The combine backward then only reduces the
scale gradients (reads `dout` and `x`) and hands `dout` and the scales to the statistics
backward, which writes `dx = dout * (temporal + spatial) + dmean / HW + ds / T + dmax at
the argmax` in one pass (reads `dout`, writes `dx`). `dx` depends on the scale gradients
through TFAM's branches, so `dout` is read twice; `x` is read once and `dx` written once.
Linking applies to the triton backend in eager autograd; elsewhere the link is None and
the two ops run as above.

Statistics and scale gradients are float32 (float64 for float64 inputs); the combined
output and `dx` have the dtype of `x`. The fused backends take contiguous tensors (a
non-contiguous `x` is copied first). The max and its gradient follow `torch.max` on every
backend: ties go to the first position holding the maximum, and a NaN is the maximum (at
its first position).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad

from .. import backends
from .._checks import check_flag, check_float_tensor, check_same_device
from ..fused_op import FusedOp, accumulation_dtype, device_guard
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


def _statistics_grads(x, argmax, grad_mean, grad_max, grad_spatial, required=False):
    """The three statistics gradients, contiguous; an output nobody used gets a zero gradient
    of its (small) statistics shape. None when no output has a gradient, unless `required`."""
    small = [(grad_mean, argmax.shape), (grad_max, argmax.shape), (grad_spatial, (x.shape[0], *x.shape[3:]))]
    if all(grad is None for grad, _ in small) and not required:
        return None
    acc = accumulation_dtype(x.dtype)
    return [(grad if grad is not None else x.new_zeros(shape, dtype=acc)).contiguous() for grad, shape in small]


def _statistics_backward(ctx, backward_op, grad_mean, grad_max, grad_spatial, _grad_argmax):
    x, argmax = ctx.saved_tensors
    grads = _statistics_grads(x, argmax, grad_mean, grad_max, grad_spatial)
    return None if grads is None else backward_op(*grads, argmax, x)


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
    "tfam_statistics",
    _fake_statistics,
    _fake_statistics_backward,
    _statistics_setup,
    _statistics_backward,
    _triton_statistics,
)
TFAM_COMBINE = FusedOp(
    "tfam_combine", _fake_combine, _fake_combine_backward, _combine_setup, _combine_backward, _triton_combine
)
TFAM_STATISTICS.register()
TFAM_COMBINE.register()


class TFAMLink:
    """Ties one `tfam_statistics(x, link=True)` call to the one `tfam_combine` of the same
    `x`, so their backward writes `dx` once (see the module doc). Opaque to callers."""

    __slots__ = ("x", "tensor", "pending", "used")

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.tensor = None  # the statistics node's extra output, an input of the combine node
        self.pending = None  # (graph task, dout, temporal_scale, spatial_scale) from the combine backward
        self.used = False


class _LinkedStatistics(torch.autograd.Function):
    """tfam_statistics_triton whose backward also adds the linked combine's `dx` term."""

    @staticmethod
    def forward(ctx, x, link):
        with device_guard([x]), torch._C._AutoDispatchBelowAutograd():
            frame_mean, frame_max, spatial, argmax = torch.ops.piumr_kernels.tfam_statistics_triton(x)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, argmax)
        ctx.mark_non_differentiable(argmax)
        ctx.link = link
        # Empty: it carries no values, only the graph edge from the combine node to this one,
        # so this backward runs whenever the combine hands it its dx term.
        return frame_mean, frame_max, spatial, x.new_empty((0,))

    @staticmethod
    def backward(ctx, grad_mean, grad_max, grad_spatial, _grad_link):
        from . import triton_kernels

        x, argmax = ctx.saved_tensors
        pending, ctx.link.pending = ctx.link.pending, None
        # A combine gradient left by another backward call (one that did not reach x) is not ours.
        combine = pending[1:] if pending is not None and pending[0] == torch._C._current_graph_task_id() else ()
        grads = _statistics_grads(x, argmax, grad_mean, grad_max, grad_spatial, required=bool(combine))
        if grads is None:
            return None, None
        with device_guard([x]):
            return triton_kernels.statistics_backward_with_combine(*grads, argmax, x, *combine), None


class _LinkedCombine(torch.autograd.Function):
    """tfam_combine_triton whose backward leaves the `dx` term to the linked statistics node."""

    @staticmethod
    def forward(ctx, x, temporal_scale, spatial_scale, link_tensor, link):
        with device_guard([x]), torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.piumr_kernels.tfam_combine_triton(x, temporal_scale, spatial_scale)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, temporal_scale, spatial_scale)
        ctx.link = link
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from . import triton_kernels

        if grad_out is None:
            return None, None, None, None, None
        x, temporal_scale, spatial_scale = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_temporal = grad_spatial = grad_link = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            with device_guard([x]):
                grad_temporal, grad_spatial = triton_kernels.combine_scale_gradients(
                    grad_out, x, temporal_scale, spatial_scale
                )
        if ctx.needs_input_grad[0]:
            ctx.link.pending = (torch._C._current_graph_task_id(), grad_out, temporal_scale, spatial_scale)
            grad_link = grad_out.new_empty((0,))
        return None, grad_temporal, grad_spatial, grad_link, None


def _check_video(x: torch.Tensor) -> None:
    check_float_tensor("x", x, dim=5)
    if any(size < 1 for size in x.shape[1:]):
        raise ValueError(f"x must be (B, C, T, H, W) with C, T, H, W >= 1, got shape {tuple(x.shape)}")


def _fused_backend(x: torch.Tensor) -> str:
    backend = backends.resolve_backend(x, cpp_op="tfam_statistics_cpp")
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError("x: the triton backend supports float16, bfloat16 and float32, got float64")
    return backend


def tfam_statistics(x: torch.Tensor, *, link: bool = False):
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

    `link=True` returns a fourth value for `tfam_combine(x, ..., link=...)` of the same `x`
    when the scales come from these statistics: a `TFAMLink` that lets the backward write
    `dx` once (triton backend, eager, `x` requiring a gradient), else None.
    """
    _check_video(x)
    check_flag("link", link)
    backend = _fused_backend(x)
    linked = (
        link
        and backend == "triton"
        and torch.is_grad_enabled()
        and x.requires_grad
        and not torch.compiler.is_compiling()
        and forward_ad._current_level < 0
    )
    if linked:
        tied = TFAMLink(x)
        frame_mean, frame_max, spatial, tied.tensor = _LinkedStatistics.apply(x.contiguous(), tied)
        return frame_mean, frame_max, spatial, tied
    if backend == "reference":
        statistics = tfam_statistics_reference(x)
    else:
        statistics = TFAM_STATISTICS(backend, x.contiguous())[:3]
    return (*statistics, None) if link else tuple(statistics)


def tfam_combine(
    x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor, *, link: TFAMLink | None = None
) -> torch.Tensor:
    """One pass: `x * (temporal_scale[b, t] + spatial_scale[b, h, w])`, in the dtype of `x`.

    `x` `(B, C, T, H, W)`, `temporal_scale` `(B, T)`, `spatial_scale` `(B, H, W)`; the
    scales are used in float32 (float64 for float64 `x`) and their gradients come back
    in that dtype. The product is rounded to `x`'s dtype, so it is inf where it exceeds
    that dtype's range (float16: 65504). TFAM's whole output is this op with
    `temporal_scale = lambda_t (1 + g)` and `spatial_scale = lambda_s (1 + A_s)`.

    `link`: the fourth value of `tfam_statistics(x, link=True)` for this same `x` (or None);
    each link serves one call.
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
    inputs = (x.contiguous(), temporal_scale.to(acc).contiguous(), spatial_scale.to(acc).contiguous())
    if link is not None:
        if not isinstance(link, TFAMLink):
            raise TypeError(
                f"link must be None or the TFAMLink from tfam_statistics(x, link=True), got {type(link).__name__}"
            )
        if link.x is not x:
            raise ValueError("link: it belongs to tfam_statistics of another tensor than this x")
        if link.used:
            raise ValueError("link: it was already passed to a tfam_combine call; each link serves one")
        link.used = True
        if backend == "triton" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _LinkedCombine.apply(*inputs, link.tensor, link)
    return TFAM_COMBINE(backend, *inputs)


class TFAMStatistics(nn.Module):
    """`nn.Module` form of :func:`tfam_statistics` (no parameters)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tfam_statistics(x)


class TFAMCombine(nn.Module):
    """`nn.Module` form of :func:`tfam_combine` (no parameters)."""

    def forward(self, x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor) -> torch.Tensor:
        return tfam_combine(x, temporal_scale, spatial_scale)
