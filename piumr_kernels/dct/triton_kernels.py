"""Triton kernels for the DCT filter bank (SPEC §2) and their launchers (triton_op in op.py).

Two launches forward, two backward (each needs the whole previous result):
  1. `_reduce_kernel`, grid (B, pixel tiles, plane splits S): the one read of x, a block of
     planes times pixels per iteration, into s[b] = (1/T) sum_{c,t} x[b, c, t]. With S > 1
     each split writes its float32 partial to a (B, S, H, W) workspace and the last split to
     finish a (b, tile) adds the S partials in split order (deterministic, no float atomics).
  2. `_filter_stats_kernel`, grid (B, D): E_d = D_d cross-correlated with s, tile by tile
     (the separable filter applied on the fly: k taps along H for each of k along W), written
     once, with the tile moments about E_d[0, 0] Chan-merged into the per-(b, d) mean and
     variance.
Backward: `_grad_kernel` forms G_d = dE_d + dmean_d / HW + dvar_d * 2 (E_d - mean_d) / HW
(E_d rebuilt from s the same way); `_adjoint_kernel`, grid (B, pixel tiles, filter splits),
applies the adjoint sum_d D_d (convolved with) G_d and writes the (B, H, W) map g / T, split
over the filters like the reduction over planes when B * tiles alone would not fill the GPU.
Each kernel is autotuned on its shape arguments (`triton_autotune`; configs below).
Loads are upcast to float32 at once; offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..launch_state import is_last_program, kept_between_calls, zeroed_tickets
from ..triton_autotune import autotune
from ..triton_variants import KernelVariant, autotuned_variants
from .reference import dct_basis_1d, select_filters

# Pixels per program of the adjoint (its grid and its split workspace follow them).
ADJOINT_BLOCK = 256
# The reduction loads a (planes, pixels) block of this many elements per iteration.
REDUCE_ELEMENTS = 2048
# Splitting the C*T planes: a launch needs about 2 programs per SM of a 132-SM H100 to stream
# x at full bandwidth, so S = ceil(264 / (B * pixel tiles)), but each split keeps at least 16
# planes (S <= C*T // 16) so the float32 partials cost at most 1/16 of x's elements; a launch
# with fewer planes than that has no more parallelism to give. The adjoint splits its filters
# by the same rule, at least 4 filters per split.
GPU_PROGRAMS = 2 * 132
MIN_PLANES_PER_SPLIT = 16
MIN_FILTERS_PER_SPLIT = 4
# Autotuned configs (triton_autotune; the first is the design configuration). The reduction
# and the adjoint keep their tiles (the grid, the split workspace and the tickets depend on
# them) and tune their warps; the filter and gradient passes also tune their pixel block
# (the gradient's grid follows it).
WARP_CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]
BLOCK_CONFIGS = [triton.Config({"BLOCK": 256}, num_warps=4), triton.Config({"BLOCK": 512}, num_warps=8)]
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _finish_split_sum(partials_ptr, out_ptr, item, n_splits, n_pixels, pixels, inside, tickets_ptr, ticket):
    """In the last of the n_splits programs of (item, tile): out[item] = the sum of the item's
    partials over the splits, in split order; resets the ticket."""
    if is_last_program(tickets_ptr, ticket, n_splits):
        acc = tl.zeros(pixels.shape, dtype=tl.float32)
        for k in range(n_splits):
            acc += tl.load(
                partials_ptr + (item * n_splits + k) * n_pixels + pixels, mask=inside, other=0.0, cache_modifier=".cg"
            )
        tl.store(out_ptr + item * n_pixels + pixels, acc.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(tickets_ptr + ticket, 0)


@autotune(WARP_CONFIGS, key=["channels", "frames", "n_pixels", "planes_per_split"])
@triton.jit
def _reduce_kernel(
    x_ptr,
    s_ptr,
    partials_ptr,
    tickets_ptr,
    channels,
    frames,
    n_pixels,
    width,
    stride_b,
    stride_c,
    stride_t,
    stride_h,
    stride_w,
    planes_per_split,
    PLANES: tl.constexpr,
    PIXELS: tl.constexpr,
    FLAT_PIXELS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """s[b] = (1/T) sum of x[b, c, t] over all planes p = c * T + t (through per-split partials if SPLIT)."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    pixels = tl.program_id(1).to(tl.int64) * PIXELS + tl.arange(0, PIXELS)
    inside = pixels < n_pixels
    # A plane whose pixels are consecutive in memory is indexed without // and %, and
    # n_pixels comes as an argument (the JIT marks it when a multiple of 16), so the compiler
    # sees contiguous, evenly masked rows and vectorizes the loads.
    if FLAT_PIXELS:
        pixel_offsets = pixels
    else:
        pixel_offsets = (pixels // width) * stride_h + (pixels % width) * stride_w
    first = split * planes_per_split
    end = tl.minimum(first + planes_per_split, channels * frames)
    acc = tl.zeros((PLANES, PIXELS), dtype=tl.float32)
    for start in tl.range(first, end, PLANES, num_stages=3):
        planes = start + tl.arange(0, PLANES)
        plane_offsets = (planes // frames).to(tl.int64) * stride_c + (planes % frames).to(tl.int64) * stride_t
        offsets = b * stride_b + plane_offsets[:, None] + pixel_offsets[None, :]
        loaded = (planes < end)[:, None] & inside[None, :]
        acc += tl.load(x_ptr + offsets, mask=loaded, other=0.0).to(tl.float32)
    partial = tl.sum(acc, axis=0) / frames
    if SPLIT:
        tl.store(partials_ptr + (b * n_splits + split) * n_pixels + pixels, partial, mask=inside)
        _finish_split_sum(
            partials_ptr,
            s_ptr,
            b,
            n_splits,
            n_pixels,
            pixels,
            inside,
            tickets_ptr,
            b * tl.num_programs(1) + tl.program_id(1),
        )
    else:
        tl.store(s_ptr + b * n_pixels + pixels, partial, mask=inside)


@triton.jit
def _filter_tile(s_ptr, basis_ptr, pixels, inside, width, height, u, v, K, K_PAD: tl.constexpr):
    """E = sum_j a_v[j] sum_i a_u[i] s[h + i - k//2, w + j - k//2] for the pixels of one tile
    (zero outside the map; s points at the sample's map): per j, one (K_PAD, pixels) block of
    the k rows around each pixel, reduced against a_u."""
    pad = K // 2
    taps = tl.arange(0, K_PAD)
    a_u = tl.load(basis_ptr + u * K + taps, mask=taps < K, other=0.0)
    rows = (pixels // width)[None, :] + (taps[:, None] - pad)
    rows_ok = inside[None, :] & (taps[:, None] < K) & (rows >= 0) & (rows < height)
    w = pixels % width
    acc = tl.zeros(pixels.shape, dtype=tl.float32)
    for j in range(K):
        shift_w = j - pad
        ok = rows_ok & ((w + shift_w >= 0) & (w + shift_w < width))[None, :]
        block = tl.load(s_ptr + pixels[None, :] + (taps[:, None] - pad) * width + shift_w, mask=ok, other=0.0)
        acc += tl.load(basis_ptr + v * K + j) * tl.sum(a_u[:, None] * block, axis=0)
    return acc


@autotune(BLOCK_CONFIGS, key=["n_filters", "height", "width", "K"])
@triton.jit
def _filter_stats_kernel(
    s_ptr,
    basis_ptr,
    freq_ptr,
    E_ptr,
    mean_ptr,
    var_ptr,
    n_filters,
    height,
    width,
    K,
    BLOCK: tl.constexpr,
    K_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    d = tl.load(freq_ptr + n).to(tl.int64)
    u = d % K
    v = d // K
    n_pixels = height * width
    s_map = s_ptr + b * n_pixels
    E_plane = E_ptr + (b * n_filters + n) * n_pixels
    # Moments of E - shift with shift = E[0, 0] (the "shifted data" method: a mean far
    # from zero costs no precision), two passes per tile, merged across tiles (Chan et al.).
    first = tl.arange(0, BLOCK).to(tl.int64)
    e = _filter_tile(s_map, basis_ptr, first, first < 1, width, height, u, v, K, K_PAD)
    shift = tl.sum(tl.where(first == 0, e, 0.0), axis=0)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    for start in range(0, n_pixels, BLOCK):
        pixels = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = pixels < n_pixels
        e = _filter_tile(s_map, basis_ptr, pixels, inside, width, height, u, v, K, K_PAD)
        tl.store(E_plane + pixels, e.to(E_ptr.dtype.element_ty), mask=inside)
        e -= shift
        count = tl.minimum(n_pixels - start, BLOCK).to(tl.float32)
        tile_mean = tl.sum(tl.where(inside, e, 0.0), axis=0) / count
        centred = tl.where(inside, e - tile_mean, 0.0)
        tile_m2 = tl.sum(centred * centred, axis=0)
        seen = start * 1.0
        total = seen + count
        delta = tile_mean - mean
        mean += delta * (count / total)
        m2 += tile_m2 + delta * delta * (seen * count / total)
    tl.store(mean_ptr + b * n_filters + n, shift + mean)
    tl.store(var_ptr + b * n_filters + n, m2 / n_pixels)


@autotune(BLOCK_CONFIGS, key=["n_filters", "height", "width", "K"])
@triton.jit
def _grad_kernel(
    grad_E_ptr,
    grad_mean_ptr,
    grad_var_ptr,
    mean_ptr,
    s_ptr,
    basis_ptr,
    freq_ptr,
    G_ptr,
    n_filters,
    height,
    width,
    K,
    BLOCK: tl.constexpr,
    K_PAD: tl.constexpr,
):
    """G_d = dE_d + dmean_d / HW + dvar_d * 2 (E_d - mean_d) / HW, with E_d rebuilt from s."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_pixels = height * width
    inside = pixels < n_pixels
    d = tl.load(freq_ptr + n).to(tl.int64)
    item = b * n_filters + n
    from_mean = tl.load(grad_mean_ptr + item) / n_pixels
    from_var = 2.0 * tl.load(grad_var_ptr + item) / n_pixels
    mean = tl.load(mean_ptr + item)
    e = _filter_tile(s_ptr + b * n_pixels, basis_ptr, pixels, inside, width, height, d % K, d // K, K, K_PAD)
    g = tl.load(grad_E_ptr + item * n_pixels + pixels, mask=inside, other=0.0).to(tl.float32)
    g += from_mean + from_var * (e - mean)
    tl.store(G_ptr + item * n_pixels + pixels, g, mask=inside)


@autotune(WARP_CONFIGS, key=["n_filters", "height", "width", "K", "filters_per_split"])
@triton.jit
def _adjoint_kernel(
    G_ptr,
    basis_ptr,
    freq_ptr,
    out_ptr,
    partials_ptr,
    tickets_ptr,
    n_filters,
    height,
    width,
    K,
    frames,
    filters_per_split,
    BLOCK: tl.constexpr,
    K_PAD: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """out[b, y, x] = (1/T) sum_n sum_{i,j} a_{u_n}[i] a_{v_n}[j] G_n[y - i + k//2, x - j + k//2],
    over the filters of this split (through per-split partials if SPLIT)."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    pixels = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_pixels = height * width
    inside = pixels < n_pixels
    y = pixels // width
    x = pixels % width
    pad = K // 2
    taps = tl.arange(0, K_PAD)
    rows = y[None, :] + (pad - taps[:, None])
    rows_ok = inside[None, :] & (taps[:, None] < K) & (rows >= 0) & (rows < height)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    first = split * filters_per_split
    for n in range(first, tl.minimum(first + filters_per_split, n_filters)):
        d = tl.load(freq_ptr + n).to(tl.int64)
        a_u = tl.load(basis_ptr + (d % K) * K + taps, mask=taps < K, other=0.0)
        G_plane = G_ptr + (b * n_filters + n) * n_pixels
        for j in range(K):
            shift_w = pad - j
            ok = rows_ok & ((x + shift_w >= 0) & (x + shift_w < width))[None, :]
            block = tl.load(G_plane + pixels[None, :] + (pad - taps[:, None]) * width + shift_w, mask=ok, other=0.0)
            acc += tl.load(basis_ptr + (d // K) * K + j) * tl.sum(a_u[:, None] * block, axis=0)
    acc = acc / frames
    if SPLIT:
        tl.store(partials_ptr + (b * n_splits + split) * n_pixels + pixels, acc, mask=inside)
        _finish_split_sum(
            partials_ptr,
            out_ptr,
            b,
            n_splits,
            n_pixels,
            pixels,
            inside,
            tickets_ptr,
            b * tl.num_programs(1) + tl.program_id(1),
        )
    else:
        tl.store(out_ptr + b * n_pixels + pixels, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _build_bank_tensors(kernel_size: int, frequencies: tuple[int, ...], device: torch.device):
    """The float32 1-D basis (built in float64) and the int32 filter indices, built on `device`
    (no host-to-device copy)."""
    basis = dct_basis_1d(kernel_size, torch.float32, device)
    all_filters = torch.arange(kernel_size * kernel_size, dtype=torch.int32, device=device)
    return basis, select_filters(all_filters, list(frequencies))


# Building the tables costs about a dozen small launches per call; the kernels only read them,
# so each (kernel_size, frequencies, device) builds them once (two tiny tensors each).
_bank_tables = kept_between_calls(_build_bank_tensors)


def _bank_tensors(kernel_size: int, frequencies: list[int], like: torch.Tensor):
    """The tables for an input like `like`."""
    return _bank_tables(kernel_size, tuple(frequencies), like)


def reduce_pixels(n_pixels: int) -> int:
    """Pixels per reduction tile: small maps take narrower tiles (and more planes per block)."""
    return 64 if n_pixels <= 64 else 128 if n_pixels <= 128 else 256


def _splits(programs: int, items: int, min_per_split: int) -> tuple[int, int]:
    """(S, items per split) for a launch of `programs` programs per split: by the rule at
    GPU_PROGRAMS; no split is empty."""
    splits = max(1, min(triton.cdiv(GPU_PROGRAMS, max(1, programs)), items // min_per_split))
    per_split = triton.cdiv(items, splits)
    return triton.cdiv(items, per_split), per_split


def plane_splits(batch: int, n_pixels: int, n_planes: int) -> tuple[int, int]:
    """(S, planes per split) for the reduction."""
    return _splits(batch * triton.cdiv(n_pixels, reduce_pixels(n_pixels)), n_planes, MIN_PLANES_PER_SPLIT)


def _channel_sum(x: torch.Tensor) -> torch.Tensor:
    """s = (1/T) sum_{c,t} x, float32 (B, H, W), in one launch."""
    batch, channels, frames, height, width = x.shape
    n_pixels = height * width
    pixels = reduce_pixels(n_pixels)
    tiles = triton.cdiv(n_pixels, pixels)
    splits, planes_per_split = plane_splits(batch, n_pixels, channels * frames)
    s = x.new_empty((batch, height, width), dtype=torch.float32)
    split = splits > 1
    partials = x.new_empty((batch, splits, height, width) if split else (0,), dtype=torch.float32)
    tickets = zeroed_tickets(x, batch * tiles) if split else partials
    *_, stride_h, stride_w = x.stride()
    flat = (width == 1 or stride_w == 1) and (height == 1 or stride_h == width)
    wrap_triton(_reduce_kernel)[(batch, tiles, splits)](
        x,
        s,
        partials,
        tickets,
        channels,
        frames,
        n_pixels,
        width,
        *x.stride(),
        planes_per_split,
        PLANES=REDUCE_ELEMENTS // pixels,
        PIXELS=pixels,
        FLAT_PIXELS=flat,
        SPLIT=split,
    )
    return s


def dct_forward(
    x: torch.Tensor, kernel_size: int, frequencies: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, channels, frames, height, width = x.shape
    n_filters = len(frequencies)
    basis, freq = _bank_tensors(kernel_size, frequencies, x)
    E = x.new_empty((batch, n_filters, height, width))
    mean = x.new_empty((batch, n_filters), dtype=torch.float32)
    var = x.new_empty((batch, n_filters), dtype=torch.float32)
    s = _channel_sum(x)
    wrap_triton(_filter_stats_kernel)[(batch, n_filters)](
        s,
        basis,
        freq,
        E,
        mean,
        var,
        n_filters,
        height,
        width,
        kernel_size,
        K_PAD=triton.next_power_of_2(kernel_size),
    )
    return E, mean, var, s


def dct_backward(
    grad_E: torch.Tensor,
    grad_mean: torch.Tensor,
    grad_var: torch.Tensor,
    s: torch.Tensor,
    mean: torch.Tensor,
    kernel_size: int,
    frequencies: list[int],
    frames: int,
) -> torch.Tensor:
    batch, height, width = s.shape
    n_filters = len(frequencies)
    basis, freq = _bank_tensors(kernel_size, frequencies, s)
    G = s.new_empty((batch, n_filters, height, width))
    wrap_triton(_grad_kernel)[lambda meta: (batch, n_filters, triton.cdiv(height * width, meta["BLOCK"]))](
        grad_E,
        grad_mean,
        grad_var,
        mean,
        s,
        basis,
        freq,
        G,
        n_filters,
        height,
        width,
        kernel_size,
        K_PAD=triton.next_power_of_2(kernel_size),
    )
    grad_map = grad_E.new_empty((batch, height, width))
    tiles = triton.cdiv(height * width, ADJOINT_BLOCK)
    splits, filters_per_split = _splits(batch * tiles, n_filters, MIN_FILTERS_PER_SPLIT)
    split = splits > 1
    partials = s.new_empty((batch, splits, height, width) if split else (0,))
    tickets = zeroed_tickets(s, batch * tiles) if split else partials
    wrap_triton(_adjoint_kernel)[(batch, tiles, splits)](
        G,
        basis,
        freq,
        grad_map,
        partials,
        tickets,
        n_filters,
        height,
        width,
        kernel_size,
        frames,
        filters_per_split,
        BLOCK=ADJOINT_BLOCK,
        K_PAD=triton.next_power_of_2(kernel_size),
        SPLIT=split,
    )
    return grad_map


# (B, C, T, H, W), as in benchmarks/bench_dct.py: the benchmark shapes, then TFAM's call on
# its (B, 1, 1, H, W) mean map (channels and frames equal to 1 become JIT constexprs).
AOT_SHAPES = [(8, 24, 16, 56, 56), (8, 48, 16, 28, 28), (8, 96, 16, 14, 14), (8, 192, 16, 7, 7), (80, 1, 1, 28, 28)]
AOT_KERNEL_SIZE = 7
AOT_K_PAD = 8
# A channels_last_3d input (planes not contiguous): the reduction's strided-pixel variant.
AOT_STRIDED_SHAPE = (8, 48, 16, 28, 28)


def aot_variants() -> list[KernelVariant]:
    """Every kernel the launchers above can pick, in each of its autotuned configs: every x
    dtype where it matters; the reduction's 256-pixel tiles (64 for the 7x7 maps) with flat
    planes, and fp32 strided, each with and without plane splits (TFAM's (B, 1, 1, H, W) map
    has one plane: no split), and the adjoint with and without filter splits."""
    variants = []
    for ty in _TRITON_DTYPES.values():
        reductions = [(256, True, True), (64, True, True), (256, True, False)]
        if ty == "fp32":
            reductions.append((256, False, True))
        for pixels, flat, split in reductions:
            constexprs = {"PLANES": REDUCE_ELEMENTS // pixels, "PIXELS": pixels, "FLAT_PIXELS": flat, "SPLIT": split}
            variants += autotuned_variants(
                f"dct.forward.reduce[{ty},PLANES={REDUCE_ELEMENTS // pixels},PIXELS={pixels},"
                f"{'flat' if flat else 'strided'}{',split' if split else ''}]",
                _reduce_kernel,
                constexprs,
                {"x_ptr": f"*{ty}"},
            )
        variants += autotuned_variants(
            f"dct.forward.filter_stats[{ty}]", _filter_stats_kernel, {"K_PAD": AOT_K_PAD}, {"E_ptr": f"*{ty}"}
        )
        variants += autotuned_variants(
            f"dct.backward.grad[{ty}]", _grad_kernel, {"K_PAD": AOT_K_PAD}, {"grad_E_ptr": f"*{ty}"}
        )
        for split in (True, False):
            variants += autotuned_variants(
                f"dct.backward.adjoint[{ty},BLOCK={ADJOINT_BLOCK}{',split' if split else ''}]",
                _adjoint_kernel,
                {"BLOCK": ADJOINT_BLOCK, "K_PAD": AOT_K_PAD, "SPLIT": split},
                {"out_ptr": f"*{ty}"},
            )
    return variants


def aot_launches(shapes=AOT_SHAPES) -> None:
    """Runs the forward and backward launchers at `shapes` (all 49 filters of the 7x7 bank)
    on uninitialized CPU tensors, every dtype, and the forward on a float32 channels_last_3d
    input (for `triton_variants.capture_specializations`, which stops each launch)."""
    frequencies = list(range(AOT_KERNEL_SIZE * AOT_KERNEL_SIZE))
    for shape in shapes:
        for dtype in _TRITON_DTYPES:
            x = torch.empty(shape, dtype=dtype)
            E, mean, var, s = dct_forward(x, AOT_KERNEL_SIZE, frequencies)
            dct_backward(E, mean, var, s, mean, AOT_KERNEL_SIZE, frequencies, shape[2])
    strided = torch.empty(AOT_STRIDED_SHAPE, dtype=torch.float32).to(memory_format=torch.channels_last_3d)
    dct_forward(strided, AOT_KERNEL_SIZE, frequencies)
