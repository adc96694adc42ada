"""Triton kernels for TFAM's two passes over `x` (SPEC §5) and their launchers.

`x` `(B, C, T, H, W)` is seen as `B * C * T` planes of `H * W` contiguous values. Every
pass is one launch:

- Reductions (statistics forward, combine backward): program `(b, g, j)` walks a chunk of
  `PLANES_PER_PROGRAM` planes of sample `b` over the `j`-th block of `BLOCK_HW`
  positions, keeps the running sum over its planes in registers, and writes per-(plane,
  block) partial statistics and one partial map per chunk (about `1 / PLANES_PER_PROGRAM`
  of `x`). The last program of sample `b` to finish (a ticket counter per sample) adds up
  that sample's partials in a fixed order and writes its results: no float atomics, so
  results are deterministic, and no finishing launch.
- Element-wise passes (statistics backward, combine forward) use 2-D tiles of `BLOCK_P`
  planes by `BLOCK_HW` positions (`TILE_SIZES` values). The statistics backward can also add
  the combine's own `dx` term, so TFAM's backward writes `dx` once (see `op.py`).

Each kernel is autotuned on its shape arguments (`triton_autotune`), one autotuned kernel
per `BLOCK_HW` tier: the reductions over their warps (their grid and workspaces follow the
tier), the element-wise passes over their tile size (`BLOCK_P` planes, the grid following).

Loads are upcast to float32 at once (the interpreter mishandles bf16 arithmetic); offsets
are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..launch_state import is_last_program, zeroed_tickets
from ..triton_autotune import autotune
from ..triton_variants import KernelVariant, autotuned_variants

PLANES_PER_PROGRAM = 16
TILE = 2048
# Larger maps loop over 1024-position blocks (a 2048 tier spills in the combine backward).
BLOCK_HW_TIERS = (64, 256, 1024)
# Warps the reduction kernels try per BLOCK_HW tier, the design choice first (at most 8
# positions per thread: 16 spill in the combine backward).
REDUCTION_WARPS = {64: (2, 1), 256: (2, 4), 1024: (4, 8)}
# Values per element-wise tile the element-wise kernels try (TILE first), at 8 warps.
TILE_SIZES = (TILE, 2 * TILE)
TILE_WARPS = 8
# A launch needs about 2 programs per SM of a 132-SM H100 to stream at full bandwidth.
GPU_PROGRAMS = 2 * 132
# Lanes of the finishing loops (planes, frames or positions of one sample at a time).
FINISH = 256
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def block_hw(positions: int) -> int:
    """The smallest tier holding `positions` (the largest tier loops over blocks)."""
    for tier in BLOCK_HW_TIERS:
        if positions <= tier:
            return tier
    return BLOCK_HW_TIERS[-1]


@triton.jit
def _lanes(start, end, FINISH: tl.constexpr):
    """Indices `start .. start + FINISH - 1` (int64) of a finishing loop and which are below `end`."""
    index = start + tl.arange(0, FINISH).to(tl.int64)
    return index, index < end


@triton.jit
def _finish_map(partial_ptr, out_ptr, sample, n_groups, positions, divisor, FINISH: tl.constexpr):
    """out[sample] = (sum over the sample's chunks of partial[sample, g]) / divisor, in chunk order."""
    for start in range(0, positions, FINISH):
        hw, inside = _lanes(start, positions, FINISH)
        acc = tl.zeros((FINISH,), dtype=tl.float32)
        for g in range(n_groups):
            acc += tl.load(
                partial_ptr + (sample * n_groups + g) * positions + hw, mask=inside, other=0.0, cache_modifier=".cg"
            )
        tl.store(out_ptr + sample * positions + hw, acc / divisor, mask=inside)


@triton.jit
def _reduction_program(n_groups, positions, BLOCK_HW: tl.constexpr):
    """Program `(sample * n_groups + group, block)` of a reduction pass: its index, block,
    sample and group, and its positions and which are inside the map."""
    pid = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    sample = pid // n_groups
    group = pid % n_groups
    hw = block * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return pid, block, sample, group, hw, hw < positions


@triton.jit
def _plane_tile(n_planes, planes_per_sample, positions, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The `[BLOCK_P, BLOCK_HW]` tile of an element-wise pass: its planes, its positions,
    which planes exist, its mask and the planes' samples."""
    plane = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    hw = tl.program_id(1).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    plane_ok = plane < n_planes
    mask = plane_ok[:, None] & (hw < positions)[None, :]
    return plane, hw, plane_ok, mask, plane // planes_per_sample


@triton.jit
def _statistics_kernel(
    x_ptr,
    mean_ptr,
    max_ptr,
    argmax_ptr,
    spatial_ptr,
    block_sum_ptr,
    block_max_ptr,
    block_arg_ptr,
    partial_ptr,
    tickets_ptr,
    planes_per_sample,
    positions,
    frames,
    n_groups,
    n_blocks,
    PLANES_PER_PROGRAM: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    FINISH: tl.constexpr,
):
    pid, block, sample, group, hw, inside = _reduction_program(n_groups, positions, BLOCK_HW)
    spatial = tl.zeros((BLOCK_HW,), dtype=tl.float32)
    first = group * PLANES_PER_PROGRAM
    for local in tl.range(first, tl.minimum(first + PLANES_PER_PROGRAM, planes_per_sample), num_stages=2):
        plane = sample * planes_per_sample + local
        v = tl.load(x_ptr + plane * positions + hw, mask=inside, other=0.0).to(tl.float32)
        spatial += v
        peak, where = tl.max(
            tl.where(inside, v, float("-inf")), axis=0, return_indices=True, return_indices_tie_break_left=True
        )
        # A NaN is the maximum, at its first position (torch.max semantics).
        is_nan = inside & (v != v)
        first_nan = tl.min(tl.where(is_nan, tl.arange(0, BLOCK_HW), BLOCK_HW), axis=0)
        peak = tl.where(first_nan < BLOCK_HW, float("nan"), peak)
        where = tl.where(first_nan < BLOCK_HW, first_nan, where)
        out = plane * n_blocks + block
        tl.store(block_sum_ptr + out, tl.sum(v, axis=0))
        tl.store(block_max_ptr + out, peak)
        tl.store(block_arg_ptr + out, (where + block * BLOCK_HW).to(tl.int32))
    tl.store(partial_ptr + pid * positions + hw, spatial, mask=inside)

    if is_last_program(tickets_ptr, sample, n_groups * n_blocks):
        # Mean, max and argmax of each plane of the sample from its per-block partials (names
        # apart from the loop's above: those of another type would not compile).
        for start in range(0, planes_per_sample, FINISH):
            lanes, ok = _lanes(start, planes_per_sample, FINISH)
            planes = sample * planes_per_sample + lanes
            total = tl.zeros((FINISH,), dtype=tl.float32)
            best = tl.full((FINISH,), float("-inf"), dtype=tl.float32)
            best_at = tl.zeros((FINISH,), dtype=tl.int32)
            for j in range(n_blocks):
                at = planes * n_blocks + j
                total += tl.load(block_sum_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
                block_peak = tl.load(block_max_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
                block_at = tl.load(block_arg_ptr + at, mask=ok, other=0, cache_modifier=".cg")
                # Blocks come in position order: only a larger value or a first NaN replaces the
                # best so far (torch.max's first maximum).
                better = (block_peak > best) | ((block_peak != block_peak) & (best == best))
                best = tl.where(better, block_peak, best)
                best_at = tl.where(better, block_at, best_at)
            tl.store(mean_ptr + planes, total / positions, mask=ok)
            tl.store(max_ptr + planes, best, mask=ok)
            tl.store(argmax_ptr + planes, best_at, mask=ok)
        _finish_map(partial_ptr, spatial_ptr, sample, n_groups, positions, frames, FINISH)
        tl.store(tickets_ptr + sample, 0)


@triton.jit
def _statistics_backward_kernel(
    grad_mean_ptr,
    grad_max_ptr,
    grad_spatial_ptr,
    argmax_ptr,
    grad_out_ptr,
    temporal_ptr,
    spatial_scale_ptr,
    grad_x_ptr,
    n_planes,
    planes_per_sample,
    frames,
    positions,
    inv_positions,
    inv_frames,
    BLOCK_P: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    COMBINE: tl.constexpr,
):
    """dx = dmean / HW + dspatial / T + dmax at the argmax, plus (COMBINE) the combine's
    own term dout * (temporal_scale + spatial_scale)."""
    inv_positions = tl.cast(inv_positions, tl.float32)
    inv_frames = tl.cast(inv_frames, tl.float32)
    plane, hw, plane_ok, mask, sample = _plane_tile(n_planes, planes_per_sample, positions, BLOCK_P, BLOCK_HW)
    grad_mean = tl.load(grad_mean_ptr + plane, mask=plane_ok, other=0.0).to(tl.float32)
    grad_max = tl.load(grad_max_ptr + plane, mask=plane_ok, other=0.0).to(tl.float32)
    argmax = tl.load(argmax_ptr + plane, mask=plane_ok, other=-1)
    map_offsets = sample[:, None] * positions + hw[None, :]
    grad_spatial = tl.load(grad_spatial_ptr + map_offsets, mask=mask, other=0.0).to(tl.float32)
    grad = grad_mean[:, None] * inv_positions + grad_spatial * inv_frames
    grad += tl.where(hw[None, :] == argmax[:, None], grad_max[:, None], 0.0)
    offsets = plane[:, None] * positions + hw[None, :]
    if COMBINE:
        temporal = tl.load(temporal_ptr + sample * frames + plane % frames, mask=plane_ok, other=0.0)
        spatial = tl.load(spatial_scale_ptr + map_offsets, mask=mask, other=0.0)
        grad_out = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad += grad_out * (temporal[:, None] + spatial)
    tl.store(grad_x_ptr + offsets, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    x_ptr,
    temporal_ptr,
    spatial_ptr,
    out_ptr,
    n_planes,
    planes_per_sample,
    frames,
    positions,
    BLOCK_P: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    plane, hw, plane_ok, mask, sample = _plane_tile(n_planes, planes_per_sample, positions, BLOCK_P, BLOCK_HW)
    frame = plane % frames
    temporal = tl.load(temporal_ptr + sample * frames + frame, mask=plane_ok, other=0.0).to(tl.float32)
    spatial = tl.load(spatial_ptr + sample[:, None] * positions + hw[None, :], mask=mask, other=0.0).to(tl.float32)
    offsets = plane[:, None] * positions + hw[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (x * (temporal[:, None] + spatial)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_frames(plane_sum_ptr, out_ptr, sample, channels, frames, n_blocks, FINISH: tl.constexpr):
    """out[sample, t] = sum over channels and blocks of the per-(plane, block) sums of frame t."""
    for start in range(0, frames, FINISH):
        frame, ok = _lanes(start, frames, FINISH)
        acc = tl.zeros((FINISH,), dtype=tl.float32)
        for c in range(channels):
            plane = (sample * channels + c) * frames + frame
            for j in range(n_blocks):
                acc += tl.load(plane_sum_ptr + plane * n_blocks + j, mask=ok, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + sample * frames + frame, acc, mask=ok)


@triton.jit
def _combine_backward_kernel(
    grad_ptr,
    x_ptr,
    temporal_ptr,
    spatial_ptr,
    grad_x_ptr,
    grad_temporal_ptr,
    grad_spatial_ptr,
    plane_sum_ptr,
    partial_ptr,
    tickets_ptr,
    channels,
    frames,
    positions,
    n_groups,
    n_blocks,
    PLANES_PER_PROGRAM: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    FINISH: tl.constexpr,
    WRITE_DX: tl.constexpr,
):
    """Reduces sum_{c,h,w} dout * x `(B, T)` and sum_{c,t} dout * x `(B, H, W)`; writes
    dx = dout * (temporal + spatial) only if WRITE_DX (else the statistics backward adds it)."""
    pid, block, sample, group, hw, inside = _reduction_program(n_groups, positions, BLOCK_HW)
    planes_per_sample = channels * frames
    if WRITE_DX:
        spatial = tl.load(spatial_ptr + sample * positions + hw, mask=inside, other=0.0).to(tl.float32)
    spatial_grad = tl.zeros((BLOCK_HW,), dtype=tl.float32)
    first = group * PLANES_PER_PROGRAM
    for local in tl.range(first, tl.minimum(first + PLANES_PER_PROGRAM, planes_per_sample), num_stages=2):
        plane = sample * planes_per_sample + local
        offsets = plane * positions + hw
        grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if WRITE_DX:
            temporal = tl.load(temporal_ptr + sample * frames + local % frames).to(tl.float32)
            tl.store(grad_x_ptr + offsets, (grad * (temporal + spatial)).to(grad_x_ptr.dtype.element_ty), mask=inside)
        product = grad * x
        spatial_grad += product
        tl.store(plane_sum_ptr + plane * n_blocks + block, tl.sum(product, axis=0))
    tl.store(partial_ptr + pid * positions + hw, spatial_grad, mask=inside)

    if is_last_program(tickets_ptr, sample, n_groups * n_blocks):
        _finish_frames(plane_sum_ptr, grad_temporal_ptr, sample, channels, frames, n_blocks, FINISH)
        _finish_map(partial_ptr, grad_spatial_ptr, sample, n_groups, positions, 1.0, FINISH)
        tl.store(tickets_ptr + sample, 0)


def _autotuned_per_tier(kernel, configs, key: list[str]) -> dict:
    """{BLOCK_HW tier: `kernel` autotuned over `configs(tier)` on `key`}."""
    return {tier: autotune(configs(tier), key=key)(kernel) for tier in BLOCK_HW_TIERS}


def _reduction_configs(tier: int) -> list:
    return [triton.Config({}, num_warps=warps) for warps in REDUCTION_WARPS[tier]]


def _tile_configs(tier: int) -> list:
    return [triton.Config({"BLOCK_P": size // tier}, num_warps=TILE_WARPS) for size in TILE_SIZES]


_statistics_kernels = _autotuned_per_tier(
    _statistics_kernel, _reduction_configs, ["planes_per_sample", "positions", "n_groups", "n_blocks"]
)
_combine_backward_kernels = _autotuned_per_tier(
    _combine_backward_kernel, _reduction_configs, ["channels", "frames", "positions", "n_groups", "n_blocks"]
)
_statistics_backward_kernels = _autotuned_per_tier(
    _statistics_backward_kernel, _tile_configs, ["n_planes", "planes_per_sample", "frames", "positions"]
)
_combine_kernels = _autotuned_per_tier(_combine_kernel, _tile_configs, ["n_planes", "planes_per_sample", "positions"])


def _reduction_plan(x: torch.Tensor) -> tuple[int, int, int, int, torch.Tensor]:
    """(n_groups, n_blocks, BLOCK_HW, positions, partial) of a reduction pass over `x`: the
    largest tier up to the map's own whose grid has GPU_PROGRAMS programs (narrower blocks
    when the clips and planes alone give too few), else the smallest tier; `partial` holds
    the pass's per-chunk maps `(B, n_groups, H * W)`."""
    batch, channels, frames, height, width = x.shape
    positions = height * width
    n_groups = triton.cdiv(channels * frames, PLANES_PER_PROGRAM)
    tiers = [tier for tier in BLOCK_HW_TIERS if tier <= block_hw(positions)]
    tier = next(
        (tier for tier in reversed(tiers) if batch * n_groups * triton.cdiv(positions, tier) >= GPU_PROGRAMS), tiers[0]
    )
    partial = x.new_empty((batch, n_groups, positions), dtype=torch.float32)
    return n_groups, triton.cdiv(positions, tier), tier, positions, partial


def _tile_grid(n_planes: int, positions: int):
    """(grid of a tile config's meta-parameters, BLOCK_HW tier) of an element-wise pass."""
    tier = block_hw(positions)
    return lambda meta: (triton.cdiv(n_planes, meta["BLOCK_P"]), triton.cdiv(positions, tier)), tier


def statistics_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, channels, frames, height, width = x.shape
    n_groups, n_blocks, tier, positions, partial = _reduction_plan(x)
    n_planes = batch * channels * frames
    frame_mean = x.new_empty((batch, channels, frames), dtype=torch.float32)
    frame_max = x.new_empty((batch, channels, frames), dtype=torch.float32)
    argmax = x.new_empty((batch, channels, frames), dtype=torch.int32)
    spatial = x.new_empty((batch, height, width), dtype=torch.float32)
    block_sum = x.new_empty((n_planes, n_blocks), dtype=torch.float32)
    block_max = x.new_empty((n_planes, n_blocks), dtype=torch.float32)
    block_arg = x.new_empty((n_planes, n_blocks), dtype=torch.int32)
    wrap_triton(_statistics_kernels[tier])[(batch * n_groups, n_blocks)](
        x,
        frame_mean,
        frame_max,
        argmax,
        spatial,
        block_sum,
        block_max,
        block_arg,
        partial,
        zeroed_tickets(x, batch),
        channels * frames,
        positions,
        frames,
        n_groups,
        n_blocks,
        PLANES_PER_PROGRAM=PLANES_PER_PROGRAM,
        BLOCK_HW=tier,
        FINISH=FINISH,
    )
    return frame_mean, frame_max, spatial, argmax


def statistics_backward(
    grad_mean: torch.Tensor,
    grad_max: torch.Tensor,
    grad_spatial: torch.Tensor,
    argmax: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    return statistics_backward_with_combine(grad_mean, grad_max, grad_spatial, argmax, x)


def statistics_backward_with_combine(
    grad_mean: torch.Tensor,
    grad_max: torch.Tensor,
    grad_spatial: torch.Tensor,
    argmax: torch.Tensor,
    x: torch.Tensor,
    grad_out: torch.Tensor | None = None,
    temporal_scale: torch.Tensor | None = None,
    spatial_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The statistics' `dx`, plus `grad_out * (temporal_scale + spatial_scale)` (the combine's
    `dx` of the same `x`) when `grad_out` is given: one write of `dx` for both passes."""
    batch, channels, frames, height, width = x.shape
    n_planes, positions = batch * channels * frames, height * width
    grad_x = torch.empty_like(x)
    grid, tier = _tile_grid(n_planes, positions)
    combine = grad_out is not None
    wrap_triton(_statistics_backward_kernels[tier])[grid](
        grad_mean,
        grad_max,
        grad_spatial,
        argmax,
        grad_out if combine else x,
        temporal_scale if combine else grad_mean,
        spatial_scale if combine else grad_spatial,
        grad_x,
        n_planes,
        channels * frames,
        frames,
        positions,
        1.0 / positions,
        1.0 / frames,
        BLOCK_HW=tier,
        COMBINE=combine,
    )
    return grad_x


def combine_forward(x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor) -> torch.Tensor:
    batch, channels, frames, height, width = x.shape
    n_planes, positions = batch * channels * frames, height * width
    out = torch.empty_like(x)
    grid, tier = _tile_grid(n_planes, positions)
    wrap_triton(_combine_kernels[tier])[grid](
        x,
        temporal_scale,
        spatial_scale,
        out,
        n_planes,
        channels * frames,
        frames,
        positions,
        BLOCK_HW=tier,
    )
    return out


def combine_backward(
    grad_out: torch.Tensor, x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _combine_backward(grad_out, x, temporal_scale, spatial_scale, write_dx=True)


def combine_scale_gradients(
    grad_out: torch.Tensor, x: torch.Tensor, temporal_scale: torch.Tensor, spatial_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combine backward without `dx`: the gradients of the two scales only."""
    _, grad_temporal, grad_spatial = _combine_backward(grad_out, x, temporal_scale, spatial_scale, write_dx=False)
    return grad_temporal, grad_spatial


def _combine_backward(grad_out, x, temporal_scale, spatial_scale, write_dx):
    batch, channels, frames, height, width = x.shape
    n_groups, n_blocks, tier, positions, partial = _reduction_plan(x)
    grad_x = torch.empty_like(x) if write_dx else x.new_empty((0,))
    grad_temporal = x.new_empty((batch, frames), dtype=torch.float32)
    grad_spatial = x.new_empty((batch, height, width), dtype=torch.float32)
    plane_sum = x.new_empty((batch * channels * frames, n_blocks), dtype=torch.float32)
    wrap_triton(_combine_backward_kernels[tier])[(batch * n_groups, n_blocks)](
        grad_out,
        x,
        temporal_scale,
        spatial_scale,
        grad_x,
        grad_temporal,
        grad_spatial,
        plane_sum,
        partial,
        zeroed_tickets(x, batch),
        channels,
        frames,
        positions,
        n_groups,
        n_blocks,
        PLANES_PER_PROGRAM=PLANES_PER_PROGRAM,
        BLOCK_HW=tier,
        FINISH=FINISH,
        WRITE_DX=write_dx,
    )
    return grad_x, grad_temporal, grad_spatial


# (B, C, T, H, W), as in benchmarks/bench_tfam.py: the benchmark shapes (reductions in
# 256- and 64-position blocks, element-wise tiles 1024 and 256), X3D's 7x7 stage (64), and a
# training batch at 28x28 (reductions in 1024-position blocks).
AOT_SHAPES = [(4, 24, 16, 28, 28), (4, 48, 16, 14, 14), (4, 96, 16, 7, 7), (80, 24, 16, 28, 28)]


def aot_variants() -> list[KernelVariant]:
    """The (kernel, dtype, BLOCK_HW tier, mode, autotuned config) variants the launchers pick
    at `AOT_SHAPES`."""
    variants = []
    for tier in BLOCK_HW_TIERS:
        reduction = {"PLANES_PER_PROGRAM": PLANES_PER_PROGRAM, "BLOCK_HW": tier, "FINISH": FINISH}
        for dtype in _DTYPES.values():
            ptr = f"*{dtype}"
            tags = f"[{dtype},BLOCK_HW={tier}"
            variants += autotuned_variants(
                f"tfam_statistics.forward{tags}]", _statistics_kernels[tier], reduction, {"x_ptr": ptr}
            )
            variants += autotuned_variants(
                f"tfam_combine.forward{tags}]", _combine_kernels[tier], {"BLOCK_HW": tier}, {"x_ptr": ptr}
            )
            for combine in (False, True):
                variants += autotuned_variants(
                    f"tfam_statistics.backward{tags}{',with_combine' if combine else ''}]",
                    _statistics_backward_kernels[tier],
                    {"BLOCK_HW": tier, "COMBINE": combine},
                    {"grad_x_ptr": ptr},
                )
            for write_dx in (True, False):
                variants += autotuned_variants(
                    f"tfam_combine.backward{tags}{'' if write_dx else ',scales_only'}]",
                    _combine_backward_kernels[tier],
                    {**reduction, "WRITE_DX": write_dx},
                    {"x_ptr": ptr},
                )
    return variants


def aot_launches(shapes=AOT_SHAPES) -> None:
    """Runs the launchers at `shapes` on uninitialized CPU tensors, every dtype and mode (for
    `triton_variants.capture_specializations`, which stops each launch)."""
    for shape in shapes:
        batch, _, frames, height, width = shape
        for dtype in _DTYPES:
            x = torch.empty(shape, dtype=dtype)
            frame_mean, frame_max, spatial, argmax = statistics_forward(x)
            temporal_scale = torch.empty((batch, frames))
            spatial_scale = torch.empty((batch, height, width))
            statistics_backward(frame_mean, frame_max, spatial, argmax, x)
            statistics_backward_with_combine(
                frame_mean, frame_max, spatial, argmax, x, torch.empty_like(x), temporal_scale, spatial_scale
            )
            combine_forward(x, temporal_scale, spatial_scale)
            combine_backward(torch.empty_like(x), x, temporal_scale, spatial_scale)
            combine_scale_gradients(torch.empty_like(x), x, temporal_scale, spatial_scale)
