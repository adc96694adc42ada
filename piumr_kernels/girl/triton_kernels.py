"""Triton kernels for the GIRL group risks (SPEC §3) and their launchers (registered as
triton_op through `FusedOp` in op.py; same schemas as the cpp ops).

Layout: the samples in group order (`order`; `offsets`, `G + 1` boundaries into it) are cut
into tiles of `BLOCK_M` consecutive anchors, one program per tile, so the grid is
`cdiv(B, BLOCK_M)` whatever the group sizes. A tile may hold the end of one group and the
start of the next: each anchor finds its group by a binary search in `offsets`, and the
program streams over the partner range of all its anchors (first anchor's group start to
last anchor's group end) in blocks of `BLOCK_N`, masking pairs from different groups, with
online log-sum-exps, so nothing `B x B` is formed. Rows are read through `order` inside the
kernels (no gathered copy of the features).

Cosine tiles are raw products `z_i . z_j` accumulated over the feature width in chunks of
`BLOCK_K` with `tl.dot` (tensor cores: bf16/fp16 operands as they come, fp32 operands as
TF32 unless the exact mode is selected, see `precision.py`; fp32
accumulation), scaled by the inverse norms afterwards. A row whose squared norm overflows
has inverse norm 0 and gives cosine 0 (a zero row, as `F.normalize`), not `inf * 0`.

Kernels: the forward (per-sample stats, see `NUM_STATS`; row norms computed in the kernel);
the per-group risks (0 for groups of fewer than 2 members); with `need_grad`, the direction
`dL_g/dz` for a unit upstream gradient, `dF_i = sum_j (G_ij + G_ji) f_j` from the saved
stats and the normalization backward, one program per (anchor tile, feature slice), each
writing only its own block (accumulated in place over the partner blocks). The backward op
scales each row by its group's upstream gradient and scatters it to batch order (one
kernel). `girl_combine` / `girl_combine_backward` (op.py registers them as their own triton
ops, with autograd) finish the loss from the group risks (mean plus `lambda_var` times the
variance over the groups of at least 2 members) and its gradient, one program each.

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
from ..triton_variants import KernelVariant
from .precision import TRITON_FP32_PRECISIONS, set_triton_fp32_precision, triton_fp32_precision

BLOCK_K = 32  # feature-width chunk of the tile products
MAX_TILE = 64  # partners per tile for large groups
MAX_ANCHORS = 32  # anchors per tile, at most half the partners (64 x 64 and 32 x 32 direction tiles spill)
DIRECTION_WARPS = 8  # warps of the direction kernel (spill-free at every tile plan)
TARGET_PROGRAMS = 132  # the tile kernels' programs aim at one per SM of an H100 at least
ROW_BLOCK = 32  # rows per program of the scatter kernel
ROW_BLOCK_W = 128  # feature-width chunk of the scatter kernel
SCATTER_WARPS = 8  # 4 spill in its least specialized sm_90 binary
RISK_BLOCK = 128  # anchors per step of the group-risk kernel
COMBINE_BLOCK = 128  # groups per step of the combination kernels
NORM_EPS = tl.constexpr(1e-12)  # f = z / max(||z||, NORM_EPS)
# Per-sample statistics of the forward kernel, a (NUM_STATS, B) buffer with rows in this
# order: ||z_i||, LSE_i of the logits, log sum_k r_ik, sum_{j in P(i)} w_ij, l_i, |P(i)|.
NUM_STATS = 6


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
def _anchor_tile(order_ptr, labels_ptr, offsets_ptr, batch, num_groups, search_steps, BLOCK_M: tl.constexpr):
    """The program's anchors: positions in group order, sample ids, labels, group bounds."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < batch
    safe_rows = tl.minimum(rows, batch - 1)
    samples = tl.load(order_ptr + safe_rows)
    group = _group_of(offsets_ptr, safe_rows, num_groups, search_steps)
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    row_labels = tl.load(labels_ptr + samples)
    return rows, row_ok, samples, start, end, row_labels


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
def _cosine_tile(
    z_ptr,
    row_samples,
    col_samples,
    row_ok,
    col_ok,
    width,
    acc,
    col_sum_sq,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    COL_NORMS: tl.constexpr,
):
    """z_rows . z_cols over the width in BLOCK_K chunks (loads pipelined over NUM_STAGES),
    and with COL_NORMS the columns' squared norms from the same loads."""
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
        if COL_NORMS:
            b32 = b.to(tl.float32)
            col_sum_sq += tl.sum(b32 * b32, axis=1)
    return acc, col_sum_sq


@triton.jit
def _inverse_norm(norm):
    return 1.0 / tl.maximum(norm, NORM_EPS)


@triton.jit
def _scaled_cosines(acc, inv_rows, inv_cols):
    """Cosines from raw products; 0 where a row's norm overflowed (its inverse is 0)."""
    scale = inv_rows[:, None] * inv_cols[None, :]
    return tl.where(scale == 0.0, 0.0, acc * scale)


@triton.jit
def _forward_kernel(
    z_ptr,
    order_ptr,
    labels_ptr,
    offsets_ptr,
    stats_ptr,
    batch,
    width,
    num_groups,
    search_steps,
    tau,
    eta,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    rows, row_ok, row_samples, start, end, row_labels = _anchor_tile(
        order_ptr, labels_ptr, offsets_ptr, batch, num_groups, search_steps, BLOCK_M
    )
    inv_tau = 1.0 / tl.cast(tau, tl.float32)
    eta = tl.cast(eta, tl.float32)
    inv_eta = 1.0 / eta
    k = tl.arange(0, BLOCK_K)
    row_sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        z = tl.load(
            z_ptr + row_samples[:, None] * width + k0 + k[None, :],
            mask=row_ok[:, None] & (k0 + k < width)[None, :],
            other=0.0,
        ).to(tl.float32)
        row_sum_sq += tl.sum(z * z, axis=1)
    row_norm = tl.sqrt(row_sum_sq)
    inv_rows = _inverse_norm(row_norm)
    logit_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    emph_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    emph_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_count = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lanes = tl.arange(0, BLOCK_N).to(tl.int64)
    first = tl.min(tl.where(row_ok, start, batch), axis=0)
    last = tl.max(tl.where(row_ok, end, 0), axis=0)
    for c0 in range(first, last, BLOCK_N):
        cols = c0 + lanes
        col_ok = cols < last
        col_samples = tl.load(order_ptr + cols, mask=col_ok, other=0)
        col_labels = tl.load(labels_ptr + col_samples, mask=col_ok, other=-1)
        acc, col_sum_sq = _cosine_tile(
            z_ptr,
            row_samples,
            col_samples,
            row_ok,
            col_ok,
            width,
            tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
            tl.zeros((BLOCK_N,), dtype=tl.float32),
            BLOCK_K,
            PRECISION,
            NATIVE_BF16,
            NUM_STAGES,
            True,
        )
        c = _scaled_cosines(acc, inv_rows, _inverse_norm(tl.sqrt(col_sum_sq)))
        partner = (
            row_ok[:, None]
            & (cols[None, :] >= start[:, None])
            & (cols[None, :] < end[:, None])
            & (rows[:, None] != cols[None, :])
        )
        positive = partner & (row_labels[:, None] == col_labels[None, :])
        s = c * inv_tau
        d = (c - eta) * inv_eta
        log_r = -0.5 * d * d
        s_masked = tl.where(partner, s, float("-inf"))
        log_r_masked = tl.where(partner, log_r, float("-inf"))
        new_logit_max = tl.maximum(logit_max, tl.max(s_masked, axis=1))
        new_emph_max = tl.maximum(emph_max, tl.max(log_r_masked, axis=1))
        # A row with no partner yet keeps -inf maxima; shift by 0 there so no inf - inf.
        logit_shift = tl.where(new_logit_max == float("-inf"), 0.0, new_logit_max)
        emph_shift = tl.where(new_emph_max == float("-inf"), 0.0, new_emph_max)
        logit_scale = tl.exp(logit_max - logit_shift)
        emph_scale = tl.exp(emph_max - emph_shift)
        r = tl.exp(log_r_masked - emph_shift[:, None])
        logit_sum = logit_sum * logit_scale + tl.sum(tl.exp(s_masked - logit_shift[:, None]), axis=1)
        emph_sum = emph_sum * emph_scale + tl.sum(r, axis=1)
        pos_logit = pos_logit * emph_scale + tl.sum(tl.where(positive, r * s, 0.0), axis=1)
        pos_weight = pos_weight * emph_scale + tl.sum(tl.where(positive, r, 0.0), axis=1)
        pos_count += tl.sum(positive.to(tl.float32), axis=1)
        logit_max = new_logit_max
        emph_max = new_emph_max
    # Anchors without partners (groups of 1) keep neutral values so everything stays finite.
    has_partner = end - start >= 2
    logit_max = tl.where(has_partner, logit_max, 0.0)
    emph_max = tl.where(has_partner, emph_max, 0.0)
    logit_sum = tl.where(has_partner, logit_sum, 1.0)
    emph_sum = tl.where(has_partner, emph_sum, 1.0)
    partners = (end - start - 1).to(tl.float32)
    logit_lse = logit_max + tl.log(logit_sum)
    loss = -partners / emph_sum * (pos_logit - logit_lse * pos_weight) / tl.maximum(pos_count, 1.0)
    tl.store(stats_ptr + rows, row_norm, mask=row_ok)
    tl.store(stats_ptr + 1 * batch + rows, logit_lse, mask=row_ok)
    tl.store(stats_ptr + 2 * batch + rows, emph_max + tl.log(emph_sum), mask=row_ok)
    tl.store(stats_ptr + 3 * batch + rows, partners * pos_weight / emph_sum, mask=row_ok)
    tl.store(stats_ptr + 4 * batch + rows, loss, mask=row_ok)
    tl.store(stats_ptr + 5 * batch + rows, pos_count, mask=row_ok)


@triton.jit
def _group_risk_kernel(offsets_ptr, stats_ptr, risks_ptr, batch, BLOCK: tl.constexpr):
    """L_g = mean of the anchors' losses; 0 for a group of fewer than 2 members (left out)."""
    group = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK):
        total += tl.load(stats_ptr + 4 * batch + r0 + lanes, mask=r0 + lanes < end, other=0.0)
    risk = tl.sum(total, axis=0) / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(risks_ptr + group, tl.where(end - start >= 2, risk, 0.0))


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
    DETACH_WEIGHTS: tl.constexpr,
):
    """dl_i/dc_ij for anchors along rows (stats as (BLOCK, 1) or (1, BLOCK) columns); see girl.cpp."""
    prob = tl.exp(s - logit_lse)
    w = partners * tl.exp(log_r - emphasis_lse)
    g = -inv_tau * inv_m * (tl.where(positive, w, 0.0) - positive_weight * prob)
    if not DETACH_WEIGHTS:
        q = tl.where(positive, -inv_m * (s - logit_lse), 0.0)
        g += w * (q - anchor_loss / partners) * (-(c - eta) * inv_eta * inv_eta)
    return g


@triton.jit
def _load_anchor_stats(stats_ptr, idx, ok, batch):
    logit_lse = tl.load(stats_ptr + 1 * batch + idx, mask=ok, other=0.0)
    emphasis_lse = tl.load(stats_ptr + 2 * batch + idx, mask=ok, other=0.0)
    positive_weight = tl.load(stats_ptr + 3 * batch + idx, mask=ok, other=0.0)
    anchor_loss = tl.load(stats_ptr + 4 * batch + idx, mask=ok, other=0.0)
    inv_m = 1.0 / tl.maximum(tl.load(stats_ptr + 5 * batch + idx, mask=ok, other=1.0), 1.0)
    return logit_lse, emphasis_lse, positive_weight, anchor_loss, inv_m


@triton.jit
def _direction_kernel(
    z_ptr,
    order_ptr,
    labels_ptr,
    offsets_ptr,
    stats_ptr,
    direction_ptr,
    batch,
    width,
    slice_width,
    num_groups,
    search_steps,
    tau,
    eta,
    DETACH_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """direction[rows, slice] = dL_g/dz for the program's anchors (unit upstream gradient)
    over its slice of `slice_width` features (grid axis 1, a multiple of BLOCK_K): dF
    accumulates H_tile @ f[cols, chunk] per partner block in `direction` itself (the first
    block writes), then the normalization backward rewrites the slice in place with the
    projection f_i . dF_i = sum_j H_ij c_ij from the same tiles, so a program needs no other
    slice. Rows of groups of fewer than 2 members are 0."""
    rows, row_ok, row_samples, start, end, row_labels = _anchor_tile(
        order_ptr, labels_ptr, offsets_ptr, batch, num_groups, search_steps, BLOCK_M
    )
    inv_tau = 1.0 / tl.cast(tau, tl.float32)
    eta = tl.cast(eta, tl.float32)
    inv_eta = 1.0 / eta
    members = (end - start).to(tl.float32)
    partners = (members - 1.0)[:, None]
    gamma = (1.0 / tl.maximum(members, 1.0))[:, None]
    row_norm = tl.load(stats_ptr + rows, mask=row_ok, other=1.0)
    inv_rows = _inverse_norm(row_norm)
    lse_i, emph_i, wpos_i, loss_i, inv_m_i = _load_anchor_stats(stats_ptr, rows, row_ok, batch)
    lanes = tl.arange(0, BLOCK_N).to(tl.int64)
    # dF and the normalization pass walk the slice in half chunks: an fp32 (BLOCK_N x BLOCK_K)
    # partner chunk beside the product tiles spills at 16x64 tiles.
    DF_K: tl.constexpr = BLOCK_K // 2
    kf = tl.arange(0, DF_K)
    slice_start = tl.program_id(1).to(tl.int64) * slice_width
    slice_end = slice_start + slice_width
    projection = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first = tl.min(tl.where(row_ok, start, batch), axis=0)
    last = tl.max(tl.where(row_ok, end, 0), axis=0)
    for c0 in range(first, last, BLOCK_N):
        cols = c0 + lanes
        col_ok = cols < last
        col_samples = tl.load(order_ptr + cols, mask=col_ok, other=0)
        col_labels = tl.load(labels_ptr + col_samples, mask=col_ok, other=-1)
        inv_cols = _inverse_norm(tl.load(stats_ptr + cols, mask=col_ok, other=1.0))
        lse_j, emph_j, wpos_j, loss_j, inv_m_j = _load_anchor_stats(stats_ptr, cols, col_ok, batch)
        acc, _ = _cosine_tile(
            z_ptr,
            row_samples,
            col_samples,
            row_ok,
            col_ok,
            width,
            tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
            tl.zeros((BLOCK_N,), dtype=tl.float32),
            BLOCK_K,
            PRECISION,
            NATIVE_BF16,
            NUM_STAGES,
            False,
        )
        c = _scaled_cosines(acc, inv_rows, inv_cols)
        partner = (
            row_ok[:, None]
            & (cols[None, :] >= start[:, None])
            & (cols[None, :] < end[:, None])
            & (rows[:, None] != cols[None, :])
        )
        positive = partner & (row_labels[:, None] == col_labels[None, :])
        s = c * inv_tau
        d = (c - eta) * inv_eta
        log_r = -0.5 * d * d
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
            DETACH_WEIGHTS,
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
            DETACH_WEIGHTS,
        )
        h = tl.where(partner, gamma * (g_ij + g_ji), 0.0)
        projection += tl.sum(h * c, axis=1)
        for k0 in range(slice_start, slice_end, DF_K):
            k_ok = (k0 + kf < slice_end) & (k0 + kf < width)
            f_cols = (
                tl.load(
                    z_ptr + col_samples[:, None] * width + k0 + kf[None, :],
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                * inv_cols[:, None]
            )
            out = direction_ptr + rows[:, None] * width + k0 + kf[None, :]
            out_mask = row_ok[:, None] & k_ok[None, :]
            # The first partner block writes, the later ones add: no zero-filled buffer.
            previous = tl.load(out, mask=tl.where(c0 > first, out_mask, False), other=0.0)
            tl.store(out, tl.dot(h, f_cols, previous, input_precision=PRECISION), mask=out_mask)
    # f = z / max(||z||, eps): dz = (df - f (f . df)) / ||z|| when ||z|| >= eps, else df / eps.
    # The barrier makes this program's stores of dF visible to all its threads.
    tl.debug_barrier()
    projection = tl.where(row_norm >= NORM_EPS, projection, 0.0)
    counted = (members >= 2.0)[:, None]
    for k0 in range(slice_start, slice_end, DF_K):
        mask = row_ok[:, None] & ((k0 + kf < slice_end) & (k0 + kf < width))[None, :]
        f = tl.load(z_ptr + row_samples[:, None] * width + k0 + kf[None, :], mask=mask, other=0.0).to(tl.float32)
        out = direction_ptr + rows[:, None] * width + k0 + kf[None, :]
        dz = inv_rows[:, None] * (tl.load(out, mask=mask, other=0.0) - f * inv_rows[:, None] * projection[:, None])
        tl.store(out, tl.where(counted, dz, 0.0), mask=mask)


@triton.jit
def _scatter_kernel(
    grad_risks_ptr,
    direction_ptr,
    order_ptr,
    offsets_ptr,
    out_ptr,
    batch,
    width,
    num_groups,
    search_steps,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """out[order[i]] = grad_risks[group of i] * direction[i], in out's dtype."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < batch
    safe_rows = tl.minimum(rows, batch - 1)
    scale = tl.load(grad_risks_ptr + _group_of(offsets_ptr, safe_rows, num_groups, search_steps)).to(tl.float32)
    samples = tl.load(order_ptr + safe_rows)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    mask = row_ok[:, None] & (cols < width)[None, :]
    d = tl.load(direction_ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)
    tl.store(
        out_ptr + samples[:, None] * width + cols[None, :], (d * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _counted_risks(risks_ptr, offsets_ptr, groups, num_groups):
    """(1 for groups of at least 2 members else 0, the risk) for `groups`; 0, 0 past the end."""
    ok = groups < num_groups
    sizes = tl.load(offsets_ptr + groups + 1, mask=ok, other=0) - tl.load(offsets_ptr + groups, mask=ok, other=0)
    return (sizes >= 2).to(tl.float32), tl.load(risks_ptr + groups, mask=ok, other=0.0)


@triton.jit
def _counted_mean(risks_ptr, offsets_ptr, num_groups, BLOCK: tl.constexpr):
    """(max(G', 1), mean risk over the G' counted groups)."""
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    count = tl.zeros((BLOCK,), dtype=tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for g0 in range(0, num_groups, BLOCK):
        weight, risk = _counted_risks(risks_ptr, offsets_ptr, g0 + lanes, num_groups)
        count += weight
        total += weight * risk
    counted = tl.maximum(tl.sum(count, axis=0), 1.0)
    return counted, tl.sum(total, axis=0) / counted


@triton.jit
def _combine_kernel(risks_ptr, offsets_ptr, loss_ptr, var_ptr, num_groups, lambda_var, BLOCK: tl.constexpr):
    """loss = mean L_g + lambda_var * Var L_g over the counted groups (one program)."""
    counted, mean = _counted_mean(risks_ptr, offsets_ptr, num_groups, BLOCK)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    spread = tl.zeros((BLOCK,), dtype=tl.float32)
    for g0 in range(0, num_groups, BLOCK):
        weight, risk = _counted_risks(risks_ptr, offsets_ptr, g0 + lanes, num_groups)
        spread += weight * (risk - mean) * (risk - mean)
    risk_var = tl.sum(spread, axis=0) / counted
    tl.store(loss_ptr, mean + tl.cast(lambda_var, tl.float32) * risk_var)
    tl.store(var_ptr, risk_var)


@triton.jit
def _combine_backward_kernel(
    grad_loss_ptr,
    risks_ptr,
    offsets_ptr,
    grad_risks_ptr,
    num_groups,
    lambda_var,
    VAR_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dloss/dL_g = w_g / G' (1 + 2 lambda_var (L_g - mean)) with var_grad, else w_g / G'
    (w_g: counted or not), times the upstream gradient (one program)."""
    counted, mean = _counted_mean(risks_ptr, offsets_ptr, num_groups, BLOCK)
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for g0 in range(0, num_groups, BLOCK):
        groups = g0 + lanes
        weight, risk = _counted_risks(risks_ptr, offsets_ptr, groups, num_groups)
        grad = grad_loss * weight / counted
        if VAR_GRAD:
            grad *= 1.0 + 2.0 * tl.cast(lambda_var, tl.float32) * (risk - mean)
        tl.store(grad_risks_ptr + groups, grad, mask=groups < num_groups)


def tile_plan(batch: int, num_groups: int) -> tuple[int, int]:
    """`(BLOCK_M, BLOCK_N)`: partner blocks as wide as the random partition's largest group
    (`cdiv(B, G)`, 16 to MAX_TILE); anchor tiles start at half that (16 to MAX_ANCHORS) and
    are halved (down to 16)
    while the grid `cdiv(B, BLOCK_M)` holds at most TARGET_PROGRAMS / 2 programs, so small
    batches still spread over the SMs. The grid never depends on the group sizes."""
    block_n = min(MAX_TILE, max(16, triton.next_power_of_2(triton.cdiv(batch, num_groups))))
    block_m = max(16, min(block_n // 2, MAX_ANCHORS))
    while block_m > 16 and 2 * triton.cdiv(batch, block_m) <= TARGET_PROGRAMS:
        block_m //= 2
    return block_m, block_n


def tile_launch_options(block_m: int, block_n: int) -> dict:
    """Warps of the forward kernel (2 for 16x16 tiles, 4 below 32x32, else 8; the direction kernel runs
    DIRECTION_WARPS); the feature-chunk loads of the products are pipelined over NUM_STAGES
    stages, the other loops are not (num_stages 1). Checked spill-free on sm_80/sm_90."""
    return {
        "num_warps": 2 if block_m * block_n <= 256 else 4 if block_m * block_n < 1024 else 8,
        "num_stages": 1,
        "NUM_STAGES": 2,
    }


def direction_slices(batch: int, width: int, block_m: int) -> tuple[int, int]:
    """`(slices, features per slice)` of the direction kernel. Each slice recomputes its
    tiles' cosines, so a grid of at least TARGET_PROGRAMS / 2 anchor tiles keeps one slice;
    fewer tiles get enough slices (whole BLOCK_K chunks) to reach 2 x TARGET_PROGRAMS
    programs where the width allows (small batches with wide features, C = 2048)."""
    chunks = triton.cdiv(width, BLOCK_K)
    tiles = triton.cdiv(batch, block_m)
    wanted = 1 if 2 * tiles >= TARGET_PROGRAMS else min(chunks, triton.cdiv(2 * TARGET_PROGRAMS, tiles))
    per_slice = triton.cdiv(chunks, wanted) * BLOCK_K
    return triton.cdiv(width, per_slice), per_slice


def _search_steps(num_groups: int) -> int:
    return num_groups.bit_length()  # halvings of G + 1 candidates down to one


def girl_forward(
    features: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    tau: float,
    eta: float,
    detach_weights: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(group_risks (G,), direction)`, both float32; `direction` is `dL_g/dz` in group
    order, `(B, C)` with `need_grad`, else `(0, C)`."""
    batch, width = features.shape
    num_groups = offsets.shape[0] - 1
    steps = _search_steps(num_groups)
    risks = features.new_empty((num_groups,), dtype=torch.float32)
    stats = features.new_empty((NUM_STATS, batch), dtype=torch.float32)
    block_m, block_n = tile_plan(batch, num_groups)
    tiles = (triton.cdiv(batch, block_m),)
    tile = {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": BLOCK_K,
        "PRECISION": triton_fp32_precision(),
        "NATIVE_BF16": not triton_interpreting(),
        **tile_launch_options(block_m, block_n),
    }
    wrap_triton(_forward_kernel)[tiles](
        features, order, labels, offsets, stats, batch, width, num_groups, steps, tau, eta, **tile
    )
    wrap_triton(_group_risk_kernel)[(num_groups,)](offsets, stats, risks, batch, BLOCK=RISK_BLOCK, num_stages=1)
    if not need_grad:
        return risks, features.new_empty((0, width), dtype=torch.float32)
    direction = features.new_empty((batch, width), dtype=torch.float32)
    slices, slice_width = direction_slices(batch, width, block_m)
    wrap_triton(_direction_kernel)[(tiles[0], slices)](
        features,
        order,
        labels,
        offsets,
        stats,
        direction,
        batch,
        width,
        slice_width,
        num_groups,
        steps,
        tau,
        eta,
        DETACH_WEIGHTS=detach_weights,
        **{**tile, "num_warps": DIRECTION_WARPS},
    )
    return risks, direction


def girl_backward(
    grad_risks: torch.Tensor,
    direction: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`grad_features[order[i]] = grad_risks[group of i] * direction[i]`, in `dtype`."""
    batch, width = direction.shape
    num_groups = offsets.shape[0] - 1
    grad_features = direction.new_empty((batch, width), dtype=dtype)
    grid = (triton.cdiv(batch, ROW_BLOCK), triton.cdiv(width, ROW_BLOCK_W))
    wrap_triton(_scatter_kernel)[grid](
        grad_risks,
        direction,
        order,
        offsets,
        grad_features,
        batch,
        width,
        num_groups,
        _search_steps(num_groups),
        BLOCK_R=ROW_BLOCK,
        BLOCK_W=ROW_BLOCK_W,
        num_warps=SCATTER_WARPS,
        num_stages=1,
    )
    return grad_features


def girl_combine(
    group_risks: torch.Tensor, offsets: torch.Tensor, lambda_var: float, var_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loss, risk_var)`, float32 scalars: `reference.combine_group_risks` in one launch,
    the counted groups read from `offsets`. `var_grad` only matters to the backward."""
    loss = group_risks.new_empty(())
    risk_var = group_risks.new_empty(())
    wrap_triton(_combine_kernel)[(1,)](
        group_risks, offsets, loss, risk_var, group_risks.shape[0], lambda_var, BLOCK=COMBINE_BLOCK, num_stages=1
    )
    return loss, risk_var


def girl_combine_backward(
    grad_loss: torch.Tensor, group_risks: torch.Tensor, offsets: torch.Tensor, lambda_var: float, var_grad: bool
) -> torch.Tensor:
    """`dloss/dgroup_risks` for the upstream `grad_loss`, float32 `(G,)`."""
    grad_risks = torch.empty_like(group_risks)
    wrap_triton(_combine_backward_kernel)[(1,)](
        grad_loss,
        group_risks,
        offsets,
        grad_risks,
        group_risks.shape[0],
        lambda_var,
        VAR_GRAD=var_grad,
        BLOCK=COMBINE_BLOCK,
        num_stages=1,
    )
    return grad_risks


# (B, C, G), as in benchmarks/bench_girl.py: the benchmark shapes, then one shape per further
# tile plan (BLOCK_M x BLOCK_N 16x16); widths that are not multiples of 16 make the JIT build
# its less specialized binaries too.
AOT_SHAPES = [(80, 2048, 4), (1024, 2048, 8), (4096, 256, 1), (7, 7, 3)]
_AOT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def aot_variants() -> list[KernelVariant]:
    """The kernel variants the launchers pick at `AOT_SHAPES`: forward and direction (both
    `detach_weights`) per dtype and fp32 product precision, the group risks, the scatter per
    output dtype."""
    variants = {}

    def add(name, kernel, constexprs, options=None, pointer_types=None):
        variants[name] = KernelVariant(name, kernel, constexprs, **(options or {}), pointer_types=pointer_types or {})

    add(f"girl.group_risk[BLOCK={RISK_BLOCK}]", _group_risk_kernel, {"BLOCK": RISK_BLOCK}, {"num_stages": 1})
    add("girl.combine", _combine_kernel, {"BLOCK": COMBINE_BLOCK}, {"num_stages": 1})
    for var_grad in (True, False):
        add(
            f"girl.combine_backward[VAR_GRAD={var_grad}]",
            _combine_backward_kernel,
            {"VAR_GRAD": var_grad, "BLOCK": COMBINE_BLOCK},
            {"num_stages": 1},
        )
    for batch, _, num_groups in AOT_SHAPES:
        block_m, block_n = tile_plan(batch, num_groups)
        options = tile_launch_options(block_m, block_n)
        warps = {"num_warps": options.pop("num_warps"), "num_stages": options.pop("num_stages")}
        for dtype in _AOT_DTYPES:
            z = {"z_ptr": f"*{dtype}"}
            add(
                f"girl.scatter[{dtype}]",
                _scatter_kernel,
                {"BLOCK_R": ROW_BLOCK, "BLOCK_W": ROW_BLOCK_W},
                {"num_warps": SCATTER_WARPS, "num_stages": 1},
                {"out_ptr": f"*{dtype}"},
            )
            for precision in TRITON_FP32_PRECISIONS:
                tile = {
                    "BLOCK_M": block_m,
                    "BLOCK_N": block_n,
                    "BLOCK_K": BLOCK_K,
                    "PRECISION": precision,
                    "NATIVE_BF16": True,
                    **options,
                }
                plan = f"{dtype},{precision},BLOCK_M={block_m},BLOCK_N={block_n}"
                add(f"girl.forward[{plan}]", _forward_kernel, tile, warps, z)
                for detach in (True, False):
                    add(
                        f"girl.direction[{plan},DETACH_WEIGHTS={detach}]",
                        _direction_kernel,
                        {"DETACH_WEIGHTS": detach, **tile},
                        {**warps, "num_warps": DIRECTION_WARPS},
                        z,
                    )
    return list(variants.values())


def aot_launches(shapes=AOT_SHAPES) -> None:
    """Runs the forward launcher with `need_grad`, the backward launcher and the combination
    launchers at `shapes` on uninitialized CPU tensors, every dtype, fp32 product precision,
    `detach_weights` and `var_grad` (for `triton_variants.capture_specializations`, which
    stops each launch)."""
    saved = triton_fp32_precision()
    try:
        for batch, width, num_groups in shapes:
            order = torch.arange(batch)
            offsets = torch.arange(num_groups + 1) * batch // num_groups
            labels = torch.zeros(batch, dtype=torch.int64)
            grad_risks = torch.ones(num_groups)
            for dtype in _AOT_DTYPES.values():
                features = torch.empty((batch, width), dtype=dtype)
                for precision in TRITON_FP32_PRECISIONS:
                    set_triton_fp32_precision(precision)
                    for detach in (True, False):
                        _, direction = girl_forward(features, labels, order, offsets, 0.07, 0.2, detach, True)
                girl_backward(grad_risks, direction, order, offsets, dtype)
            loss, _ = girl_combine(grad_risks, offsets, 1.0, True)
            for var_grad in (True, False):
                girl_combine_backward(loss, grad_risks, offsets, 1.0, var_grad)
    finally:
        set_triton_fp32_precision(saved)
