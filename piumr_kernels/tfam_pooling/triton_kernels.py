"""Triton kernels for TFAM's two passes over `x` (SPEC §5) and their launchers.

`x` `(B, C, T, H, W)` is seen as `B * C * T` planes of `H * W` contiguous values.

- Reductions (statistics forward, combine backward): program `(b, g, j)` walks a chunk of
  `PLANES_PER_PROGRAM` planes of sample `b` over the `j`-th block of `BLOCK_HW`
  positions, keeps the running sum over its planes in registers, and writes per-(plane,
  block) partial statistics and one partial map per chunk. No atomics, so results are
  deterministic; the launcher finishes the small partials with torch ops (their size is
  about `1 / PLANES_PER_PROGRAM` of `x`).
- Element-wise passes (statistics backward, combine forward) use 2-D tiles of
  `TILE // BLOCK_HW` planes by `BLOCK_HW` positions.

Loads are upcast to float32 at once (the interpreter mishandles bf16 arithmetic); offsets
are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..triton_variants import KernelVariant

PLANES_PER_PROGRAM = 16
TILE = 2048
# Larger maps loop over 1024-position blocks (a 2048 tier spills in the combine backward).
BLOCK_HW_TIERS = (64, 256, 1024)
# Warps of the reduction kernels per BLOCK_HW tier (at most 8 positions per thread); the
# element-wise tiles always hold TILE values.
REDUCTION_WARPS = {64: 2, 256: 2, 1024: 4}
TILE_WARPS = 8
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def block_hw(positions: int) -> int:
    """The smallest tier holding `positions` (the largest tier loops over blocks)."""
    for tier in BLOCK_HW_TIERS:
        if positions <= tier:
            return tier
    return BLOCK_HW_TIERS[-1]


@triton.jit
def _statistics_kernel(
    x_ptr, sum_ptr, max_ptr, argmax_ptr, partial_ptr,
    planes_per_sample, positions, n_groups, n_blocks,
    PLANES_PER_PROGRAM: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    sample = pid // n_groups
    group = pid % n_groups
    hw = block * BLOCK_HW + tl.arange(0, BLOCK_HW)
    inside = hw < positions
    spatial = tl.zeros((BLOCK_HW,), dtype=tl.float32)
    first = group * PLANES_PER_PROGRAM
    for i in range(PLANES_PER_PROGRAM):
        local = first + i
        if local < planes_per_sample:
            plane = sample * planes_per_sample + local
            v = tl.load(x_ptr + plane * positions + hw, mask=inside, other=0.0).to(tl.float32)
            spatial += v
            peak, where = tl.max(tl.where(inside, v, float("-inf")), axis=0, return_indices=True,
                                 return_indices_tie_break_left=True)
            # A NaN is the maximum, at its first position (torch.max semantics).
            is_nan = inside & (v != v)
            first_nan = tl.min(tl.where(is_nan, tl.arange(0, BLOCK_HW), BLOCK_HW), axis=0)
            peak = tl.where(first_nan < BLOCK_HW, float("nan"), peak)
            where = tl.where(first_nan < BLOCK_HW, first_nan, where)
            out = plane * n_blocks + block
            tl.store(sum_ptr + out, tl.sum(v, axis=0))
            tl.store(max_ptr + out, peak)
            tl.store(argmax_ptr + out, (where + block * BLOCK_HW).to(tl.int32))
    tl.store(partial_ptr + pid * positions + hw, spatial, mask=inside)


@triton.jit
def _statistics_backward_kernel(
    grad_mean_ptr, grad_max_ptr, grad_spatial_ptr, argmax_ptr, grad_x_ptr,
    n_planes, planes_per_sample, positions, inv_positions, inv_frames,
    BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    inv_positions = tl.cast(inv_positions, tl.float32)
    inv_frames = tl.cast(inv_frames, tl.float32)
    plane = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    hw = tl.program_id(1).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    plane_ok = plane < n_planes
    mask = plane_ok[:, None] & (hw < positions)[None, :]
    sample = plane // planes_per_sample
    grad_mean = tl.load(grad_mean_ptr + plane, mask=plane_ok, other=0.0).to(tl.float32)
    grad_max = tl.load(grad_max_ptr + plane, mask=plane_ok, other=0.0).to(tl.float32)
    argmax = tl.load(argmax_ptr + plane, mask=plane_ok, other=-1)
    grad_spatial = tl.load(grad_spatial_ptr + sample[:, None] * positions + hw[None, :], mask=mask,
                           other=0.0).to(tl.float32)
    grad = grad_mean[:, None] * inv_positions + grad_spatial * inv_frames
    grad += tl.where(hw[None, :] == argmax[:, None], grad_max[:, None], 0.0)
    offsets = plane[:, None] * positions + hw[None, :]
    tl.store(grad_x_ptr + offsets, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    x_ptr, temporal_ptr, spatial_ptr, out_ptr,
    n_planes, planes_per_sample, frames, positions,
    BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    hw = tl.program_id(1).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    plane_ok = plane < n_planes
    mask = plane_ok[:, None] & (hw < positions)[None, :]
    sample = plane // planes_per_sample
    frame = plane % frames
    temporal = tl.load(temporal_ptr + sample * frames + frame, mask=plane_ok, other=0.0).to(tl.float32)
    spatial = tl.load(spatial_ptr + sample[:, None] * positions + hw[None, :], mask=mask, other=0.0).to(tl.float32)
    offsets = plane[:, None] * positions + hw[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (x * (temporal[:, None] + spatial)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_backward_kernel(
    grad_ptr, x_ptr, temporal_ptr, spatial_ptr, grad_x_ptr, plane_sum_ptr, partial_ptr,
    planes_per_sample, frames, positions, n_groups, n_blocks,
    PLANES_PER_PROGRAM: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    sample = pid // n_groups
    group = pid % n_groups
    hw = block * BLOCK_HW + tl.arange(0, BLOCK_HW)
    inside = hw < positions
    spatial = tl.load(spatial_ptr + sample * positions + hw, mask=inside, other=0.0).to(tl.float32)
    spatial_grad = tl.zeros((BLOCK_HW,), dtype=tl.float32)
    first = group * PLANES_PER_PROGRAM
    for i in range(PLANES_PER_PROGRAM):
        local = first + i
        if local < planes_per_sample:
            plane = sample * planes_per_sample + local
            temporal = tl.load(temporal_ptr + sample * frames + local % frames).to(tl.float32)
            offsets = plane * positions + hw
            grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            tl.store(grad_x_ptr + offsets, (grad * (temporal + spatial)).to(grad_x_ptr.dtype.element_ty),
                     mask=inside)
            product = grad * x
            spatial_grad += product
            tl.store(plane_sum_ptr + plane * n_blocks + block, tl.sum(product, axis=0))
    tl.store(partial_ptr + pid * positions + hw, spatial_grad, mask=inside)


def _reduction_grid(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(n_groups, n_blocks, BLOCK_HW, positions) of a reduction pass over `x`."""
    batch, channels, frames, height, width = x.shape
    positions = height * width
    tier = block_hw(positions)
    return triton.cdiv(channels * frames, PLANES_PER_PROGRAM), triton.cdiv(positions, tier), tier, positions


def _tile_grid(n_planes: int, positions: int) -> tuple[tuple[int, int], int, int]:
    tier = block_hw(positions)
    planes_per_tile = TILE // tier
    return (triton.cdiv(n_planes, planes_per_tile), triton.cdiv(positions, tier)), planes_per_tile, tier


def statistics_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, channels, frames, height, width = x.shape
    n_groups, n_blocks, tier, positions = _reduction_grid(x)
    n_planes = batch * channels * frames
    plane_sum = x.new_empty((n_planes, n_blocks), dtype=torch.float32)
    plane_max = x.new_empty((n_planes, n_blocks), dtype=torch.float32)
    plane_arg = x.new_empty((n_planes, n_blocks), dtype=torch.int32)
    partial = x.new_empty((batch, n_groups, positions), dtype=torch.float32)
    wrap_triton(_statistics_kernel)[(batch * n_groups, n_blocks)](
        x, plane_sum, plane_max, plane_arg, partial,
        channels * frames, positions, n_groups, n_blocks,
        PLANES_PER_PROGRAM=PLANES_PER_PROGRAM, BLOCK_HW=tier, num_warps=REDUCTION_WARPS[tier],
    )
    frame_mean = (plane_sum.sum(dim=1) / positions).view(batch, channels, frames)
    frame_max = plane_max.amax(dim=1)
    # First block holding the maximum, then its in-block first index: torch.max tie order.
    holds_max = (plane_max == frame_max[:, None]) | (plane_max.isnan() & frame_max.isnan()[:, None])
    first_block = holds_max.int().argmax(dim=1, keepdim=True)
    argmax = plane_arg.gather(1, first_block).view(batch, channels, frames)
    spatial = (partial.sum(dim=1) / frames).view(batch, height, width)
    return frame_mean, frame_max.view(batch, channels, frames), spatial, argmax


def statistics_backward(
    grad_mean: torch.Tensor, grad_max: torch.Tensor, grad_spatial: torch.Tensor, argmax: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    batch, channels, frames, height, width = x.shape
    n_planes, positions = batch * channels * frames, height * width
    grad_x = torch.empty_like(x)
    grid, planes_per_tile, tier = _tile_grid(n_planes, positions)
    wrap_triton(_statistics_backward_kernel)[grid](
        grad_mean, grad_max, grad_spatial, argmax, grad_x,
        n_planes, channels * frames, positions, 1.0 / positions, 1.0 / frames,
        BLOCK_P=planes_per_tile, BLOCK_HW=tier, num_warps=TILE_WARPS,
    )
    return grad_x


def combine_forward(x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor) -> torch.Tensor:
    batch, channels, frames, height, width = x.shape
    n_planes, positions = batch * channels * frames, height * width
    out = torch.empty_like(x)
    grid, planes_per_tile, tier = _tile_grid(n_planes, positions)
    wrap_triton(_combine_kernel)[grid](
        x, temporal_scale, spatial_scale, out, n_planes, channels * frames, frames, positions,
        BLOCK_P=planes_per_tile, BLOCK_HW=tier, num_warps=TILE_WARPS,
    )
    return out


def combine_backward(
    grad_out: torch.Tensor, x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, channels, frames, height, width = x.shape
    n_groups, n_blocks, tier, positions = _reduction_grid(x)
    grad_x = torch.empty_like(x)
    plane_sum = x.new_empty((batch * channels * frames, n_blocks), dtype=torch.float32)
    partial = x.new_empty((batch, n_groups, positions), dtype=torch.float32)
    wrap_triton(_combine_backward_kernel)[(batch * n_groups, n_blocks)](
        grad_out, x, temporal_scale, spatial_scale, grad_x, plane_sum, partial,
        channels * frames, frames, positions, n_groups, n_blocks,
        PLANES_PER_PROGRAM=PLANES_PER_PROGRAM, BLOCK_HW=tier, num_warps=REDUCTION_WARPS[tier],
    )
    grad_temporal = plane_sum.sum(dim=1).view(batch, channels, frames).sum(dim=1)
    grad_spatial = partial.sum(dim=1).view(batch, height, width)
    return grad_x, grad_temporal, grad_spatial


# (B, C, T, H, W), as in benchmarks/bench_tfam.py: the benchmark shapes (BLOCK_HW 1024 and
# 256), then X3D's 7x7 stage (BLOCK_HW 64).
AOT_SHAPES = [(4, 24, 16, 28, 28), (4, 48, 16, 14, 14), (4, 96, 16, 7, 7)]


def aot_variants() -> list[KernelVariant]:
    """The (kernel, dtype, BLOCK_HW tier) variants the launchers pick at `AOT_SHAPES`."""
    variants = []
    for *_, height, width in AOT_SHAPES:
        tier = block_hw(height * width)
        reduction = {"PLANES_PER_PROGRAM": PLANES_PER_PROGRAM, "BLOCK_HW": tier}
        tile = {"BLOCK_P": TILE // tier, "BLOCK_HW": tier}
        for dtype in _DTYPES.values():
            ptr = f"*{dtype}"
            tags = f"[{dtype},BLOCK_HW={tier}]"
            variants += [
                KernelVariant(f"tfam_statistics.forward{tags}", _statistics_kernel, reduction,
                              REDUCTION_WARPS[tier], pointer_types={"x_ptr": ptr}),
                KernelVariant(f"tfam_statistics.backward{tags}", _statistics_backward_kernel, tile, TILE_WARPS,
                              pointer_types={"grad_x_ptr": ptr}),
                KernelVariant(f"tfam_combine.forward{tags}", _combine_kernel, tile, TILE_WARPS,
                              pointer_types={"x_ptr": ptr}),
                KernelVariant(f"tfam_combine.backward{tags}", _combine_backward_kernel, reduction,
                              REDUCTION_WARPS[tier], pointer_types={"x_ptr": ptr}),
            ]
    return variants


def aot_launches(shapes=AOT_SHAPES) -> None:
    """Runs the four launchers at `shapes` on uninitialized CPU tensors, every dtype (for
    `triton_variants.capture_specializations`, which stops each launch)."""
    for shape in shapes:
        batch, _, frames, height, width = shape
        for dtype in _DTYPES:
            x = torch.empty(shape, dtype=dtype)
            frame_mean, frame_max, spatial, argmax = statistics_forward(x)
            statistics_backward(frame_mean, frame_max, spatial, argmax, x)
            temporal_scale = torch.empty((batch, frames))
            spatial_scale = torch.empty((batch, height, width))
            combine_forward(x, temporal_scale, spatial_scale)
            combine_backward(torch.empty_like(x), x, temporal_scale, spatial_scale)
