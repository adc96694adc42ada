"""Triton kernels for the DCT filter bank (SPEC §2) and their launchers (triton_op in op.py).

Forward, three or four launches (each needs the whole previous result, so they cannot merge):
  1. `_reduce_kernel`, grid (B, pixel tiles, plane splits): the one read of x, a block of
     planes times pixels per iteration; each split of the C*T planes writes its float32
     partial (1/T) sum to a (B, S, H, W) workspace, or s itself when S = 1;
  1b. `_sum_partials_kernel` (only when S > 1): s = the sum of the S partials, in split order,
     so the result is deterministic (no atomics).
  2. `_filter_h_kernel`, grid (B, k, pixel tiles): R_u = the 1-D filter a_u along H of s
     (k^2 multiply-adds per pixel over all u).
  3. `_filter_w_stats_kernel`, grid (B, D): E_d = a_v along W of R_u (k per pixel), written
     once, with the tile moments about E_d[0, 0] Chan-merged into the per-(b, d) mean and
     variance.
Backward, four launches: R again from s; `_grad_kernel` forms
G_d = dE_d + dmean_d / HW + dvar_d * 2 (E_d - mean_d) / HW (E_d rebuilt from R);
`_adjoint_w_kernel` sums the W-pass adjoint of every G_d with the same u into Q_u;
`_adjoint_h_kernel` applies the H-pass adjoint and writes the (B, H, W) map g / T.
Loads are upcast to float32 at once; offsets are int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..launch_state import traced
from ..triton_variants import KernelVariant
from .reference import dct_basis_1d, select_filters

TILE_BLOCK = 256
# The reduction loads a (planes, pixels) block of this many elements per iteration.
REDUCE_ELEMENTS = 2048
SUM_SPLITS_BLOCK = 8
SUM_PIXELS = 256
# Splitting the C*T planes: a launch needs about 2 programs per SM of a 132-SM H100 to stream
# x at full bandwidth, so S = ceil(264 / (B * pixel tiles)), but each split keeps at least 16
# planes (S <= C*T // 16) so the float32 partials cost at most 1/16 of x's elements; a launch
# with fewer planes than that has no more parallelism to give.
GPU_PROGRAMS = 2 * 132
MIN_PLANES_PER_SPLIT = 16
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _reduce_kernel(
    x_ptr, out_ptr, channels, frames, n_pixels, width,
    stride_b, stride_c, stride_t, stride_h, stride_w, planes_per_split,
    PLANES: tl.constexpr, PIXELS: tl.constexpr, FLAT_PIXELS: tl.constexpr,
):
    """out[b, split] = (1/T) sum of x[b, c, t] over the split's planes p = c * T + t."""
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
    for start in range(first, end, PLANES):
        planes = start + tl.arange(0, PLANES)
        plane_offsets = (planes // frames).to(tl.int64) * stride_c + (planes % frames).to(tl.int64) * stride_t
        offsets = b * stride_b + plane_offsets[:, None] + pixel_offsets[None, :]
        loaded = (planes < end)[:, None] & inside[None, :]
        acc += tl.load(x_ptr + offsets, mask=loaded, other=0.0).to(tl.float32)
    partial = tl.sum(acc, axis=0) / frames
    tl.store(out_ptr + (b * n_splits + split) * n_pixels + pixels, partial, mask=inside)


@triton.jit
def _sum_partials_kernel(
    partials_ptr, s_ptr, n_splits, n_pixels, n_maps_pixels,
    SPLITS_BLOCK: tl.constexpr, PIXELS: tl.constexpr,
):
    """s[b, pixel] = sum over splits of partials[b, split, pixel], pixels of all maps in one range."""
    index = tl.program_id(0).to(tl.int64) * PIXELS + tl.arange(0, PIXELS)
    inside = index < n_maps_pixels
    base = (index // n_pixels) * n_splits * n_pixels + index % n_pixels
    acc = tl.zeros((SPLITS_BLOCK, PIXELS), dtype=tl.float32)
    for start in range(0, n_splits, SPLITS_BLOCK):
        splits = start + tl.arange(0, SPLITS_BLOCK)
        offsets = splits.to(tl.int64)[:, None] * n_pixels + base[None, :]
        loaded = (splits < n_splits)[:, None] & inside[None, :]
        acc += tl.load(partials_ptr + offsets, mask=loaded, other=0.0)
    tl.store(s_ptr + index, tl.sum(acc, axis=0), mask=inside)


@triton.jit
def _filter_h_kernel(s_ptr, basis_ptr, r_ptr, height, width, K, BLOCK: tl.constexpr):
    """R[b, u, h, w] = sum_i a_u[i] s[b, h + i - k//2, w] (zero outside the map)."""
    b = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pixels < height * width
    h = pixels // width
    pad = K // 2
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(K):
        a = tl.load(basis_ptr + u * K + i)
        shift = i - pad
        ok = inside & (h + shift >= 0) & (h + shift < height)
        acc += a * tl.load(s_ptr + b * height * width + pixels + shift * width, mask=ok, other=0.0)
    tl.store(r_ptr + (b * K + u) * height * width + pixels, acc, mask=inside)


@triton.jit
def _filter_row_w(r_ptr, basis_ptr, pixels, inside, w, width, v, K):
    """E = sum_j a_v[j] R[h, w + j - k//2] for the pixels of one tile (R points at (b, u))."""
    pad = K // 2
    acc = tl.zeros(pixels.shape, dtype=tl.float32)
    for j in range(K):
        a = tl.load(basis_ptr + v * K + j)
        shift = j - pad
        ok = inside & (w + shift >= 0) & (w + shift < width)
        acc += a * tl.load(r_ptr + pixels + shift, mask=ok, other=0.0)
    return acc


@triton.jit
def _filter_w_stats_kernel(
    r_ptr, basis_ptr, freq_ptr, E_ptr, mean_ptr, var_ptr, n_filters, height, width, K,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    d = tl.load(freq_ptr + n).to(tl.int64)
    u = d % K
    v = d // K
    n_pixels = height * width
    r_plane = r_ptr + (b * K + u) * n_pixels
    E_plane = E_ptr + (b * n_filters + n) * n_pixels
    # Moments of E - shift with shift = E[0, 0] (the "shifted data" method: a mean far
    # from zero costs no precision), two passes per tile, merged across tiles (Chan et al.).
    first = tl.arange(0, BLOCK).to(tl.int64)
    e = _filter_row_w(r_plane, basis_ptr, first, first < 1, first % width, width, v, K)
    shift = tl.sum(tl.where(first == 0, e, 0.0), axis=0)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    for start in range(0, n_pixels, BLOCK):
        pixels = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = pixels < n_pixels
        e = _filter_row_w(r_plane, basis_ptr, pixels, inside, pixels % width, width, v, K)
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


@triton.jit
def _grad_kernel(
    grad_E_ptr, grad_mean_ptr, grad_var_ptr, mean_ptr, r_ptr, basis_ptr, freq_ptr, G_ptr,
    n_filters, height, width, K, BLOCK: tl.constexpr,
):
    """G_d = dE_d + dmean_d / HW + dvar_d * 2 (E_d - mean_d) / HW, with E_d rebuilt from R."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_pixels = height * width
    inside = pixels < n_pixels
    d = tl.load(freq_ptr + n).to(tl.int64)
    u = d % K
    v = d // K
    item = b * n_filters + n
    from_mean = tl.load(grad_mean_ptr + item) / n_pixels
    from_var = 2.0 * tl.load(grad_var_ptr + item) / n_pixels
    mean = tl.load(mean_ptr + item)
    e = _filter_row_w(r_ptr + (b * K + u) * n_pixels, basis_ptr, pixels, inside, pixels % width, width, v, K)
    g = tl.load(grad_E_ptr + item * n_pixels + pixels, mask=inside, other=0.0).to(tl.float32)
    g += from_mean + from_var * (e - mean)
    tl.store(G_ptr + item * n_pixels + pixels, g, mask=inside)


@triton.jit
def _adjoint_w_kernel(G_ptr, basis_ptr, freq_ptr, Q_ptr, n_filters, height, width, K, BLOCK: tl.constexpr):
    """Q[b, u, h, x] = sum over filters n with u_n = u of sum_j a_v[j] G_n[h, x - j + k//2]."""
    b = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_pixels = height * width
    inside = pixels < n_pixels
    w = pixels % width
    pad = K // 2
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for n in range(n_filters):
        d = tl.load(freq_ptr + n).to(tl.int64)
        if d % K == u:
            v = d // K
            G_plane = G_ptr + (b * n_filters + n) * n_pixels
            for j in range(K):
                a = tl.load(basis_ptr + v * K + j)
                shift = pad - j
                ok = inside & (w + shift >= 0) & (w + shift < width)
                acc += a * tl.load(G_plane + pixels + shift, mask=ok, other=0.0)
    tl.store(Q_ptr + (b * K + u) * n_pixels + pixels, acc, mask=inside)


@triton.jit
def _adjoint_h_kernel(Q_ptr, basis_ptr, out_ptr, height, width, K, frames, BLOCK: tl.constexpr):
    """out[b, y, x] = (1/T) sum_u sum_i a_u[i] Q[b, u, y - i + k//2, x]."""
    b = tl.program_id(0).to(tl.int64)
    pixels = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_pixels = height * width
    inside = pixels < n_pixels
    y = pixels // width
    pad = K // 2
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for u in range(K):
        Q_plane = Q_ptr + (b * K + u) * n_pixels
        for i in range(K):
            a = tl.load(basis_ptr + u * K + i)
            shift = pad - i
            ok = inside & (y + shift >= 0) & (y + shift < height)
            acc += a * tl.load(Q_plane + pixels + shift * width, mask=ok, other=0.0)
    tl.store(out_ptr + b * n_pixels + pixels, (acc / frames).to(out_ptr.dtype.element_ty), mask=inside)


def _build_bank_tensors(kernel_size: int, frequencies: tuple[int, ...], device: torch.device):
    """The float32 1-D basis (built in float64) and the int32 filter indices, built on `device`
    (no host-to-device copy)."""
    basis = dct_basis_1d(kernel_size, torch.float32, device)
    all_filters = torch.arange(kernel_size * kernel_size, dtype=torch.int32, device=device)
    return basis, select_filters(all_filters, list(frequencies))


# Building the tables costs about a dozen small launches per call; the kernels only read them,
# so each (kernel_size, frequencies, device) builds them once. Bounded: every distinct
# selection of filters keeps two tiny tensors.
_cached_bank_tensors = functools.lru_cache(maxsize=64)(_build_bank_tensors)


def _bank_tensors(kernel_size: int, frequencies: list[int], like: torch.Tensor):
    """The tables for an input like `like`; built fresh for a traced call or inside a CUDA-graph
    capture (`launch_state.traced`)."""
    if traced(like):
        return _build_bank_tensors(kernel_size, tuple(frequencies), like.device)
    return _cached_bank_tensors(kernel_size, tuple(frequencies), like.device)


def _filter_h(s: torch.Tensor, basis: torch.Tensor, kernel_size: int) -> torch.Tensor:
    batch, height, width = s.shape
    R = s.new_empty((batch, kernel_size, height, width))
    grid = (batch, kernel_size, triton.cdiv(height * width, TILE_BLOCK))
    wrap_triton(_filter_h_kernel)[grid](s, basis, R, height, width, kernel_size, BLOCK=TILE_BLOCK)
    return R


def reduce_pixels(n_pixels: int) -> int:
    """Pixels per reduction tile: small maps take narrower tiles (and more planes per block)."""
    return 64 if n_pixels <= 64 else 128 if n_pixels <= 128 else 256


def plane_splits(batch: int, n_pixels: int, n_planes: int) -> tuple[int, int]:
    """(S, planes per split) for the reduction, by the rule at GPU_PROGRAMS; no split is empty."""
    programs = max(1, batch * triton.cdiv(n_pixels, reduce_pixels(n_pixels)))
    splits = max(1, min(triton.cdiv(GPU_PROGRAMS, programs), n_planes // MIN_PLANES_PER_SPLIT))
    planes_per_split = triton.cdiv(n_planes, splits)
    return triton.cdiv(n_planes, planes_per_split), planes_per_split


def _channel_sum(x: torch.Tensor) -> torch.Tensor:
    """s = (1/T) sum_{c,t} x, float32 (B, H, W): the reduction, then the sum of its partials if split."""
    batch, channels, frames, height, width = x.shape
    n_pixels = height * width
    pixels = reduce_pixels(n_pixels)
    splits, planes_per_split = plane_splits(batch, n_pixels, channels * frames)
    s = x.new_empty((batch, height, width), dtype=torch.float32)
    partials = s if splits == 1 else x.new_empty((batch, splits, height, width), dtype=torch.float32)
    *_, stride_h, stride_w = x.stride()
    flat = (width == 1 or stride_w == 1) and (height == 1 or stride_h == width)
    wrap_triton(_reduce_kernel)[(batch, triton.cdiv(n_pixels, pixels), splits)](
        x, partials, channels, frames, n_pixels, width, *x.stride(), planes_per_split,
        PLANES=REDUCE_ELEMENTS // pixels, PIXELS=pixels, FLAT_PIXELS=flat,
    )
    if splits > 1:
        wrap_triton(_sum_partials_kernel)[(triton.cdiv(batch * n_pixels, SUM_PIXELS),)](
            partials, s, splits, n_pixels, batch * n_pixels, SPLITS_BLOCK=SUM_SPLITS_BLOCK, PIXELS=SUM_PIXELS,
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
    R = _filter_h(s, basis, kernel_size)
    wrap_triton(_filter_w_stats_kernel)[(batch, n_filters)](
        R, basis, freq, E, mean, var, n_filters, height, width, kernel_size, BLOCK=TILE_BLOCK,
    )
    return E, mean, var, s


def dct_backward(
    grad_E: torch.Tensor, grad_mean: torch.Tensor, grad_var: torch.Tensor, s: torch.Tensor, mean: torch.Tensor,
    kernel_size: int, frequencies: list[int], frames: int,
) -> torch.Tensor:
    batch, height, width = s.shape
    n_filters = len(frequencies)
    basis, freq = _bank_tensors(kernel_size, frequencies, s)
    tiles = triton.cdiv(height * width, TILE_BLOCK)
    R = _filter_h(s, basis, kernel_size)
    G = s.new_empty((batch, n_filters, height, width))
    wrap_triton(_grad_kernel)[(batch, n_filters, tiles)](
        grad_E, grad_mean, grad_var, mean, R, basis, freq, G, n_filters, height, width, kernel_size,
        BLOCK=TILE_BLOCK,
    )
    Q = s.new_empty((batch, kernel_size, height, width))
    wrap_triton(_adjoint_w_kernel)[(batch, kernel_size, tiles)](
        G, basis, freq, Q, n_filters, height, width, kernel_size, BLOCK=TILE_BLOCK,
    )
    grad_map = grad_E.new_empty((batch, height, width))
    wrap_triton(_adjoint_h_kernel)[(batch, tiles)](
        Q, basis, grad_map, height, width, kernel_size, frames, BLOCK=TILE_BLOCK,
    )
    return grad_map


# (B, C, T, H, W), as in benchmarks/bench_dct.py: the benchmark shapes, then TFAM's call on
# its (B, 1, 1, H, W) mean map (channels and frames equal to 1 become JIT constexprs).
AOT_SHAPES = [(8, 24, 16, 56, 56), (8, 48, 16, 28, 28), (8, 96, 16, 14, 14), (8, 192, 16, 7, 7), (80, 1, 1, 28, 28)]
AOT_KERNEL_SIZE = 7
# A channels_last_3d input (planes not contiguous): the reduction's strided-pixel variant.
AOT_STRIDED_SHAPE = (8, 48, 16, 28, 28)


def aot_variants() -> list[KernelVariant]:
    """Every kernel the launchers above can pick: one BLOCK each, every x dtype where it matters;
    the reduction's 256-pixel tiles (64 for the 7x7 maps) with flat planes, and fp32 strided."""
    variants = [
        KernelVariant(f"dct.filter_h[fp32,BLOCK={TILE_BLOCK}]", _filter_h_kernel, {"BLOCK": TILE_BLOCK}),
        KernelVariant(f"dct.forward.sum_partials[fp32,SPLITS_BLOCK={SUM_SPLITS_BLOCK},PIXELS={SUM_PIXELS}]",
                      _sum_partials_kernel, {"SPLITS_BLOCK": SUM_SPLITS_BLOCK, "PIXELS": SUM_PIXELS}),
        KernelVariant(f"dct.backward.adjoint_w[fp32,BLOCK={TILE_BLOCK}]", _adjoint_w_kernel, {"BLOCK": TILE_BLOCK}),
    ]
    for ty in _TRITON_DTYPES.values():
        for pixels, flat in ((256, True), (64, True)) + (((256, False),) if ty == "fp32" else ()):
            constexprs = {"PLANES": REDUCE_ELEMENTS // pixels, "PIXELS": pixels, "FLAT_PIXELS": flat}
            variants.append(KernelVariant(
                f"dct.forward.reduce[{ty},PLANES={REDUCE_ELEMENTS // pixels},PIXELS={pixels},"
                f"{'flat' if flat else 'strided'}]", _reduce_kernel, constexprs, pointer_types={"x_ptr": f"*{ty}"},
            ))
        variants += [
            KernelVariant(f"dct.forward.filter_w_stats[{ty},BLOCK={TILE_BLOCK}]", _filter_w_stats_kernel,
                          {"BLOCK": TILE_BLOCK}, pointer_types={"E_ptr": f"*{ty}"}),
            KernelVariant(f"dct.backward.grad[{ty},BLOCK={TILE_BLOCK}]", _grad_kernel, {"BLOCK": TILE_BLOCK},
                          pointer_types={"grad_E_ptr": f"*{ty}"}),
            KernelVariant(f"dct.backward.adjoint_h[{ty},BLOCK={TILE_BLOCK}]", _adjoint_h_kernel, {"BLOCK": TILE_BLOCK},
                          pointer_types={"out_ptr": f"*{ty}"}),
        ]
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
