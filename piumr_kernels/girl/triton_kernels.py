"""Triton kernels for the GIRL group risks (SPEC §3) and their launchers (registered as
triton_op through `FusedOp` in op.py; same schemas as the cpp ops).

The forward launcher gathers the samples into group order (`order`; `offsets`, `G + 1`
boundaries into it). A program owns a block of `BLOCK` anchors of one group (grid
`(G, anchor blocks)`) and streams over the group's partners in blocks of `BLOCK` with
online log-sum-exps, so nothing `B x B` is formed. The grid comes from the shapes only:
any group may hold the whole batch (explicit ids), so every group gets `cdiv(B, BLOCK)`
anchor blocks and the programs past a group's end exit at once. `BLOCK` is the next power
of two of the random partition's largest group (`cdiv(B, G)`, a single partner block) up
to `SMALL_GROUP_MAX`, else `STREAM_BLOCK`. Cosine tiles accumulate over the feature width
in chunks of `BLOCK_C` with `tl.dot`, so any width works.

Kernels: row norms; the forward (per-sample stats, see `NUM_STATS`); the per-group risks;
the backward `dF_i = sum_j (G_ij + G_ji) f_j` (both terms from the saved stats, so each
program writes only its own rows); the normalization backward to `dz`. With `need_grad`
the forward runs the two backward kernels with unit upstream gradients to get
`direction = dL_g/dz`; the backward op only scales and scatters it (torch ops). Groups of
0 or 1 member give NaN/inf in the kernels (no partners); their risks and rows are masked
to 0 before anything leaves the launcher.
Every load is upcast to float32 at once (the interpreter mishandles bf16 arithmetic),
scalar arguments are cast to float32 in the kernels (Inductor passes float64), and
offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..triton_variants import KernelVariant
from .reference import group_sizes, position_groups

SMALL_GROUP_MAX = 64   # largest group bound served by one program per group
STREAM_BLOCK = 64      # anchors x partners per tile on the streaming path
BLOCK_C = 16           # feature-width chunk of the cosine dot products (16 keeps 64x64 tiles spill-free)
ROW_BLOCK_C = 256      # feature-width chunk of the per-row kernels
NORM_EPS = tl.constexpr(1e-12)  # f = z / max(||z||, NORM_EPS)
# Full fp32 products for the cosines (the logits are cosines / tau; TF32 would cost ~1e-2 there).
DOT_PRECISION = tl.constexpr("ieee")
# Per-sample statistics of the forward kernel, a (NUM_STATS, B) buffer with rows in this
# order: ||z_i||, LSE_i of the logits, log sum_k r_ik, sum_{j in P(i)} w_ij, l_i, |P(i)|.
NUM_STATS = 6


@triton.jit
def _row_norm_kernel(z_ptr, stats_ptr, width, BLOCK_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    sum_sq = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_W):
        z = tl.load(z_ptr + row * width + k0 + cols, mask=k0 + cols < width, other=0.0).to(tl.float32)
        sum_sq += z * z
    tl.store(stats_ptr + row, tl.sqrt(tl.sum(sum_sq, axis=0)))  # stats row 0: ||z_i||


@triton.jit
def _cosine_tile(z_ptr, rows, cols, row_ok, col_ok, inv_rows, inv_cols, width,
                 BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """f_rows . f_cols for a BLOCK x BLOCK tile, accumulated over the width in BLOCK_C chunks.
    The rows are normalized before the product, as the reference and cpp do: a row whose
    squared norm overflows (inv = 0) is then a zero row, where z . z would be inf * 0 = NaN."""
    k = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_C):
        k_ok = k0 + k < width
        a = tl.load(z_ptr + rows[:, None] * width + k0 + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(z_ptr + cols[:, None] * width + k0 + k[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(a * inv_rows[:, None], tl.trans(b * inv_cols[:, None]), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _forward_kernel(
    z_ptr, labels_ptr, offsets_ptr, stats_ptr, batch, width, tau, eta,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    n = end - start
    if block * BLOCK < n:
        inv_tau = 1.0 / tl.cast(tau, tl.float32)
        eta = tl.cast(eta, tl.float32)
        inv_eta = 1.0 / eta
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        rows = start + block * BLOCK + lanes
        row_ok = rows < end
        inv_rows = 1.0 / tl.maximum(tl.load(stats_ptr + rows, mask=row_ok, other=1.0), NORM_EPS)
        row_labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        logit_max = tl.full((BLOCK,), float("-inf"), tl.float32)
        emph_max = tl.full((BLOCK,), float("-inf"), tl.float32)
        logit_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        emph_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        pos_logit = tl.zeros((BLOCK,), dtype=tl.float32)
        pos_weight = tl.zeros((BLOCK,), dtype=tl.float32)
        pos_count = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, n, BLOCK):
            cols = start + c0 + lanes
            col_ok = cols < end
            inv_cols = 1.0 / tl.maximum(tl.load(stats_ptr + cols, mask=col_ok, other=1.0), NORM_EPS)
            col_labels = tl.load(labels_ptr + cols, mask=col_ok, other=-1)
            c = _cosine_tile(z_ptr, rows, cols, row_ok, col_ok, inv_rows, inv_cols, width, BLOCK, BLOCK_C)
            partner = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
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
        # Lanes past the group's end hold no partner; neutral values keep them finite.
        logit_max = tl.where(row_ok, logit_max, 0.0)
        emph_max = tl.where(row_ok, emph_max, 0.0)
        logit_sum = tl.where(row_ok, logit_sum, 1.0)
        emph_sum = tl.where(row_ok, emph_sum, 1.0)
        partners = (n - 1).to(tl.float32)
        logit_lse = logit_max + tl.log(logit_sum)
        loss = -partners / emph_sum * (pos_logit - logit_lse * pos_weight) / tl.maximum(pos_count, 1.0)
        tl.store(stats_ptr + 1 * batch + rows, logit_lse, mask=row_ok)
        tl.store(stats_ptr + 2 * batch + rows, emph_max + tl.log(emph_sum), mask=row_ok)
        tl.store(stats_ptr + 3 * batch + rows, partners * pos_weight / emph_sum, mask=row_ok)
        tl.store(stats_ptr + 4 * batch + rows, loss, mask=row_ok)
        tl.store(stats_ptr + 5 * batch + rows, pos_count, mask=row_ok)


@triton.jit
def _group_risk_kernel(offsets_ptr, stats_ptr, risks_ptr, batch, BLOCK: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK):
        total += tl.load(stats_ptr + 4 * batch + r0 + lanes, mask=r0 + lanes < end, other=0.0)
    tl.store(risks_ptr + group, tl.sum(total, axis=0) / (end - start).to(tl.float32))


@triton.jit
def _anchor_cosine_grad(c, s, log_r, positive, logit_lse, emphasis_lse, positive_weight, anchor_loss,
                        inv_m, partners, inv_tau, eta, inv_eta, DETACH_WEIGHTS: tl.constexpr):
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
def _backward_kernel(
    grad_risks_ptr, z_ptr, labels_ptr, offsets_ptr, stats_ptr, grad_f_ptr, batch, width, tau, eta,
    DETACH_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_f[rows] = sum over partner blocks of H_tile @ f[cols]; grad_f starts at zero."""
    group = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    n = end - start
    if block * BLOCK < n:
        inv_tau = 1.0 / tl.cast(tau, tl.float32)
        eta = tl.cast(eta, tl.float32)
        inv_eta = 1.0 / eta
        partners = (n - 1).to(tl.float32)
        gamma = tl.load(grad_risks_ptr + group).to(tl.float32) / n.to(tl.float32)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        k = tl.arange(0, BLOCK_C)
        rows = start + block * BLOCK + lanes
        row_ok = rows < end
        inv_rows = 1.0 / tl.maximum(tl.load(stats_ptr + rows, mask=row_ok, other=1.0), NORM_EPS)
        row_labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        lse_i, emph_i, wpos_i, loss_i, inv_m_i = _load_anchor_stats(stats_ptr, rows, row_ok, batch)
        for c0 in range(0, n, BLOCK):
            cols = start + c0 + lanes
            col_ok = cols < end
            inv_cols = 1.0 / tl.maximum(tl.load(stats_ptr + cols, mask=col_ok, other=1.0), NORM_EPS)
            col_labels = tl.load(labels_ptr + cols, mask=col_ok, other=-2)
            lse_j, emph_j, wpos_j, loss_j, inv_m_j = _load_anchor_stats(stats_ptr, cols, col_ok, batch)
            c = _cosine_tile(z_ptr, rows, cols, row_ok, col_ok, inv_rows, inv_cols, width, BLOCK, BLOCK_C)
            partner = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
            positive = partner & (row_labels[:, None] == col_labels[None, :])
            s = c * inv_tau
            d = (c - eta) * inv_eta
            log_r = -0.5 * d * d
            g_ij = _anchor_cosine_grad(c, s, log_r, positive, lse_i[:, None], emph_i[:, None], wpos_i[:, None],
                                       loss_i[:, None], inv_m_i[:, None], partners, inv_tau, eta, inv_eta,
                                       DETACH_WEIGHTS)
            g_ji = _anchor_cosine_grad(c, s, log_r, positive, lse_j[None, :], emph_j[None, :], wpos_j[None, :],
                                       loss_j[None, :], inv_m_j[None, :], partners, inv_tau, eta, inv_eta,
                                       DETACH_WEIGHTS)
            h = tl.where(partner, gamma * (g_ij + g_ji), 0.0)
            for k0 in range(0, width, BLOCK_C):
                k_ok = k0 + k < width
                f_cols = tl.load(z_ptr + cols[:, None] * width + k0 + k[None, :],
                                 mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                f_cols = f_cols * inv_cols[:, None]
                out = grad_f_ptr + rows[:, None] * width + k0 + k[None, :]
                out_mask = row_ok[:, None] & k_ok[None, :]
                partial = tl.dot(h, f_cols, input_precision=DOT_PRECISION)
                tl.store(out, tl.load(out, mask=out_mask, other=0.0) + partial, mask=out_mask)


@triton.jit
def _input_grad_kernel(z_ptr, stats_ptr, grad_f_ptr, grad_z_ptr, width, BLOCK_W: tl.constexpr):
    """f = z / max(||z||, eps): dz = (df - f (f . df)) / ||z|| when ||z|| >= eps, else df / eps."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    norm = tl.load(stats_ptr + row)
    inv = 1.0 / tl.maximum(norm, NORM_EPS)
    dot = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_W):
        ok = k0 + cols < width
        f = tl.load(z_ptr + row * width + k0 + cols, mask=ok, other=0.0).to(tl.float32) * inv
        dot += f * tl.load(grad_f_ptr + row * width + k0 + cols, mask=ok, other=0.0)
    projection = tl.where(norm >= NORM_EPS, tl.sum(dot, axis=0), 0.0)
    for k0 in range(0, width, BLOCK_W):
        ok = k0 + cols < width
        f = tl.load(z_ptr + row * width + k0 + cols, mask=ok, other=0.0).to(tl.float32) * inv
        df = tl.load(grad_f_ptr + row * width + k0 + cols, mask=ok, other=0.0)
        tl.store(grad_z_ptr + row * width + k0 + cols,
                 (inv * (df - f * projection)).to(grad_z_ptr.dtype.element_ty), mask=ok)


def tile_block(batch: int, num_groups: int) -> tuple[int, int]:
    """`(BLOCK, anchor blocks per group)`: one block per group when the random partition's
    largest group fits in SMALL_GROUP_MAX, else streaming; enough blocks for a group of the
    whole batch (explicit ids can put every sample in one group)."""
    typical = triton.cdiv(batch, num_groups)
    block = max(16, triton.next_power_of_2(typical)) if typical <= SMALL_GROUP_MAX else STREAM_BLOCK
    return block, triton.cdiv(batch, block)


def tile_launch_options(block: int) -> dict:
    """Warps and stages of the tile kernels: 8 warps from 32x32 tiles on, one stage (the
    feature chunks are small); checked spill-free on sm_80/sm_90 for every variant."""
    return {"num_warps": 4 if block <= 16 else 8, "num_stages": 1}


def _row_block(width: int) -> int:
    return min(ROW_BLOCK_C, max(16, triton.next_power_of_2(width)))


def girl_forward(
    features: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, tau: float,
    eta: float, detach_weights: bool, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(group_risks (G,), direction)`, both float32; `direction` is `dL_g/dz` in group
    order, `(B, C)` with `need_grad`, else `(0, C)`."""
    batch, width = features.shape
    num_groups = offsets.shape[0] - 1
    z = features.index_select(0, order)
    sorted_labels = labels.index_select(0, order)
    risks = features.new_empty((num_groups,), dtype=torch.float32)
    stats = features.new_empty((NUM_STATS, batch), dtype=torch.float32)
    block, blocks_per_group = tile_block(batch, num_groups)
    row_block = _row_block(width)
    tile_options = tile_launch_options(block)
    wrap_triton(_row_norm_kernel)[(batch,)](z, stats, width, BLOCK_W=row_block)
    wrap_triton(_forward_kernel)[(num_groups, blocks_per_group)](
        z, sorted_labels, offsets, stats, batch, width, tau, eta, BLOCK=block, BLOCK_C=BLOCK_C, **tile_options,
    )
    wrap_triton(_group_risk_kernel)[(num_groups,)](offsets, stats, risks, batch, BLOCK=block)
    counted = group_sizes(offsets) >= 2
    risks = torch.where(counted, risks, 0.0)
    if not need_grad:
        return risks, features.new_empty((0, width), dtype=torch.float32)
    unit = torch.ones((num_groups,), dtype=torch.float32, device=features.device)
    grad_f = torch.zeros((batch, width), dtype=torch.float32, device=features.device)
    direction = torch.empty((batch, width), dtype=torch.float32, device=features.device)
    wrap_triton(_backward_kernel)[(num_groups, blocks_per_group)](
        unit, z, sorted_labels, offsets, stats, grad_f, batch, width, tau, eta,
        DETACH_WEIGHTS=detach_weights, BLOCK=block, BLOCK_C=BLOCK_C, **tile_options,
    )
    wrap_triton(_input_grad_kernel)[(batch,)](z, stats, grad_f, direction, width, BLOCK_W=row_block)
    counted_rows = counted.index_select(0, position_groups(offsets, batch))
    return risks, torch.where(counted_rows[:, None], direction, 0.0)


def girl_backward(
    grad_risks: torch.Tensor, direction: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`grad_features[order[i]] = grad_risks[group of i] * direction[i]`, in `dtype`."""
    scale = grad_risks.to(direction.dtype).index_select(0, position_groups(offsets, order.shape[0]))
    rows = (direction * scale[:, None]).to(dtype)
    return torch.empty_like(rows).index_copy(0, order, rows)


# (B, C, G), as in benchmarks/bench_girl.py: the benchmark shapes, then one shape per further
# tile and row block the launchers pick (BLOCK 16, 32 and a single 64 block; BLOCK_W 16 to
# 128); some sizes are not multiples of 16 so the JIT's less specialized binaries are built too.
AOT_SHAPES = [(80, 2048, 4), (1024, 2048, 8), (4096, 256, 1), (7, 7, 3), (30, 20, 2), (12, 40, 3), (130, 100, 3)]
_AOT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def aot_variants() -> list[KernelVariant]:
    """The kernel variants the launchers pick at `AOT_SHAPES`: every kernel of the forward
    with `need_grad` (the backward kernels give the direction), fp32/fp16/bf16, both
    `detach_weights`."""
    variants = {}

    def add(name, kernel, constexprs, options=None, pointer_types=None):
        variants[name] = KernelVariant(name, kernel, constexprs, **(options or {}),
                                       pointer_types=pointer_types or {})

    for batch, width, num_groups in AOT_SHAPES:
        block, _ = tile_block(batch, num_groups)
        block_w = _row_block(width)
        options = tile_launch_options(block)
        tile = {"BLOCK": block, "BLOCK_C": BLOCK_C}
        add(f"girl.group_risk[BLOCK={block}]", _group_risk_kernel, {"BLOCK": block})
        for dtype in _AOT_DTYPES:
            z = {"z_ptr": f"*{dtype}"}
            add(f"girl.row_norm[{dtype},BLOCK_W={block_w}]", _row_norm_kernel, {"BLOCK_W": block_w}, pointer_types=z)
            add(f"girl.input_grad[{dtype},BLOCK_W={block_w}]", _input_grad_kernel, {"BLOCK_W": block_w},
                pointer_types=z)
            add(f"girl.forward[{dtype},BLOCK={block}]", _forward_kernel, tile, options, z)
            for detach in (True, False):
                add(f"girl.backward[{dtype},BLOCK={block},DETACH_WEIGHTS={detach}]", _backward_kernel,
                    {"DETACH_WEIGHTS": detach, **tile}, options, z)
    return list(variants.values())


def aot_launches(shapes=AOT_SHAPES) -> None:
    """Runs the forward launcher with `need_grad` at `shapes` on uninitialized CPU tensors,
    every dtype and both `detach_weights` (for `triton_variants.capture_specializations`,
    which stops each launch); the backward op launches no kernel."""
    for batch, width, num_groups in shapes:
        order = torch.arange(batch)
        offsets = torch.arange(num_groups + 1) * batch // num_groups
        labels = torch.zeros(batch, dtype=torch.int64)
        for dtype in _AOT_DTYPES.values():
            features = torch.empty((batch, width), dtype=dtype)
            for detach in (True, False):
                girl_forward(features, labels, order, offsets, 0.07, 0.2, detach, True)
