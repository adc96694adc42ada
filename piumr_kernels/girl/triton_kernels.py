"""Triton kernels for the GIRL loss (SPEC §3) and their launchers (registered as triton_op
through `FusedOp` in op.py; same schemas as the cpp ops).

Layout: the samples in group order (`order`; `offsets`, `G + 1` boundaries into it) are cut
into tiles of consecutive positions. A tile may hold the end of one group and the start of
the next: each position finds its group by a binary search in `offsets`, and pairs from
different groups are masked. A tile's partner range runs from its first position's group
start to its last position's group end. Nothing `B x B` is formed, and rows are read through
`order` inside the kernels (no gathered copy of the features).

Cosine tiles are raw products `z_i . z_j` accumulated over the feature width in chunks of
`BLOCK_K` with `tl.dot` (tensor cores: bf16/fp16 operands as they come, fp32 operands as
TF32 unless the exact mode is selected, see `precision.py`; fp32 accumulation), scaled by the
inverse norms afterwards. A row whose squared norm overflows has inverse norm 0 and gives
cosine 0 (a zero row, as `F.normalize`), not `inf * 0`.

One launch per direction:
- the forward kernel computes each pair once. Pair tiles are `BLOCK_N` square; tile
  `tile_i` pairs with the column tiles `tile_j >= tile_i` of its partner range. One program
  per `(tile_i, step)` of a band (`band`, `tile_span`) takes `tile_j = tile_i + step`, and
  every `span`-th after it (none for the random partition, whose groups the band covers),
  in `BLOCK_M`-row parts. From every tile it keeps partial statistics (`NUM_PARTIALS`,
  online log-sum-exps) both for its rows, over the partners in the columns, and for its
  columns, over the rows. The last program to contribute to a tile merges them in a fixed
  order into per-anchor statistics (`NUM_STATS`, int32 tickets, `launch_state.
  is_last_program`). The last tile finished forms the group risks, the loss
  `mean L_g + lambda_var Var L_g` over the groups of at least 2 members and the variance,
  and with a gradient coming `dloss/dL_g / |I_g|` per group. The statistics and those slopes
  are what the backward recomputes from; without a gradient only the anchor losses are
  stored. Deterministic: no float atomics.
- the gradient kernel (the backward): `dloss/dz` for the program's anchors over one slice of
  `SLICE` features, one program per (anchor tile of `BLOCK_M`, slice), streaming over the
  tile's partner range in blocks of `BLOCK_N`. It recomputes the tiles' cosines, forms
  `H_ij = s_g (g_ij + g_ji)` (`g_ij = dl_i/dc_ij` from the saved statistics, `s_g` the
  group's slope times the upstream gradient), accumulates `dF = H f` for the slice in
  registers over the partner blocks with the projection `f_i . dF_i`, and writes the
  normalization backward once, in the features' dtype and batch order. Rows of groups of
  fewer than 2 members get 0.

Both kernels are autotuned on the shape (`triton_autotune`), one autotuned kernel per tile
plan (the grid follows the plan, so the launcher keeps it): a GPU picks the pipelining depth
of the products' feature-chunk loads (configs below).

Elementwise math is float32 (loads are upcast at once; the interpreter mishandles bf16
arithmetic), scalar arguments are cast to float32 in the kernels (Inductor passes float64),
and offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ..launch_state import is_last_program, kept_between_calls, zeroed_tickets
from ..triton_autotune import autotune
from ..triton_variants import KernelVariant, autotuned_variants
from .precision import TRITON_FP32_PRECISIONS, set_triton_fp32_precision, triton_fp32_precision
from .reference import uniform_offsets

# Feature chunks of the cosine products: 64 on tensor cores; exact fp32 products run on the
# FMA pipe with their operands in registers and take 32 (64 spill on sm_80/sm_90).
PRODUCT_BLOCK_K = (64, 32)  # tensor-core products, exact fp32 products
MAX_TILE = 64  # the forward's pair tile side for large groups
FORWARD_BLOCK_M = 16  # rows of a pair tile the forward takes at a time
# The gradient kernel's tiles: 16 anchors (twice the programs of 32-anchor tiles at
# B = 4096) and slices of features whose dF block stays in registers; every slice recomputes
# its tiles' cosines, so a grid that fills the GPU anyway takes slices of 256 (over steps of
# 16 partners), else 128 (over steps of 32: twice the programs). Widths up to 32 take
# slices of 32 over steps of 16 partners; slices of 256 over 32 partners spill on
# sm_80/sm_90. Warps and pipelining: the autotuned configs below.
GRAD_BLOCK_M = 16
GRAD_SLICES = {32: 16, 128: 32, 256: 16}  # slice -> BLOCK_N
TARGET_PROGRAMS = 132  # the tile kernels' programs aim at one per SM of an H100 at least
FINISH_GROUPS = tl.constexpr(32)  # groups per step of the loss combination (last forward program)
FINISH_ANCHORS = tl.constexpr(128)  # anchors per step of the group sums
NORM_EPS = tl.constexpr(1e-12)  # f = z / max(||z||, NORM_EPS)
# Per-sample statistics of the forward kernel, rows of a (NUM_STATS, B) buffer in this
# order: l_i, ||z_i||, LSE_i of the logits, log sum_k r_ik, sum_{j in P(i)} w_ij, |P(i)|.
# Without a gradient only the first row is stored. With one, the saved buffer is these rows
# followed by the G slopes dloss/dL_g / |I_g|.
NUM_STATS = 6
_NUM_STATS = tl.constexpr(NUM_STATS)  # for the kernels


@triton.jit
def _group_of(offsets_ptr, positions, num_groups, search_steps):
    """Group of each position of `order`: the last g with offsets[g] <= position (a binary
    search over offsets[0..G]; empty groups are skipped since their start equals the next)."""
    lo = tl.zeros_like(positions)
    size = num_groups + 1
    for _ in range(search_steps):
        half = size // 2
        mid = lo + half
        lo = tl.where(tl.load(offsets_ptr + mid) <= positions, mid, lo)
        size = size - half
    return lo


@triton.jit
def _anchor_tile(order_ptr, labels_ptr, offsets_ptr, tile, batch, num_groups, search_steps, BLOCK_M: tl.constexpr):
    """Tile `tile` of BLOCK_M consecutive positions in group order: positions, validity, sample
    ids, groups and their bounds, labels, and the tile's partner range (first position's group
    start to last position's group end)."""
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < batch
    safe_rows = tl.minimum(rows, batch - 1)
    samples = tl.load(order_ptr + safe_rows)
    group = _group_of(offsets_ptr, safe_rows, num_groups, search_steps)
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    row_labels = tl.load(labels_ptr + samples)
    first = tl.min(tl.where(row_ok, start, batch), axis=0)
    last = tl.max(tl.where(row_ok, end, 0), axis=0)
    return rows, row_ok, samples, group, start, end, row_labels, first, last


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """acc + a @ b on tensor cores: 16-bit operands as they are, fp32 ones at PRECISION.
    Without NATIVE_BF16 (the interpreter, whose bf16 products are wrong: numpy has no bf16)
    bf16 operands are widened to fp32 and multiplied as TF32, which holds them exactly."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    if a.dtype == tl.bfloat16 and not NATIVE_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    return tl.dot(a, b, acc)


@triton.jit
def _inverse_norm(norm):
    return 1.0 / tl.maximum(norm, NORM_EPS)


@triton.jit
def _scaled_cosines(acc, inv_rows, inv_cols):
    """Cosines from raw products; 0 where a row's norm overflowed (its inverse is 0)."""
    scale = inv_rows[:, None] * inv_cols[None, :]
    return tl.where(scale == 0.0, 0.0, acc * scale)


@triton.jit
def _raw_products(
    z_ptr,
    row_samples,
    row_ok,
    col_samples,
    col_ok,
    width,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ROW_NORMS: tl.constexpr,
):
    """`(z_rows . z_cols, sum z_rows^2)` over the width in BLOCK_K chunks (loads pipelined over
    NUM_STAGES); the rows' squared norms from the same loads with ROW_NORMS, else 0."""
    acc = tl.zeros((row_samples.shape[0], col_samples.shape[0]), dtype=tl.float32)
    row_sum_sq = tl.zeros((row_samples.shape[0],), dtype=tl.float32)
    k = tl.arange(0, BLOCK_K)
    for k0 in tl.range(0, width, BLOCK_K, num_stages=NUM_STAGES):
        k_ok = k0 + k < width
        a = tl.load(
            z_ptr + row_samples[:, None] * width + k0 + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(
            z_ptr + col_samples[:, None] * width + k0 + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0
        )
        acc = _dot(a, tl.trans(b), acc, PRECISION, NATIVE_BF16)
        if ROW_NORMS:
            a32 = a.to(tl.float32)
            row_sum_sq += tl.sum(a32 * a32, axis=1)
    return acc, row_sum_sq


@triton.jit
def _squared_norms(z_ptr, samples, ok, width, BLOCK_K: tl.constexpr):
    """Squared norms of the rows `samples` (0 where not `ok`), over the width in BLOCK_K chunks."""
    k = tl.arange(0, BLOCK_K)
    sum_sq = tl.zeros((samples.shape[0],), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        z = tl.load(
            z_ptr + samples[:, None] * width + k0 + k[None, :], mask=ok[:, None] & (k0 + k < width)[None, :], other=0.0
        ).to(tl.float32)
        sum_sq += tl.sum(z * z, axis=1)
    return sum_sq


@triton.jit
def _pair_logits(c, inv_tau, eta, inv_eta):
    """Logits `s = c / tau` and log-emphases `log r = -0.5 ((c - eta) / eta)^2`."""
    d = (c - eta) * inv_eta
    return c * inv_tau, -0.5 * d * d


@triton.jit
def _pair_masks(rows, row_ok, start, end, row_labels, cols, col_labels):
    """Partners (same group, not the anchor itself) and positives (partners with its label)."""
    partner = (
        row_ok[:, None]
        & (cols[None, :] >= start[:, None])
        & (cols[None, :] < end[:, None])
        & (rows[:, None] != cols[None, :])
    )
    return partner, partner & (row_labels[:, None] == col_labels[None, :])


@triton.jit
def _columns(order_ptr, labels_ptr, c0, last, BLOCK_N: tl.constexpr):
    """Partner positions `c0 .. c0 + BLOCK_N`, their validity (before `last`), ids and labels."""
    cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < last
    col_samples = tl.load(order_ptr + cols, mask=col_ok, other=0)
    return cols, col_ok, col_samples, tl.load(labels_ptr + col_samples, mask=col_ok, other=-1)


# Partial statistics of one anchor tile from some of its partners, a (NUM_PARTIALS, BLOCK_N)
# block per contribution, rows in this order: the logits' max and sum exp(s - max), the
# log-emphases' max and sum r (r = exp(log r - max)), sum_{j in P} r s, sum_{j in P} r, |P|.
NUM_PARTIALS = 7
_NUM_PARTIALS = tl.constexpr(NUM_PARTIALS)


@triton.jit
def _no_partials(BLOCK: tl.constexpr):
    """The partials of no partner."""
    minus_inf = tl.full((BLOCK,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK,), dtype=tl.float32)
    return minus_inf, zero, minus_inf, zero, zero, zero, zero


@triton.jit
def _shift(maximum):
    # A row with no partner keeps a -inf max; shift by 0 there so no inf - inf.
    return tl.where(maximum == float("-inf"), 0.0, maximum)


@triton.jit
def _tile_partials(s, log_r, partner, positive, AXIS: tl.constexpr):
    """The partials of a pair tile's anchors along AXIS (1: the rows' over their partners in
    the columns; 0: the columns' over the rows)."""
    s_masked = tl.where(partner, s, float("-inf"))
    log_r_masked = tl.where(partner, log_r, float("-inf"))
    logit_max = tl.max(s_masked, axis=AXIS)
    emph_max = tl.max(log_r_masked, axis=AXIS)
    logit_sum = tl.sum(tl.exp(s_masked - tl.expand_dims(_shift(logit_max), AXIS)), axis=AXIS)
    r = tl.exp(log_r_masked - tl.expand_dims(_shift(emph_max), AXIS))
    pos_logit = tl.sum(tl.where(positive, r * s, 0.0), axis=AXIS)
    pos_weight = tl.sum(tl.where(positive, r, 0.0), axis=AXIS)
    pos_count = tl.sum(positive.to(tl.int32), axis=AXIS).to(tl.float32)  # integer adds, off the FP32 pipe
    return logit_max, logit_sum, emph_max, tl.sum(r, axis=AXIS), pos_logit, pos_weight, pos_count


@triton.jit
def _merge_partials(a, b):
    """The partials of two disjoint sets of partners together (online log-sum-exp)."""
    a_logit_max, a_logit_sum, a_emph_max, a_emph_sum, a_pos_logit, a_pos_weight, a_pos_count = a
    b_logit_max, b_logit_sum, b_emph_max, b_emph_sum, b_pos_logit, b_pos_weight, b_pos_count = b
    logit_max = tl.maximum(a_logit_max, b_logit_max)
    logit_shift = _shift(logit_max)
    logit_sum = a_logit_sum * tl.exp(a_logit_max - logit_shift) + b_logit_sum * tl.exp(b_logit_max - logit_shift)
    emph_max = tl.maximum(a_emph_max, b_emph_max)
    emph_shift = _shift(emph_max)
    a_scale = tl.exp(a_emph_max - emph_shift)
    b_scale = tl.exp(b_emph_max - emph_shift)
    return (
        logit_max,
        logit_sum,
        emph_max,
        a_emph_sum * a_scale + b_emph_sum * b_scale,
        a_pos_logit * a_scale + b_pos_logit * b_scale,
        a_pos_weight * a_scale + b_pos_weight * b_scale,
        a_pos_count + b_pos_count,
    )


@triton.jit
def _store_partials(parts_ptr, slot, first_row, partials, BLOCK_N: tl.constexpr):
    """Stores `partials` (of len(partials[0]) anchors) at row `first_row` of block `slot`."""
    logit_max, logit_sum, emph_max, emph_sum, pos_logit, pos_weight, pos_count = partials
    at = parts_ptr + slot * (_NUM_PARTIALS * BLOCK_N) + first_row + tl.arange(0, logit_max.shape[0])
    tl.store(at, logit_max)
    tl.store(at + BLOCK_N, logit_sum)
    tl.store(at + 2 * BLOCK_N, emph_max)
    tl.store(at + 3 * BLOCK_N, emph_sum)
    tl.store(at + 4 * BLOCK_N, pos_logit)
    tl.store(at + 5 * BLOCK_N, pos_weight)
    tl.store(at + 6 * BLOCK_N, pos_count)


@triton.jit
def _load_partials(parts_ptr, slot, first_row, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """The BLOCK anchors' partials from row `first_row` of block `slot`, stored by this or
    another program (so past L1)."""
    at = parts_ptr + slot * (_NUM_PARTIALS * BLOCK_N) + first_row + tl.arange(0, BLOCK)
    return (
        tl.load(at, cache_modifier=".cg"),
        tl.load(at + BLOCK_N, cache_modifier=".cg"),
        tl.load(at + 2 * BLOCK_N, cache_modifier=".cg"),
        tl.load(at + 3 * BLOCK_N, cache_modifier=".cg"),
        tl.load(at + 4 * BLOCK_N, cache_modifier=".cg"),
        tl.load(at + 5 * BLOCK_N, cache_modifier=".cg"),
        tl.load(at + 6 * BLOCK_N, cache_modifier=".cg"),
    )


@triton.jit
def _forward_kernel(
    z_ptr,
    order_ptr,
    labels_ptr,
    offsets_ptr,
    band_ptr,
    row_parts_ptr,
    col_parts_ptr,
    stats_ptr,
    risks_ptr,
    loss_ptr,
    var_ptr,
    tickets_ptr,
    batch,
    width,
    num_groups,
    search_steps,
    span,
    tau,
    eta,
    lambda_var,
    lambda_grad,
    need_grad,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Program `(tile_i, step)` of the band (`band_ptr`): the pair tiles of row tile `tile_i`
    with column tiles `tile_i + step + k * span` in its partner range, in BLOCK_M-row parts;
    row partials in block `tile_i * span + step` of `row_parts_ptr`, column partials of tile
    `tile_j > tile_i` in block `_pair_slot(tile_i, tile_j, T)` of `col_parts_ptr` (T tiles)."""
    tile_i = tl.load(band_ptr + 2 * tl.program_id(0)).to(tl.int64)
    step = tl.load(band_ptr + 2 * tl.program_id(0) + 1).to(tl.int64)
    num_tiles = tl.cdiv(batch, BLOCK_N)
    slot = tile_i * span + step
    inv_tau = 1.0 / tl.cast(tau, tl.float32)
    eta = tl.cast(eta, tl.float32)
    inv_eta = 1.0 / eta
    # The tile's partner range: its first position's group start to its last one's end.
    tile_rows = _anchor_tile(order_ptr, labels_ptr, offsets_ptr, tile_i, batch, num_groups, search_steps, BLOCK_N)
    tile_last = tile_rows[8]
    # What the last contributor to a tile needs to finish it (`_finish_tile`).
    finishing = (
        (z_ptr, order_ptr, labels_ptr, offsets_ptr),
        (row_parts_ptr, col_parts_ptr, tickets_ptr),
        (stats_ptr, risks_ptr, loss_ptr, var_ptr),
        (batch, width, num_groups, search_steps, span),
        (lambda_var, lambda_grad, need_grad),
    )
    _store_partials(row_parts_ptr, slot, 0, _no_partials(BLOCK_N), BLOCK_N)
    # Column tiles tile_i + step, then every span-th up to the tile's partner range end (one
    # for the random partition, whose groups the band covers).
    pair_slots = _pair_slot(tile_i, 0, num_tiles)  # + tile_j: the block of pair (tile_i, tile_j)
    first_j = tile_i + step
    end_j = (tile_last - 1) // BLOCK_N + 1
    for tile_j in range(first_j, end_j, span):
        cols, col_ok, col_samples, col_labels = _columns(order_ptr, labels_ptr, tile_j * BLOCK_N, tile_last, BLOCK_N)
        # The columns' norms once, in a pass of their own (in the parts' product loops they spill).
        inv_cols = _inverse_norm(tl.sqrt(_squared_norms(z_ptr, col_samples, col_ok, width, BLOCK_K)))
        columns = _no_partials(BLOCK_N)
        for part in range(BLOCK_N // BLOCK_M):
            rows, row_ok, samples, group, start, end, row_labels, first, last = _anchor_tile(
                order_ptr,
                labels_ptr,
                offsets_ptr,
                tile_i * (BLOCK_N // BLOCK_M) + part,
                batch,
                num_groups,
                search_steps,
                BLOCK_M,
            )
            acc, row_sum_sq = _raw_products(
                z_ptr, samples, row_ok, col_samples, col_ok, width, BLOCK_K, PRECISION, NATIVE_BF16, NUM_STAGES, True
            )
            c = _scaled_cosines(acc, _inverse_norm(tl.sqrt(row_sum_sq)), inv_cols)
            s, log_r = _pair_logits(c, inv_tau, eta, inv_eta)
            partner, positive = _pair_masks(rows, row_ok, start, end, row_labels, cols, col_labels)
            # This program's earlier stores of the rows' partials (other threads) come first.
            tl.debug_barrier()
            rows_so_far = _load_partials(row_parts_ptr, slot, part * BLOCK_M, BLOCK_M, BLOCK_N)
            rows_now = _tile_partials(s, log_r, partner, positive, 1)
            _store_partials(row_parts_ptr, slot, part * BLOCK_M, _merge_partials(rows_so_far, rows_now), BLOCK_N)
            columns = _merge_partials(columns, _tile_partials(s, log_r, partner, positive, 0))
        if tile_j != tile_i:
            _store_partials(col_parts_ptr, pair_slots + tile_j, 0, columns, BLOCK_N)
    # Then this program's contributions count: to each column tile it stored partials of,
    # and last to its row tile.
    num_columns = tl.cdiv(tl.maximum(end_j - first_j, 0), span)
    for k in range(0, num_columns + 1):
        tile = first_j + k * span
        group_start = tile_rows[7]
        if k == num_columns:
            tile = tile_i
        elif tile != tile_i:
            group_start = _group_start(offsets_ptr, tile * BLOCK_N, num_groups, search_steps)
        if k == num_columns or tile != tile_i:
            _contributed(tile, group_start, finishing, BLOCK_N, BLOCK_K)


@triton.jit
def _pair_slot(tile_i, tile_j, num_tiles):
    """Block of tile pair `tile_i < tile_j` among the T (T - 1) / 2 such pairs, row by row."""
    return tile_i * (num_tiles - 1) - tile_i * (tile_i - 1) // 2 + tile_j - tile_i - 1


@triton.jit
def _group_start(offsets_ptr, position, num_groups, search_steps):
    """Start of the group holding `position` (in group order)."""
    positions = position + tl.zeros((2,), dtype=tl.int64)
    return tl.min(tl.load(offsets_ptr + _group_of(offsets_ptr, positions, num_groups, search_steps)), axis=0)


@triton.jit
def _contributed(tile, first, finishing, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Counts this program's contribution to `tile`, after its stores of the partials. The
    tile's partials come from its own `min(span, T - tile)` programs and from one column
    contribution of every earlier tile that the group of its first position (starting at
    `first`) reaches back to; the last of them finishes the tile (`_finish_tile`)."""
    tickets_ptr = finishing[1][2]
    batch, span = finishing[3][0], finishing[3][4]
    count = tl.minimum(span, tl.cdiv(batch, BLOCK_N) - tile) + tile - first // BLOCK_N
    if is_last_program(tickets_ptr, tile, count):
        _finish_tile(tile, finishing, BLOCK_N, BLOCK_K)


@triton.jit
def _finish_tile(tile, finishing, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Run by the last program to contribute to `tile`: merges its partials in a fixed order
    (its own programs', then the earlier tiles' column contributions), stores its anchors'
    statistics (NUM_STATS) and releases its ticket; the last tile to finish then combines
    the loss (`_finish_loss`). `finishing`: the forward kernel's pointers and sizes."""
    inputs, parts, outputs, sizes, loss_options = finishing
    z_ptr, order_ptr, labels_ptr, offsets_ptr = inputs
    row_parts_ptr, col_parts_ptr, tickets_ptr = parts
    stats_ptr, risks_ptr, loss_ptr, var_ptr = outputs
    batch, width, num_groups, search_steps, span = sizes
    lambda_var, lambda_grad, need_grad = loss_options
    num_tiles = tl.cdiv(batch, BLOCK_N)
    rows, row_ok, samples, group, start, end, row_labels, first, last = _anchor_tile(
        order_ptr, labels_ptr, offsets_ptr, tile, batch, num_groups, search_steps, BLOCK_N
    )
    row_sum_sq = _squared_norms(z_ptr, samples, row_ok, width, BLOCK_K // 2)
    merged = _no_partials(BLOCK_N)
    for step in range(0, tl.minimum(span, num_tiles - tile)):
        merged = _merge_partials(merged, _load_partials(row_parts_ptr, tile * span + step, 0, BLOCK_N, BLOCK_N))
    for tile_i in range(first // BLOCK_N, tile):
        column_part = _load_partials(col_parts_ptr, _pair_slot(tile_i, tile, num_tiles), 0, BLOCK_N, BLOCK_N)
        merged = _merge_partials(merged, column_part)
    logit_max, logit_sum, emph_max, emph_sum, pos_logit, pos_weight, pos_count = merged
    # Anchors without partners (groups of 1) keep neutral values so everything stays finite.
    has_partner = end - start >= 2
    logit_max = tl.where(has_partner, logit_max, 0.0)
    emph_max = tl.where(has_partner, emph_max, 0.0)
    logit_sum = tl.where(has_partner, logit_sum, 1.0)
    emph_sum = tl.where(has_partner, emph_sum, 1.0)
    partners = (end - start - 1).to(tl.float32)
    logit_lse = logit_max + tl.log(logit_sum)
    loss = -partners / emph_sum * (pos_logit - logit_lse * pos_weight) / tl.maximum(pos_count, 1.0)
    tl.store(stats_ptr + rows, loss, mask=row_ok)
    saved = row_ok & (need_grad != 0)
    tl.store(stats_ptr + 1 * batch + rows, tl.sqrt(row_sum_sq), mask=saved)
    tl.store(stats_ptr + 2 * batch + rows, logit_lse, mask=saved)
    tl.store(stats_ptr + 3 * batch + rows, emph_max + tl.log(emph_sum), mask=saved)
    tl.store(stats_ptr + 4 * batch + rows, partners * pos_weight / emph_sum, mask=saved)
    tl.store(stats_ptr + 5 * batch + rows, pos_count, mask=saved)
    tl.store(tickets_ptr + tile, 0)
    if is_last_program(tickets_ptr, num_tiles, num_tiles):
        _finish_loss(
            offsets_ptr,
            stats_ptr,
            risks_ptr,
            loss_ptr,
            var_ptr,
            stats_ptr + _NUM_STATS * batch,
            num_groups,
            lambda_var,
            lambda_grad,
            need_grad,
            FINISH_GROUPS,
            FINISH_ANCHORS,
        )
        tl.store(tickets_ptr + num_tiles, 0)


@triton.jit
def _finish_loss(
    offsets_ptr,
    losses_ptr,
    risks_ptr,
    loss_ptr,
    var_ptr,
    slopes_ptr,
    num_groups,
    lambda_var,
    lambda_grad,
    need_grad,
    GROUPS: tl.constexpr,
    ANCHORS: tl.constexpr,
):
    """Run by the forward's last program, once every anchor loss is stored: the group risks
    L_g (mean anchor loss; 0 for a group of fewer than 2 members, left out), over the G'
    counted groups the loss `mean + lambda_var * Var` and the variance, and with need_grad
    each group's slope dloss/dL_g / |I_g| (`lambda_grad` is lambda_var with var_grad, else
    0). Group sums run GROUPS groups at a time over the anchors of their range (deterministic,
    no atomics); loads of other programs' stores bypass L1."""
    lanes = tl.arange(0, GROUPS).to(tl.int64)
    anchors = tl.arange(0, ANCHORS).to(tl.int64)
    count = tl.zeros((GROUPS,), dtype=tl.float32)
    total = tl.zeros((GROUPS,), dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        groups = g0 + lanes
        ok = groups < num_groups
        start = tl.load(offsets_ptr + groups, mask=ok, other=0)
        end = tl.load(offsets_ptr + groups + 1, mask=ok, other=0)
        sums = tl.zeros((GROUPS,), dtype=tl.float32)
        range_end = tl.load(offsets_ptr + tl.minimum(g0 + GROUPS, num_groups))
        for a0 in range(tl.load(offsets_ptr + g0), range_end, ANCHORS):
            positions = a0 + anchors
            losses = tl.load(losses_ptr + positions, mask=positions < range_end, other=0.0, cache_modifier=".cg")
            inside = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])
            sums += tl.sum(tl.where(inside, losses[None, :], 0.0), axis=1)
        counted = ok & (end - start >= 2)
        risk = tl.where(counted, sums / tl.maximum(end - start, 1).to(tl.float32), 0.0)
        tl.store(risks_ptr + groups, risk, mask=ok)
        count += counted.to(tl.float32)
        total += risk
    counted_groups = tl.maximum(tl.sum(count, axis=0), 1.0)
    mean = tl.sum(total, axis=0) / counted_groups
    # The risks are read back below by other threads of this program.
    tl.debug_barrier()
    spread = tl.zeros((GROUPS,), dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        groups = g0 + lanes
        ok = groups < num_groups
        size = tl.load(offsets_ptr + groups + 1, mask=ok, other=0) - tl.load(offsets_ptr + groups, mask=ok, other=0)
        risk = tl.load(risks_ptr + groups, mask=ok, other=0.0)
        counted = ok & (size >= 2)
        spread += tl.where(counted, (risk - mean) * (risk - mean), 0.0)
        slope = (1.0 + 2.0 * tl.cast(lambda_grad, tl.float32) * (risk - mean)) / counted_groups
        slope = tl.where(counted, slope / tl.maximum(size, 1).to(tl.float32), 0.0)
        tl.store(slopes_ptr + groups, slope, mask=ok & (need_grad != 0))
    risk_var = tl.sum(spread, axis=0) / counted_groups
    tl.store(loss_ptr, (mean + tl.cast(lambda_var, tl.float32) * risk_var).to(loss_ptr.dtype.element_ty))
    tl.store(var_ptr, risk_var)


@triton.jit
def _anchor_cosine_grad(
    c,
    s,
    log_r,
    positive,
    logit_lse,
    emphasis_lse,
    positive_weight,
    anchor_loss,
    inv_m,
    partners,
    inv_tau,
    eta,
    inv_eta,
):
    """dl_i/dc_ij through the weights too, for anchors along rows (stats as (BLOCK, 1) or
    (1, BLOCK) columns); see girl.cpp. Detached weights: `_detached_exponents`."""
    prob = tl.exp(s - logit_lse)
    w = partners * tl.exp(log_r - emphasis_lse)
    g = -inv_tau * inv_m * (tl.where(positive, w, 0.0) - positive_weight * prob)
    q = tl.where(positive, -inv_m * (s - logit_lse), 0.0)
    return g + w * (q - anchor_loss / partners) * (-(c - eta) * inv_eta * inv_eta)


@triton.jit
def _detached_exponents(logit_lse, emphasis_lse, positive_weight, inv_m, inv_tau):
    """`(A, B)` with which, weights detached, dl_i/dc_ij = exp(s_ij - A_i) - [j in P(i)]
    (|I_g| - 1) exp(log r_ij - B_i): `_anchor_cosine_grad`'s factors folded into the
    exponents (A = +inf for an anchor without positives: that term is 0)."""
    scale = inv_tau * inv_m
    return logit_lse - tl.log(scale * positive_weight), emphasis_lse - tl.log(scale)


@triton.jit
def _load_anchor_stats(stats_ptr, idx, ok, batch):
    """(LSE_i, log sum_k r_ik, W_i, l_i, 1 / max(|P(i)|, 1)) of the anchors `idx`."""
    anchor_loss = tl.load(stats_ptr + idx, mask=ok, other=0.0)
    logit_lse = tl.load(stats_ptr + 2 * batch + idx, mask=ok, other=0.0)
    emphasis_lse = tl.load(stats_ptr + 3 * batch + idx, mask=ok, other=0.0)
    positive_weight = tl.load(stats_ptr + 4 * batch + idx, mask=ok, other=0.0)
    inv_m = 1.0 / tl.maximum(tl.load(stats_ptr + 5 * batch + idx, mask=ok, other=1.0), 1.0)
    return logit_lse, emphasis_lse, positive_weight, anchor_loss, inv_m


@triton.jit
def _gradient_kernel(
    z_ptr,
    order_ptr,
    labels_ptr,
    offsets_ptr,
    saved_ptr,
    grad_loss_ptr,
    out_ptr,
    tau,
    eta,
    batch,
    width,
    num_groups,
    search_steps,
    DETACH_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SLICE: tl.constexpr,
    PRECISION: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """out[order[rows], slice] = dloss/dz for the program's anchors and its SLICE features
    (grid axis 1), times the upstream gradient `grad_loss`, in out's dtype."""
    rows, row_ok, row_samples, group, start, end, row_labels, first, last = _anchor_tile(
        order_ptr, labels_ptr, offsets_ptr, tl.program_id(0), batch, num_groups, search_steps, BLOCK_M
    )
    partners = ((end - start).to(tl.float32) - 1.0)[:, None]
    slope = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(saved_ptr + _NUM_STATS * batch + group)
    row_norm = tl.load(saved_ptr + batch + rows, mask=row_ok, other=1.0)
    inv_rows = _inverse_norm(row_norm)
    inv_tau = 1.0 / tl.cast(tau, tl.float32)
    eta = tl.cast(eta, tl.float32)
    inv_eta = 1.0 / eta
    lse_i, emph_i, wpos_i, loss_i, inv_m_i = _load_anchor_stats(saved_ptr, rows, row_ok, batch)
    if DETACH_WEIGHTS:
        logit_i, emph_i_shift = _detached_exponents(lse_i, emph_i, wpos_i, inv_m_i, inv_tau)
    k = tl.program_id(1).to(tl.int64) * SLICE + tl.arange(0, SLICE)
    k_ok = k < width
    d_features = tl.zeros((BLOCK_M, SLICE), dtype=tl.float32)
    projection = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # f_i . dF_i = sum_j H_ij c_ij; with every feature in this program's slice, from dF itself
    # after the loop (once per anchor instead of once per pair).
    whole_rows = width <= SLICE
    for c0 in range(first, last, BLOCK_N):
        cols, col_ok, col_samples, col_labels = _columns(order_ptr, labels_ptr, c0, last, BLOCK_N)
        acc, _ = _raw_products(
            z_ptr, row_samples, row_ok, col_samples, col_ok, width, BLOCK_K, PRECISION, NATIVE_BF16, NUM_STAGES, False
        )
        inv_cols = _inverse_norm(tl.load(saved_ptr + batch + cols, mask=col_ok, other=1.0))
        c = _scaled_cosines(acc, inv_rows, inv_cols)
        s, log_r = _pair_logits(c, inv_tau, eta, inv_eta)
        partner, positive = _pair_masks(rows, row_ok, start, end, row_labels, cols, col_labels)
        lse_j, emph_j, wpos_j, loss_j, inv_m_j = _load_anchor_stats(saved_ptr, cols, col_ok, batch)
        if DETACH_WEIGHTS:
            # g_ij = exp(s_ij - A_i) - [j in P(i)] (|I_g| - 1) exp(log r_ij - B_i) (see
            # `_detached_exponents`): two exponentials per pair and side.
            logit_j, emph_j_shift = _detached_exponents(lse_j, emph_j, wpos_j, inv_m_j, inv_tau)
            softmax_part = tl.exp(s - logit_i[:, None]) + tl.exp(s - logit_j[None, :])
            weight_part = tl.exp(log_r - emph_i_shift[:, None]) + tl.exp(log_r - emph_j_shift[None, :])
            g_sum = softmax_part - partners * tl.where(positive, weight_part, 0.0)
        else:
            g_ij = _anchor_cosine_grad(
                c,
                s,
                log_r,
                positive,
                lse_i[:, None],
                emph_i[:, None],
                wpos_i[:, None],
                loss_i[:, None],
                inv_m_i[:, None],
                partners,
                inv_tau,
                eta,
                inv_eta,
            )
            g_ji = _anchor_cosine_grad(
                c,
                s,
                log_r,
                positive,
                lse_j[None, :],
                emph_j[None, :],
                wpos_j[None, :],
                loss_j[None, :],
                inv_m_j[None, :],
                partners,
                inv_tau,
                eta,
                inv_eta,
            )
            g_sum = g_ij + g_ji
        h = tl.where(partner, slope[:, None] * g_sum, 0.0)
        if not whole_rows:
            projection += tl.sum(h * c, axis=1)
        # H f = (H / ||z_cols||) z: the partners' norms scale the tile, not their slice (fewer
        # multiplies when the slice is wider than the anchor tile).
        z_cols = tl.load(
            z_ptr + col_samples[:, None] * width + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0
        )
        d_features = tl.dot(h * inv_cols[None, :], z_cols.to(tl.float32), d_features, input_precision=PRECISION)
    # f = z / max(||z||, eps): dz = (df - f (f . df)) / ||z|| when ||z|| >= eps, else df / eps.
    mask = row_ok[:, None] & k_ok[None, :]
    f = tl.load(z_ptr + row_samples[:, None] * width + k[None, :], mask=mask, other=0.0).to(tl.float32)
    if whole_rows:
        projection = inv_rows * tl.sum(f * d_features, axis=1)
    projection = tl.where(row_norm >= NORM_EPS, projection, 0.0)
    dz = inv_rows[:, None] * (d_features - f * inv_rows[:, None] * projection[:, None])
    tl.store(out_ptr + row_samples[:, None] * width + k[None, :], dz.to(out_ptr.dtype.element_ty), mask=mask)


def tile_span(batch: int, num_groups: int, block_n: int) -> int:
    """Column tiles `tile_i .. tile_i + span - 1` hold every partner of tile `tile_i`'s
    anchors when no group is larger than the random partition's largest, `cdiv(B, G)`."""
    return min(triton.cdiv(batch, block_n), (block_n + triton.cdiv(batch, num_groups) - 2) // block_n + 1)


def band_programs(batch: int, num_groups: int, block_n: int) -> int:
    """Programs of the forward: `min(span, T - tile)` per tile of T."""
    num_tiles, span = triton.cdiv(batch, block_n), tile_span(batch, num_groups, block_n)
    return sum(min(span, num_tiles - tile) for tile in range(num_tiles))


def tile_plan(batch: int, num_groups: int) -> tuple[int, int]:
    """`(BLOCK_M, BLOCK_N)` of the forward: square pair tiles as wide as the random
    partition's largest group (`cdiv(B, G)`, 16 to MAX_TILE), halved (down to 16) while the
    band holds at most TARGET_PROGRAMS / 2 programs, so small batches still spread over the
    SMs; a program takes its tile pair in parts of BLOCK_M = 16 rows (wider parts spill on
    sm_80/sm_90). The grid never depends on the group sizes."""
    block_n = min(MAX_TILE, max(16, triton.next_power_of_2(triton.cdiv(batch, num_groups))))
    while block_n > 16 and 2 * band_programs(batch, num_groups, block_n) <= TARGET_PROGRAMS:
        block_n //= 2
    return FORWARD_BLOCK_M, block_n


def _band(num_tiles: int, span: int, device: torch.device) -> torch.Tensor:
    """`(P, 2)` int32 `(tile, step)` of the forward's programs, tile by tile; built on the
    device without a host read."""
    tiles = torch.arange(num_tiles, device=device)
    counts = (num_tiles - tiles).clamp(max=span)
    total = sum(min(span, num_tiles - tile) for tile in range(num_tiles))
    program_tiles = torch.repeat_interleave(tiles, counts, output_size=total)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=total)
    steps = torch.arange(total, device=device) - starts
    return torch.stack([program_tiles, steps], dim=1).to(torch.int32)


# The forward's program table depends only on (tiles, span, device): built once.
band = kept_between_calls(_band)


def gradient_plan(batch: int, width: int) -> tuple[int, int, int]:
    """`(BLOCK_M, BLOCK_N, SLICE)` of the gradient kernel (see GRAD_SLICES): slices of 32 for
    widths up to 32, else of 256 when `cdiv(B, BLOCK_M) * cdiv(C, 256)` programs reach
    TARGET_PROGRAMS, else of 128."""
    if width <= 32:
        slice_width = 32
    elif triton.cdiv(batch, GRAD_BLOCK_M) * triton.cdiv(width, 256) >= TARGET_PROGRAMS:
        slice_width = 256
    else:
        slice_width = 128
    return GRAD_BLOCK_M, GRAD_SLICES[slice_width], slice_width


def product_block_k(dtype: torch.dtype, precision: str) -> int:
    """The products' feature chunk for features of `dtype` at fp32 product `precision`."""
    return PRODUCT_BLOCK_K[dtype == torch.float32 and precision == "ieee"]


# Autotuned configs (triton_autotune; the first is the design configuration, which the
# interpreter runs). The tile plan and the warps are the launcher's design (the grid follows
# the plan; the other warp count spills on sm_80/sm_90 for most plans); a GPU picks how many
# stages pipeline the products' feature-chunk loads, 2 or 3 (the other loops are not
# pipelined: num_stages 1). Forward: 8 warps (4 spill on sm_80). Gradient: 8 warps
# for slices of 128 and 256; slices of 32 take 4 warps and unpipelined loads (exact fp32
# products spill otherwise), one config. Every config is checked spill-free.
FORWARD_PLANS = ((16, 16), (16, 32), (16, 64))  # what tile_plan picks


def _forward_configs() -> list[triton.Config]:
    return [triton.Config({"NUM_STAGES": stages}, num_warps=8, num_stages=1) for stages in (2, 3)]


def _gradient_configs(slice_width: int) -> list[triton.Config]:
    if slice_width == 32:
        return [triton.Config({"NUM_STAGES": 1}, num_warps=4, num_stages=1)]
    return [triton.Config({"NUM_STAGES": stages}, num_warps=8, num_stages=1) for stages in (2, 3)]


# Tuned per shape and product precision (tensor cores or the FMA pipe; the dtypes are part of
# every key), the gradient also per weight mode.
FORWARD_KEY = ["batch", "width", "num_groups", "PRECISION"]
GRADIENT_KEY = FORWARD_KEY + ["DETACH_WEIGHTS"]
_forward_kernels = {plan: autotune(_forward_configs(), key=FORWARD_KEY)(_forward_kernel) for plan in FORWARD_PLANS}
_gradient_kernels = {
    slice_width: autotune(_gradient_configs(slice_width), key=GRADIENT_KEY)(_gradient_kernel)
    for slice_width in GRAD_SLICES
}


def _search_steps(num_groups: int) -> int:
    return num_groups.bit_length()  # halvings of G + 1 candidates down to one


def _tile_constexprs(block_m: int, block_n: int, dtype: torch.dtype) -> dict:
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": product_block_k(dtype, triton_fp32_precision()),
        "PRECISION": triton_fp32_precision(),
        "NATIVE_BF16": not triton_interpreting(),
    }


# The random partition's boundaries depend only on (batch, G, device) and the kernels only
# read them: each is built once (three small launches per call otherwise).
# `partition_offsets(batch, num_groups, like)`.
partition_offsets = kept_between_calls(uniform_offsets)


def girl_forward(
    features: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    tau: float,
    eta: float,
    lambda_var: float,
    var_grad: bool,
    detach_weights: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(loss, group_risks (G,), risk_var, saved)`: the loss in the features' dtype, the
    others float32; `saved` is the backward's float32 statistics and slopes with `need_grad`,
    else empty. `detach_weights` only matters to the backward."""
    batch, width = features.shape
    num_groups = offsets.shape[0] - 1
    risks = features.new_empty((num_groups,), dtype=torch.float32)
    loss = features.new_empty(())
    risk_var = features.new_empty((), dtype=torch.float32)
    stats = features.new_empty((NUM_STATS * batch + num_groups if need_grad else batch,), dtype=torch.float32)
    block_m, block_n = tile_plan(batch, num_groups)
    num_tiles, span = triton.cdiv(batch, block_n), tile_span(batch, num_groups, block_n)
    programs = band(num_tiles, span, features)
    partials = NUM_PARTIALS * block_n
    row_parts = features.new_empty((num_tiles * span * partials,), dtype=torch.float32)
    col_parts = features.new_empty((num_tiles * (num_tiles - 1) // 2 * partials,), dtype=torch.float32)
    wrap_triton(_forward_kernels[block_m, block_n])[(programs.shape[0],)](
        features,
        order,
        labels,
        offsets,
        programs,
        row_parts,
        col_parts,
        stats,
        risks,
        loss,
        risk_var,
        zeroed_tickets(features, num_tiles + 1),
        batch,
        width,
        num_groups,
        _search_steps(num_groups),
        span,
        tau,
        eta,
        lambda_var,
        lambda_var if var_grad else 0.0,
        # A float flag: the JIT would specialize an int 1 into another binary than 0.
        float(need_grad),
        **_tile_constexprs(block_m, block_n, features.dtype),
    )
    return loss, risks, risk_var, stats if need_grad else stats[:0]


def girl_backward(
    grad_loss: torch.Tensor,
    saved: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    tau: float,
    eta: float,
    detach_weights: bool,
) -> torch.Tensor:
    """`grad_loss * dloss/dfeatures`, in the features' dtype, recomputed from `saved`."""
    batch, width = features.shape
    num_groups = offsets.shape[0] - 1
    grad_features = torch.empty_like(features)
    block_m, block_n, slice_width = gradient_plan(batch, width)
    wrap_triton(_gradient_kernels[slice_width])[(triton.cdiv(batch, block_m), triton.cdiv(width, slice_width))](
        features,
        order,
        labels,
        offsets,
        saved,
        grad_loss,
        grad_features,
        tau,
        eta,
        batch,
        width,
        num_groups,
        _search_steps(num_groups),
        DETACH_WEIGHTS=detach_weights,
        SLICE=slice_width,
        **_tile_constexprs(block_m, block_n, features.dtype),
    )
    return grad_features


# (B, C, G), as in benchmarks/bench_girl.py: the benchmark shapes, then one shape per further
# tile plan (forward BLOCK_M x BLOCK_N 16x16, gradient slices of 32); widths that are not
# multiples of 16 make the JIT build its less specialized binaries too.
AOT_SHAPES = [(80, 2048, 4), (1024, 2048, 8), (4096, 256, 1), (7, 7, 3)]
_AOT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def aot_variants() -> list[KernelVariant]:
    """The kernel variants the launchers pick at `AOT_SHAPES`: the forward and the gradient
    kernel (both `detach_weights`) per dtype, fp32 product precision and autotuned config."""
    variants = {}
    for batch, width, num_groups in AOT_SHAPES:
        block_m, block_n = tile_plan(batch, num_groups)
        grad_block_m, grad_block_n, slice_width = gradient_plan(batch, width)
        for dtype in _AOT_DTYPES:
            z = {"z_ptr": f"*{dtype}"}
            for precision in TRITON_FP32_PRECISIONS:
                block_k = product_block_k(_AOT_DTYPES[dtype], precision)
                forward = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "PRECISION": precision}
                plan = f"{dtype},{precision},BLOCK_M={block_m},BLOCK_N={block_n}"
                kernel = _forward_kernels[block_m, block_n]
                for variant in autotuned_variants(f"girl.forward[{plan}]", kernel, {**forward, "NATIVE_BF16": True}, z):
                    variants[variant.name] = variant
                gradient = {**forward, "BLOCK_M": grad_block_m, "BLOCK_N": grad_block_n}
                plan = f"{dtype},{precision},BLOCK_M={grad_block_m},BLOCK_N={grad_block_n},SLICE={slice_width}"
                for detach in (True, False):
                    constexprs = {"DETACH_WEIGHTS": detach, "SLICE": slice_width, **gradient, "NATIVE_BF16": True}
                    for variant in autotuned_variants(
                        f"girl.gradient[{plan},DETACH_WEIGHTS={detach}]", _gradient_kernels[slice_width], constexprs, z
                    ):
                        variants[variant.name] = variant
    return list(variants.values())


def aot_launches(shapes=AOT_SHAPES) -> None:
    """Runs the forward launcher with `need_grad` and the backward launcher at `shapes` on
    uninitialized CPU tensors, every dtype, fp32 product precision and `detach_weights` (for
    `triton_variants.capture_specializations`, which stops each launch)."""
    saved_precision = triton_fp32_precision()
    try:
        for batch, width, num_groups in shapes:
            order = torch.arange(batch)
            offsets = torch.arange(num_groups + 1) * batch // num_groups
            labels = torch.zeros(batch, dtype=torch.int64)
            for dtype in _AOT_DTYPES.values():
                features = torch.empty((batch, width), dtype=dtype)
                for precision in TRITON_FP32_PRECISIONS:
                    set_triton_fp32_precision(precision)
                    loss, _, _, saved = girl_forward(features, labels, order, offsets, 0.07, 0.2, 1.0, True, True, True)
                    for detach in (True, False):
                        girl_backward(torch.ones_like(loss), saved, features, labels, order, offsets, 0.07, 0.2, detach)
    finally:
        set_triton_fp32_precision(saved_precision)
