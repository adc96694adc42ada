"""Triton kernels for Sinkhorn–Knopp (SPEC §1) and their launchers (wrapped as triton_op in op.py).

Four tiers, picked by the launchers from the matrix size `(N, M)` (see `launch_plan`):
- **packed** (`N, M <= 8`): many matrices per program, a `[BLOCK_B, BLOCK_N, BLOCK_M]`
  register tile (64 hyper-connection 4x4 mixings per program);
- **one matrix** (padded tile up to 4096 elements: 64x64, 32x128, ...): the same
  register-resident kernel with `BLOCK_B = 1`, `num_warps` growing with the matrix;
- **streaming** (larger tiles up to 1024x1024 padded, including 128x128): `K` stays in
  global memory, using the factorization `P_t = diag(U) K diag(V)` (linear) or
  `L_t = K + f + g` (log). Each matrix is split into row slices, enough for the batch to
  fill the GPU (`stream_slices`), whose programs meet in-launch: the work items (stage,
  matrix, slice) are claimed from an int32 ticket queue in stage order and the last slice
  of a stage finishes it (the column step from the slices' partial sums). The forward
  streams tiles of whole rows: one pass over the slice per iteration (its row step fused
  with its share of the next column sums) and one to write `P`. The backward makes two
  passes per iteration;
- **streaming_wide** (past 1024 padded rows or columns): the same backward; the forward,
  one program per matrix, makes one pass per half-step over row or column tiles, with the
  scale vectors / potentials in small global buffers. It covers every size.

Programs of the same matrix wait for each other's stages (a spin on the matrix's finished
stage count): items are claimed in stage order, so every stage waited for is held by a
running program, whatever the number of programs resident. Under the interpreter one
program claims every item in order and never waits.

The backward recomputes the intermediate matrices from `K` and the forward's per-iteration
row/column scales or potentials (`O(n_iters * (N + M))` per matrix); the packed tier, up to
`RECOMPUTE_MAX_ITERS` iterations, stores none and replays the forward in registers from
checkpoints instead (`backward_reads_stats`). A forward without gradient
(`SAVE_STATS=False`) stores no stats.

Every load is upcast to float32 at once (the interpreter mishandles bf16 arithmetic) and
scalar arguments are cast to float32 inside the kernels (Inductor passes float64).
A scalar loop condition joins a mask as `tl.where(t > 0, mask, False)`, not `mask & (t > 0)`:
the interpreter gives the latter int32 data, which triton 3.9's interpreter rejects as a mask.
Offsets are int64 so batches past 2**31 elements index correctly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ..launch_state import is_last_program, zeroed_tickets
from ..triton_autotune import Autotuned, autotune
from ..triton_variants import KernelVariant, autotuned_variants

PACKED_MAX = 8  # N, M <= 8: many matrices per program
PACKED_ELEMENTS = 1024  # elements of one packed program's tile
REGISTER_MAX_ELEMENTS = 4096  # padded tile of a register-resident matrix (64x64, 32x128)
STREAM_ELEMENTS = 1024  # elements of one streaming tile (2048 spills the backward at 8 warps)
STREAM_MAX_COLS = 128  # widest streaming_wide tile (512 contiguous bytes in fp32)
# Streaming with whole rows per tile and U, V in registers up to 1024x1024 (padded): 8 values
# per thread each at 4 warps, and picking a tile's U costs at most as much as the tile.
STREAM_MAX_VECTOR = 1024
STREAM_MAX_ROWS = 64  # tallest streaming tile (128x8 spills the backward on sm_80)
STREAM_WARPS = 4
# Software pipelining of the loops that stream K tiles: the next tile's loads are issued
# while the current one is reduced.
STREAM_STAGES = tl.constexpr(2)
# The streaming kernels' configurations, tuned per shape on a GPU: the design one first (what
# the interpreter runs and the traffic model counts), then twice the warps per program (more
# loads in flight per SM). `maxnreg`: see `LaunchPlan.launch_options`.
STREAM_CONFIGS = [triton.Config({}, num_warps=4, maxnreg=255), triton.Config({}, num_warps=8, maxnreg=255)]
STREAM_TUNING_KEY = ["n_matrices", "n_rows", "n_cols", "n_slices"]
REGISTERS_PER_SM = 65536  # sm_80 / sm_90: also the most one program may hold
# The interpreter pays per tile operation, not per element, and has no registers to spill:
# it streams 4096-element tiles of any height so the tests stay fast.
INTERPRETED_STREAM_ELEMENTS = 4096
# Cap of the cumulative scales U, V in the linear backward (see _backward_register_kernel).
FLOAT32_MAX = tl.constexpr(torch.finfo(torch.float32).max)


# ---------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------


@triton.jit
def _as_float32(eps, row_sum, col_sum):
    """The scalar arguments in float32 (Inductor passes float64)."""
    return tl.cast(eps, tl.float32), tl.cast(row_sum, tl.float32), tl.cast(col_sum, tl.float32)


@triton.jit
def _stat_index(t, n_entries, entries, n_matrices):
    """Offset of iteration `t`'s vector `entries` in batch-last `(n_iters, n_entries, B)`
    stats, from the program's own matrix."""
    return (t * n_entries + entries).to(tl.int64) * n_matrices


@triton.jit
def _safe_scale(target, total, eps):
    """`target / (total + eps)`, 0 where the denominator is 0 (a zero row stays zero)."""
    denominator = total + eps
    nonzero = denominator > 0
    return tl.where(nonzero, target / tl.where(nonzero, denominator, 1.0), 0.0)


@triton.jit
def _logsumexp(x, AXIS: tl.constexpr):
    peak = tl.max(x, axis=AXIS)
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    return peak + tl.log(tl.sum(tl.exp(x - tl.expand_dims(peak, AXIS)), axis=AXIS))


@triton.jit
def _online_logsumexp(peak, total, x, AXIS: tl.constexpr):
    """Adds tile `x`, reduced along `AXIS`, to a running logsumexp kept as `(peak, total)`."""
    new_peak = tl.maximum(peak, tl.max(x, axis=AXIS))
    shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)
    total = total * tl.exp(peak - shift) + tl.sum(tl.exp(x - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return new_peak, total


@triton.jit
def _logsumexp_of(peak, total):
    """The logsumexp a running `(peak, total)` stands for."""
    shift = tl.where(peak == float("-inf"), 0.0, peak)
    return shift + tl.log(total)


@triton.jit
def _scaling(k, row_potential, col_potential, LOG_DOMAIN: tl.constexpr):
    """Linear: `U_i V_j` (entry of P over K); log: `exp(K_ij + f_i + g_j)` (the entry itself)."""
    if LOG_DOMAIN:
        return tl.exp(k + row_potential[:, None] + col_potential[None, :])
    else:
        return row_potential[:, None] * col_potential[None, :]


@triton.jit
def _entries(k, row_potential, col_potential, LOG_DOMAIN: tl.constexpr):
    """A `[rows, cols]` tile of `diag(U) K diag(V)` (linear) or `exp(K + f + g)` (log)."""
    if LOG_DOMAIN:
        return _scaling(k, row_potential, col_potential, LOG_DOMAIN)
    else:
        # K first: a zero row's capped U times a column scale above 1 is inf, times 0 NaN.
        return row_potential[:, None] * k * col_potential[None, :]


@triton.jit
def _normalized_sum(target, scale, eps, LOG_DOMAIN: tl.constexpr):
    """The row (column) sums right after a row (column) step: `target * s / (s + eps)`,
    i.e. `target - eps * scale` (0 for a zero row), exactly `target` in log domain."""
    if LOG_DOMAIN:
        return tl.zeros_like(scale) + target
    else:
        return tl.where(scale > 0, target - eps * scale, 0.0)


# ---------------------------------------------------------------------------------------
# Packed and one-matrix tiers: whole matrices in registers, [BLOCK_B, BLOCK_N, BLOCK_M]
# ---------------------------------------------------------------------------------------


@triton.jit
def _register_tile(
    n_matrices, n_rows, n_cols, n_iters, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr
):
    """This program's first matrix (int64) and int32 offsets/masks inside its tile, for the
    matrices and for their row/column stats (int32 tile offsets keep register use low)."""
    first = tl.program_id(0).to(tl.int64) * BLOCK_B
    local = tl.arange(0, BLOCK_B)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    matrix_ok = (local < n_matrices - first)[:, None]
    row_ok = matrix_ok & (rows < n_rows)[None, :]
    col_ok = matrix_ok & (cols < n_cols)[None, :]
    mask = row_ok[:, :, None] & col_ok[:, None, :]
    offsets = local[:, None, None] * (n_rows * n_cols) + rows[None, :, None] * n_cols + cols[None, None, :]
    # Stats are batch-last, (n_iters, N, B): the matrices of a program store each vector
    # entry as one contiguous run.
    row_stats = rows[None, :].to(tl.int64) * n_matrices + local[:, None]
    col_stats = cols[None, :].to(tl.int64) * n_matrices + local[:, None]
    return first, offsets, mask, row_stats, row_ok, col_stats, col_ok


@triton.jit
def _register_start(K_ptrs, mask, row_sum, col_sum, LOG_DOMAIN: tl.constexpr):
    """The loaded matrices (padding: -inf in log domain, 0 linear) and the row/column targets
    of the steps (log domain: their logarithms)."""
    if LOG_DOMAIN:
        x = tl.load(K_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        row_target = tl.log(row_sum)
        col_target = tl.log(col_sum)
    else:
        x = tl.load(K_ptrs, mask=mask, other=0.0).to(tl.float32)
        row_target = row_sum
        col_target = col_sum
    return x, row_target, col_target


@triton.jit
def _register_step(x, ok, target, eps, AXIS: tl.constexpr, LOG_DOMAIN: tl.constexpr):
    """A row (`AXIS=2`) or column (`AXIS=1`) step of `[BLOCK_B, BLOCK_N, BLOCK_M]` matrices:
    the new matrices and the step's vector (linear: the scale, `target / eps` on padding;
    log: the potential's change, 0 on padding)."""
    if LOG_DOMAIN:
        step = tl.where(ok, target - _logsumexp(x, AXIS), 0.0)
        x = x + tl.expand_dims(step, AXIS)
    else:
        step = _safe_scale(target, tl.sum(x, axis=AXIS), eps)
        x = x * tl.expand_dims(step, AXIS)
    return x, step


@triton.jit
def _register_saved_step(
    x,
    potential,
    ok,
    target,
    eps,
    stats_ptr,
    stats,
    offset,
    AXIS: tl.constexpr,
    LOG_DOMAIN: tl.constexpr,
    SAVE_STATS: tl.constexpr,
):
    """`_register_step`, storing its stat at `stats_ptr + stats + offset` with `SAVE_STATS`
    (linear: the scale; log: the running `potential` plus the step's change, returned with
    the new matrices)."""
    x, stat = _register_step(x, ok, target, eps, AXIS, LOG_DOMAIN)
    if LOG_DOMAIN:
        potential += stat
        stat = potential
    if SAVE_STATS:
        tl.store(stats_ptr + stats + offset, stat, mask=ok)
    return x, potential


@triton.jit
def _forward_register_kernel(
    K_ptr,
    P_ptr,
    row_stats_ptr,
    col_stats_ptr,
    n_matrices,
    n_rows,
    n_cols,
    n_iters,
    eps,
    row_sum,
    col_sum,
    LOG_DOMAIN: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """`SAVE_STATS`: store each iteration's row/column vectors for the backward (without it
    the stats pointers are 0-element buffers and never touched)."""
    eps, row_sum, col_sum = _as_float32(eps, row_sum, col_sum)
    first, offsets, mask, row_stats, row_ok, col_stats, col_ok = _register_tile(
        n_matrices, n_rows, n_cols, n_iters, BLOCK_B, BLOCK_N, BLOCK_M
    )
    K_ptr += first * n_rows * n_cols
    P_ptr += first * n_rows * n_cols
    row_stats_ptr += first
    col_stats_ptr += first
    row_step = n_rows.to(tl.int64) * n_matrices
    col_step = n_cols.to(tl.int64) * n_matrices
    x, row_target, col_target = _register_start(K_ptr + offsets, mask, row_sum, col_sum, LOG_DOMAIN)
    # Log domain: the potentials (unused in linear domain).
    f = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    g = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for t in range(n_iters):
        x, f = _register_saved_step(
            x, f, row_ok, row_target, eps, row_stats_ptr, row_stats, t * row_step, 2, LOG_DOMAIN, SAVE_STATS
        )
        x, g = _register_saved_step(
            x, g, col_ok, col_target, eps, col_stats_ptr, col_stats, t * col_step, 1, LOG_DOMAIN, SAVE_STATS
        )
    if LOG_DOMAIN:
        x = tl.exp(x)
    tl.store(P_ptr + offsets, x.to(P_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _register_iteration(x, row_ok, col_ok, row_target, col_target, eps, LOG_DOMAIN: tl.constexpr):
    """One forward iteration (row step, column step) of `[BLOCK_B, BLOCK_N, BLOCK_M]` matrices."""
    x, step = _register_step(x, row_ok, row_target, eps, 2, LOG_DOMAIN)
    x, step = _register_step(x, col_ok, col_target, eps, 1, LOG_DOMAIN)
    return x


@triton.jit
def _register_backward_step(grad, after_row, after_col, alpha, beta, last, inv_row, inv_col, LOG_DOMAIN: tl.constexpr):
    """The gradient through one iteration, from the matrices after its row and its column
    step (log domain: their exponentials) and its scales (linear); `last`: the final
    iteration, whose log-domain gradient starts as `dP * P`."""
    if LOG_DOMAIN:
        grad = tl.where(last, grad * after_col, grad)
        grad = grad - after_col * (tl.sum(grad, axis=1) * inv_col)[:, None, :]
        grad = grad - after_row * (tl.sum(grad, axis=2) * inv_row)[:, :, None]
    else:
        grad = beta[:, None, :] * (grad - (tl.sum(grad * after_col, axis=1) * inv_col)[:, None, :])
        grad = alpha[:, :, None] * (grad - (tl.sum(grad * after_row, axis=2) * inv_row)[:, :, None])
    return grad


@triton.jit
def _backward_register_kernel(
    grad_ptr,
    K_ptr,
    row_stats_ptr,
    col_stats_ptr,
    grad_K_ptr,
    n_matrices,
    n_rows,
    n_cols,
    n_iters,
    eps,
    row_sum,
    col_sum,
    LOG_DOMAIN: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Walks the iterations backwards with the gradient in registers: a column step
    `Y = X diag(beta)` maps `dY` to `beta * (dY - colsum(dY * Y) / col_sum)`, a row step
    likewise; in log domain the steps are softmax-like: `dX = dY - softmax * sum(dY)`.

    Step `t` needs the matrices after its row and its column step: rebuilt from `K` and the
    stored stats, or with `RECOMPUTE` (no stats stored) by replaying the forward from a
    checkpoint: the iterations go in segments of `REPLAY_SEGMENT` from the last; each
    segment replays `K` to its start once, then each of its steps replays from there (20
    iterations: 90 replayed iterations instead of 210 from `K` every time)."""
    eps, row_sum, col_sum = _as_float32(eps, row_sum, col_sum)
    inv_row = 1.0 / row_sum
    inv_col = 1.0 / col_sum
    first, offsets, mask, row_stats, row_ok, col_stats, col_ok = _register_tile(
        n_matrices, n_rows, n_cols, n_iters, BLOCK_B, BLOCK_N, BLOCK_M
    )
    grad_ptr += first * n_rows * n_cols
    K_ptr += first * n_rows * n_cols
    grad_K_ptr += first * n_rows * n_cols
    row_stats_ptr += first + row_stats
    col_stats_ptr += first + col_stats
    row_step = n_rows.to(tl.int64) * n_matrices
    col_step = n_cols.to(tl.int64) * n_matrices
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    k, row_target, col_target = _register_start(K_ptr + offsets, mask, row_sum, col_sum, LOG_DOMAIN)
    if RECOMPUTE:
        n_segments = tl.cdiv(n_iters, REPLAY_SEGMENT)
        for segment_step in range(n_segments):
            start = (n_segments - 1 - segment_step) * REPLAY_SEGMENT
            end = tl.minimum(start + REPLAY_SEGMENT, n_iters)
            checkpoint = k
            for _ in range(start):
                checkpoint = _register_iteration(checkpoint, row_ok, col_ok, row_target, col_target, eps, LOG_DOMAIN)
            for offset in range(end - start):
                t = end - 1 - offset
                x = checkpoint
                for _ in range(t - start):
                    x = _register_iteration(x, row_ok, col_ok, row_target, col_target, eps, LOG_DOMAIN)
                after_row, alpha = _register_step(x, row_ok, row_target, eps, 2, LOG_DOMAIN)
                after_col, beta = _register_step(after_row, col_ok, col_target, eps, 1, LOG_DOMAIN)
                if LOG_DOMAIN:
                    after_row = tl.exp(after_row)
                    after_col = tl.exp(after_col)
                # Neutral padding scales (as the stats loads give): a padding scale row_sum / eps
                # would grow the gradient's padding entries past float32, and inf * 0 is NaN.
                alpha = tl.where(row_ok, alpha, 1.0)
                beta = tl.where(col_ok, beta, 1.0)
                grad = _register_backward_step(
                    grad, after_row, after_col, alpha, beta, t == n_iters - 1, inv_row, inv_col, LOG_DOMAIN
                )
    else:
        if not LOG_DOMAIN:
            # Cumulative scales U_t = prod alpha_s, V_t = prod beta_s (s <= t), from t = T-1
            # down by division; a zero scale only occurs for a zero row/column of K, whose
            # recomputed entries are zero whatever U, V are, so 0 stands in for the quotient.
            # The products stop at the largest float32: a zero row's scale is row_sum / eps
            # every iteration, and an infinite U times its zero entries would be NaN in every
            # column sum (the reference keeps the overflow to that row's own gradient).
            u = tl.full((BLOCK_B, BLOCK_N), 1.0, tl.float32)
            v = tl.full((BLOCK_B, BLOCK_M), 1.0, tl.float32)
            for t in range(n_iters):
                u = tl.minimum(u * tl.load(row_stats_ptr + t * row_step, mask=row_ok, other=1.0), FLOAT32_MAX)
                v = tl.minimum(v * tl.load(col_stats_ptr + t * col_step, mask=col_ok, other=1.0), FLOAT32_MAX)
        for step in range(n_iters):
            t = n_iters - 1 - step
            if LOG_DOMAIN:
                f = tl.load(row_stats_ptr + t * row_step, mask=row_ok, other=0.0)
                g = tl.load(col_stats_ptr + t * col_step, mask=col_ok, other=0.0)
                after_col = tl.exp(k + f[:, :, None] + g[:, None, :])
                g = tl.load(col_stats_ptr + (t - 1) * col_step, mask=tl.where(t > 0, col_ok, False), other=0.0)
                after_row = tl.exp(k + f[:, :, None] + g[:, None, :])
                alpha, beta = f, g  # the log-domain step takes no scales
            else:
                alpha = tl.load(row_stats_ptr + t * row_step, mask=row_ok, other=1.0)
                beta = tl.load(col_stats_ptr + t * col_step, mask=col_ok, other=1.0)
                after_col = u[:, :, None] * k * v[:, None, :]
                v = tl.where(beta > 0, v / beta, 0.0)
                after_row = u[:, :, None] * k * v[:, None, :]
                u = tl.where(alpha > 0, u / alpha, 0.0)
            grad = _register_backward_step(
                grad, after_row, after_col, alpha, beta, step == 0, inv_row, inv_col, LOG_DOMAIN
            )
    tl.store(grad_K_ptr + offsets, grad.to(grad_K_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Streaming tier: one program per matrix, K streamed tile by tile every half-step
# ---------------------------------------------------------------------------------------


@triton.jit
def _span(start, lanes, n_entries):
    """Rows (columns) `start + lanes` of a tile and which of them exist."""
    entries = start + lanes
    return entries, entries < n_entries


@triton.jit
def _tile(rows, row_ok, cols, col_ok, n_cols):
    """The mask and int64 offsets of the `[rows, cols]` tile of a matrix."""
    return row_ok[:, None] & col_ok[None, :], rows[:, None].to(tl.int64) * n_cols + cols[None, :]


@triton.jit
def _load_stat(stats_ptr, t, n_entries, entries, ok, n_matrices, other):
    """Iteration `t`'s entries of a stats-shaped vector written earlier in the same launch by
    other programs (`.cg`: past L1)."""
    return tl.load(
        stats_ptr + _stat_index(t, n_entries, entries, n_matrices), mask=ok, other=other, cache_modifier=".cg"
    )


@triton.jit
def _ticket_counters(tickets_ptr, n_matrices):
    """The launch's tickets: the queue, then per matrix an arrival count, then per matrix its
    finished stages."""
    return tickets_ptr, tickets_ptr + 1, tickets_ptr + 1 + n_matrices


@triton.jit
def _claim(queue_ptr):
    """The next work item of the launch (int32 ticket)."""
    return tl.atomic_add(queue_ptr, 1, sem="relaxed")


@triton.jit
def _wait_for_stage(progress_ptr, stage):
    """Spins until the matrix has finished `stage` stages. Items are claimed in stage order,
    so the programs holding the earlier stages are running: the wait ends. Under the
    interpreter one program claims every item in order and never waits."""
    done = tl.atomic_add(progress_ptr, 0, sem="acquire")
    while done < stage:
        done = tl.atomic_add(progress_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _start_item(item, per_stage, n_slices, progress_ptr):
    """Work item `item`'s (stage, matrix, slice), once the matrix has finished the earlier stages."""
    stage = item // per_stage
    matrix = (item % per_stage // n_slices).to(tl.int64)
    part = item % n_slices
    _wait_for_stage(progress_ptr + matrix, stage)
    return stage, matrix, part


@triton.jit
def _end_stage(arrivals_ptr, progress_ptr, stage, n_stages):
    """The finishing program of a stage: resets the arrival count and publishes the stage
    (after the last stage, resets the progress for the next launch)."""
    tl.store(arrivals_ptr, 0)
    tl.debug_barrier()
    tl.atomic_xchg(progress_ptr, tl.where(stage < n_stages - 1, stage + 1, 0), sem="release")


@triton.jit
def _release_queue(queue_ptr, item, n_items):
    """The program making the launch's last claim (every other program has made its final
    one, so all items are done) resets the queue for the next launch."""
    if item == n_items + tl.num_programs(0) - 1:
        tl.store(queue_ptr, 0)


@autotune(STREAM_CONFIGS, key=STREAM_TUNING_KEY)
@triton.jit
def _forward_rows_kernel(
    K_ptr,
    P_ptr,
    row_stats_ptr,
    col_stats_ptr,
    row_scale_ptr,
    col_scale_ptr,
    partial_ptr,
    tickets_ptr,
    n_matrices,
    n_rows,
    n_cols,
    n_iters,
    n_slices,
    slice_tiles,
    eps,
    row_sum,
    col_sum,
    LOG_DOMAIN: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Each matrix is split into `n_slices` slices of `slice_tiles` row tiles (tiles of whole
    rows, `BLOCK_C >= M`); the work items are (stage, matrix, slice), claimed from a queue
    in that order by however many programs run. Stage `t < n_iters`: the slice's row step of
    iteration t (linear `U_i <- U_i * r / (U_i sum_j K_ij V_j + eps)`; log
    `f_i = log r - logsumexp_j(K_ij + g_j)`) fused with the slice's share of the next column
    sums (log: an online logsumexp, peak and total), stored as the slice's partial; the
    matrix's last slice to finish adds the partials in slice order and makes the column step.
    Stage `n_iters`: each slice writes its rows of `P = diag(U) K diag(V)` (log:
    `exp(K + f + g)`). `U`, `V` (log: `f`, `g`) live in `row_scale`/`col_scale`, written and
    re-read within the launch by other programs (hence `.cg` loads past L1). Tickets: the
    queue, then per matrix an arrival count and its finished stages."""
    eps, row_sum, col_sum = _as_float32(eps, row_sum, col_sum)
    NEUTRAL: tl.constexpr = 0.0 if LOG_DOMAIN else 1.0  # potential / scale before any step
    queue_ptr, arrivals_ptr, progress_ptr = _ticket_counters(tickets_ptr, n_matrices)
    tile_rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    per_stage = n_matrices * n_slices
    n_items = (n_iters + 1) * per_stage
    item = _claim(queue_ptr)
    while item < n_items:
        stage, matrix, part = _start_item(item, per_stage, n_slices, progress_ptr)
        K_matrix = K_ptr + matrix * n_rows * n_cols
        row_scale = row_scale_ptr + matrix * n_rows
        col_scale = col_scale_ptr + matrix * n_cols
        partial = partial_ptr + (matrix * n_slices + part) * 2 * n_cols
        first_tile = part * slice_tiles
        end_tile = tl.minimum(first_tile + slice_tiles, n_tiles)
        col_potential = tl.load(
            col_scale + cols, mask=tl.where(stage > 0, col_ok, False), other=NEUTRAL, cache_modifier=".cg"
        )
        if stage < n_iters:
            peak = tl.full((BLOCK_C,), float("-inf"), tl.float32)
            total = tl.zeros((BLOCK_C,), tl.float32)
            for tile in tl.range(first_tile, end_tile, num_stages=STREAM_STAGES):
                rows, row_ok = _span(tile * BLOCK_R, tile_rows, n_rows)
                mask, offsets = _tile(rows, row_ok, cols, col_ok, n_cols)
                if LOG_DOMAIN:
                    k = tl.load(K_matrix + offsets, mask=mask, other=float("-inf")).to(tl.float32)
                    new = tl.where(row_ok, tl.log(row_sum) - _logsumexp(k + col_potential[None, :], 1), 0.0)
                    x = k + new[:, None]
                    peak, total = _online_logsumexp(peak, total, x, 0)
                    stat = new
                else:
                    u = tl.load(
                        row_scale + rows, mask=tl.where(stage > 0, row_ok, False), other=1.0, cache_modifier=".cg"
                    )
                    k = tl.load(K_matrix + offsets, mask=mask, other=0.0).to(tl.float32)
                    row_total = tl.sum(k * col_potential[None, :], axis=1)
                    stat = _safe_scale(row_sum, u * row_total, eps)
                    # A zero row keeps scale 0 (stays finite however large alpha = row_sum/eps gets).
                    new = tl.where(row_total == 0, 0.0, u * stat)
                    total += tl.sum(new[:, None] * k, axis=0)
                if SAVE_STATS:
                    tl.store(row_stats_ptr + matrix + _stat_index(stage, n_rows, rows, n_matrices), stat, mask=row_ok)
                tl.store(row_scale + rows, new, mask=row_ok)
            tl.store(partial + cols, total, mask=col_ok)
            if LOG_DOMAIN:
                tl.store(partial + n_cols + cols, peak, mask=col_ok)
        else:
            for tile in tl.range(first_tile, end_tile, num_stages=STREAM_STAGES):
                rows, row_ok = _span(tile * BLOCK_R, tile_rows, n_rows)
                mask, offsets = _tile(rows, row_ok, cols, col_ok, n_cols)
                row_potential = tl.load(row_scale + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
                k = tl.load(K_matrix + offsets, mask=mask, other=0.0).to(tl.float32)
                p = _entries(k, row_potential, col_potential, LOG_DOMAIN)
                tl.store(P_ptr + matrix * n_rows * n_cols + offsets, p.to(P_ptr.dtype.element_ty), mask=mask)
        if is_last_program(arrivals_ptr, matrix, n_slices):
            if stage < n_iters:
                # Column step t from the slices' partials, added in slice order.
                peak = tl.full((BLOCK_C,), float("-inf"), tl.float32)
                total = tl.zeros((BLOCK_C,), tl.float32)
                for other in range(n_slices):
                    partial = partial_ptr + (matrix * n_slices + other) * 2 * n_cols
                    part_total = tl.load(partial + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
                    if LOG_DOMAIN:
                        part_peak = tl.load(
                            partial + n_cols + cols, mask=col_ok, other=float("-inf"), cache_modifier=".cg"
                        )
                        new_peak = tl.maximum(peak, part_peak)
                        shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)
                        total = total * tl.exp(peak - shift) + part_total * tl.exp(part_peak - shift)
                        peak = new_peak
                    else:
                        total += part_total
                if LOG_DOMAIN:
                    stat = tl.where(col_ok, tl.log(col_sum) - _logsumexp_of(peak, total), 0.0)
                    new = stat
                else:
                    stat = _safe_scale(col_sum, col_potential * total, eps)
                    new = tl.where(total == 0, 0.0, col_potential * stat)
                if SAVE_STATS:
                    tl.store(col_stats_ptr + matrix + _stat_index(stage, n_cols, cols, n_matrices), stat, mask=col_ok)
                tl.store(col_scale + cols, new, mask=col_ok)
            _end_stage(arrivals_ptr + matrix, progress_ptr + matrix, stage, n_iters + 1)
        item = _claim(queue_ptr)
    _release_queue(queue_ptr, item, n_items)


@triton.jit
def _wide_step(
    K_ptr,
    stats_ptr,
    scale_ptr,
    other_stats_ptr,
    other_scale_ptr,
    t,
    n_outer,
    n_inner,
    n_matrices,
    target,
    eps,
    tile_outer,
    tile_inner,
    AXIS: tl.constexpr,
    LOG_DOMAIN: tl.constexpr,
    SAVE_STATS: tl.constexpr,
):
    """Row step t (`AXIS=1`: rows outer, columns streamed) or column step t (`AXIS=0`) of
    `_forward_streaming_kernel`, tiles `[rows, cols]` either way. The other side's vector is
    the columns' of iteration t - 1 (none before the first) in a row step, the rows' of
    iteration t in a column step. Log: the potential from the online logsumexp, stored in
    the stats or, without them, in `scale`; linear: the step's scale (stored in the stats)
    and the running product `U` (`V`) in `scale`."""
    for outer_start in range(0, n_outer, tile_outer.shape[0]):
        outer, outer_ok = _span(outer_start, tile_outer, n_outer)
        peak = tl.full(tile_outer.shape, float("-inf"), tl.float32)
        total = tl.zeros(tile_outer.shape, tl.float32)
        for inner_start in tl.range(0, n_inner, tile_inner.shape[0], num_stages=STREAM_STAGES):
            inner, inner_ok = _span(inner_start, tile_inner, n_inner)
            if AXIS == 1:
                tile, offsets = _tile(outer, outer_ok, inner, inner_ok, n_inner)
                other_t = t - 1
                other_ok = tl.where(t > 0, inner_ok, False)
            else:
                tile, offsets = _tile(inner, inner_ok, outer, outer_ok, n_outer)
                other_t = t
                other_ok = inner_ok
            if LOG_DOMAIN:
                if SAVE_STATS:
                    other = tl.load(
                        other_stats_ptr + _stat_index(other_t, n_inner, inner, n_matrices), mask=other_ok, other=0.0
                    )
                else:
                    other = tl.load(other_scale_ptr + inner, mask=other_ok, other=0.0)
                x = tl.load(K_ptr + offsets, mask=tile, other=float("-inf")).to(tl.float32)
                peak, total = _online_logsumexp(peak, total, x + tl.expand_dims(other, 1 - AXIS), AXIS)
            else:
                other = tl.load(other_scale_ptr + inner, mask=other_ok, other=1.0 if AXIS == 1 else 0.0)
                k = tl.load(K_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
                total += tl.sum(k * tl.expand_dims(other, 1 - AXIS), axis=AXIS)
        if LOG_DOMAIN:
            potential = tl.log(target) - _logsumexp_of(peak, total)
            if SAVE_STATS:
                tl.store(stats_ptr + _stat_index(t, n_outer, outer, n_matrices), potential, mask=outer_ok)
            else:
                tl.store(scale_ptr + outer, potential, mask=outer_ok)
        else:
            scale = tl.load(scale_ptr + outer, mask=tl.where(t > 0, outer_ok, False), other=1.0)
            step = _safe_scale(target, scale * total, eps)
            if SAVE_STATS:
                tl.store(stats_ptr + _stat_index(t, n_outer, outer, n_matrices), step, mask=outer_ok)
            # A zero row (column) keeps scale 0 (stays finite however large step = target/eps gets).
            tl.store(scale_ptr + outer, tl.where(total == 0, 0.0, scale * step), mask=outer_ok)


@triton.jit
def _forward_streaming_kernel(
    K_ptr,
    P_ptr,
    row_stats_ptr,
    col_stats_ptr,
    row_scale_ptr,
    col_scale_ptr,
    n_matrices,
    n_rows,
    n_cols,
    n_iters,
    eps,
    row_sum,
    col_sum,
    LOG_DOMAIN: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Row step t: linear `rowsum_i = U_i * sum_j K_ij V_j`, `alpha = row_sum / (rowsum + eps)`,
    `U <- U * alpha`; log `f_i = log(row_sum) - logsumexp_j(K_ij + g_j)` (online logsumexp).
    Column steps alike. `U`, `V` live in `row_scale`/`col_scale` (linear); the log-domain
    potentials are the stats themselves with `SAVE_STATS`, else (no stats stored) they are
    overwritten every iteration in `row_scale`/`col_scale` too. A barrier orders each pass's
    vector stores before the next pass reads them from other threads."""
    matrix = tl.program_id(0).to(tl.int64)
    eps, row_sum, col_sum = _as_float32(eps, row_sum, col_sum)
    K_ptr += matrix * n_rows * n_cols
    P_ptr += matrix * n_rows * n_cols
    row_stats_ptr += matrix
    col_stats_ptr += matrix
    row_scale_ptr += matrix * n_rows
    col_scale_ptr += matrix * n_cols
    tile_rows = tl.arange(0, BLOCK_R)
    tile_cols = tl.arange(0, BLOCK_C)
    for t in range(n_iters):
        _wide_step(
            K_ptr,
            row_stats_ptr,
            row_scale_ptr,
            col_stats_ptr,
            col_scale_ptr,
            t,
            n_rows,
            n_cols,
            n_matrices,
            row_sum,
            eps,
            tile_rows,
            tile_cols,
            1,
            LOG_DOMAIN,
            SAVE_STATS,
        )
        tl.debug_barrier()
        _wide_step(
            K_ptr,
            col_stats_ptr,
            col_scale_ptr,
            row_stats_ptr,
            row_scale_ptr,
            t,
            n_cols,
            n_rows,
            n_matrices,
            col_sum,
            eps,
            tile_cols,
            tile_rows,
            0,
            LOG_DOMAIN,
            SAVE_STATS,
        )
        tl.debug_barrier()
    # Output pass: P = U K V (linear) or exp(K + f + g) (log).
    if LOG_DOMAIN and SAVE_STATS:
        row_potential_ptr = row_stats_ptr + (n_iters - 1).to(tl.int64) * n_rows * n_matrices
        col_potential_ptr = col_stats_ptr + (n_iters - 1).to(tl.int64) * n_cols * n_matrices
        potential_stride = n_matrices
    else:
        row_potential_ptr = row_scale_ptr
        col_potential_ptr = col_scale_ptr
        potential_stride = 1
    for row_start in range(0, n_rows, BLOCK_R):
        rows, row_ok = _span(row_start, tile_rows, n_rows)
        row_potential = tl.load(row_potential_ptr + rows.to(tl.int64) * potential_stride, mask=row_ok, other=0.0)
        for col_start in tl.range(0, n_cols, BLOCK_C, num_stages=STREAM_STAGES):
            cols, col_ok = _span(col_start, tile_cols, n_cols)
            tile, offsets = _tile(rows, row_ok, cols, col_ok, n_cols)
            col_potential = tl.load(col_potential_ptr + cols.to(tl.int64) * potential_stride, mask=col_ok, other=0.0)
            k = tl.load(K_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
            p = _entries(k, row_potential, col_potential, LOG_DOMAIN)
            tl.store(P_ptr + offsets, p.to(P_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _running_products(stats_ptr, products_ptr, entries, ok, n_entries, n_iters, n_matrices, STORE: tl.constexpr):
    """Linear domain: the running products `U_t = prod_{s <= t} alpha_s` (or `V_t` of the
    betas) of some entries, stored for every `t` with `STORE`; returns the last. Capped like
    the register tier's products (a zero row's scale overflows otherwise)."""
    product = tl.full(entries.shape, 1.0, tl.float32)
    for t in range(n_iters):
        index = _stat_index(t, n_entries, entries, n_matrices)
        product = tl.minimum(product * tl.load(stats_ptr + index, mask=ok, other=1.0), FLOAT32_MAX)
        if STORE:
            tl.store(products_ptr + index, product, mask=ok)
    return product


@autotune(STREAM_CONFIGS, key=STREAM_TUNING_KEY)
@triton.jit
def _backward_streaming_kernel(
    grad_ptr,
    K_ptr,
    row_stats_ptr,
    col_stats_ptr,
    row_potential_ptr,
    col_potential_ptr,
    row_work_ptr,
    col_work_ptr,
    partial_ptr,
    tickets_ptr,
    grad_K_ptr,
    n_matrices,
    n_rows,
    n_cols,
    n_iters,
    n_slices,
    slice_tiles,
    eps,
    row_sum,
    col_sum,
    LOG_DOMAIN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward in `H = dX * X` form, where every step only subtracts rank-one-scaled copies
    of the step's matrix: a column step `t` (`Y = P_{t+1}`) gives `H <- H - Y diag(w_t / c)`
    with `w_t = colsum(H)`, a row step `H <- H - diag(z_t / r) A_t` with `z_t = rowsum(H)`.
    Only the row/column sums `R`, `C` of `H` are tracked (one streamed matrix-vector
    product per half-step; the other sum follows from the known marginals), and at the
    end `dK = S_T * G - sum_t (S(t, t) * w_t / c + z_t / r * S(t, t-1))`, with
    `S(t, s) = U_t V_s^T` (linear) or `exp(K + f_t + g_s)` (log).

    Work items (stage, matrix, row slice) as in `_forward_rows_kernel`. Stage 0: the slice's
    share of `C = colsum(G * P_T)` (linear: after its rows' running products `U_t`); the
    last slice adds the shares, writes `V_t` (linear) and `w_{T-1}`. Stage `k = T - t`
    (`t = T-1 .. 0`): the slice's rows of `R` (`z_t`, `R`: row-local) and its share of the
    column step's `C` update; the last slice finishes `C` and writes `w_{t-1}`. Stage `T + 1`:
    the slice's rows of `dK`.

    `row_potential`/`col_potential` hold `U_t, V_t` (linear: the running products of the
    stats, written here first; stats-shaped) or `f_t, g_t` (log: the stats themselves).
    `row_work` is `(n_iters + 1, N)` per matrix: `z_t` then `R`; `col_work` likewise `w_t`
    then `C` (before the pending column update)."""
    eps, row_sum, col_sum = _as_float32(eps, row_sum, col_sum)
    NEUTRAL: tl.constexpr = 0.0 if LOG_DOMAIN else 1.0  # potential / scale before any step
    queue_ptr, arrivals_ptr, progress_ptr = _ticket_counters(tickets_ptr, n_matrices)
    tile_rows = tl.arange(0, BLOCK_R)
    tile_cols = tl.arange(0, BLOCK_C)
    last = n_iters - 1
    per_stage = n_matrices * n_slices
    n_stages = n_iters + 2
    n_items = n_stages * per_stage
    item = _claim(queue_ptr)
    while item < n_items:
        stage, matrix, part = _start_item(item, per_stage, n_slices, progress_ptr)
        grad = grad_ptr + matrix * n_rows * n_cols
        K_matrix = K_ptr + matrix * n_rows * n_cols
        row_stats = row_stats_ptr + matrix
        col_stats = col_stats_ptr + matrix
        row_potential = row_potential_ptr + matrix
        col_potential = col_potential_ptr + matrix
        z_ptr = row_work_ptr + matrix * (n_iters + 1) * n_rows
        w_ptr = col_work_ptr + matrix * (n_iters + 1) * n_cols
        R_ptr = z_ptr + n_iters * n_rows
        C_ptr = w_ptr + n_iters * n_cols
        partial = partial_ptr + (matrix * n_slices + part) * n_cols
        first_row = part * slice_tiles * BLOCK_R
        end_row = tl.minimum(first_row + slice_tiles * BLOCK_R, n_rows)
        t = n_iters - stage  # the step of stages 1 .. n_iters
        if stage == 0:
            if not LOG_DOMAIN:
                for row_start in range(first_row, end_row, BLOCK_R):
                    rows, row_ok = _span(row_start, tile_rows, n_rows)
                    _running_products(row_stats, row_potential, rows, row_ok, n_rows, n_iters, n_matrices, True)
                tl.debug_barrier()
            # The slice's share of C = colsum(G * P_T).
            for col_start in range(0, n_cols, BLOCK_C):
                cols, col_ok = _span(col_start, tile_cols, n_cols)
                if LOG_DOMAIN:
                    g = tl.load(col_stats + _stat_index(last, n_cols, cols, n_matrices), mask=col_ok, other=0.0)
                else:
                    g = _running_products(col_stats, col_potential, cols, col_ok, n_cols, n_iters, n_matrices, False)
                total = tl.zeros((BLOCK_C,), tl.float32)
                for row_start in tl.range(first_row, end_row, BLOCK_R, num_stages=STREAM_STAGES):
                    rows, row_ok = _span(row_start, tile_rows, n_rows)
                    tile, offsets = _tile(rows, row_ok, cols, col_ok, n_cols)
                    f = _load_stat(row_potential, last, n_rows, rows, row_ok, n_matrices, 0.0)
                    k = tl.load(K_matrix + offsets, mask=tile, other=0.0).to(tl.float32)
                    upstream = tl.load(grad + offsets, mask=tile, other=0.0).to(tl.float32)
                    total += tl.sum(upstream * _entries(k, f, g, LOG_DOMAIN), axis=0)
                tl.store(partial + cols, total, mask=col_ok)
        elif stage <= n_iters:
            # R <- R - P_{t+1} w_t / c (at the first step R starts as rowsum(G * P_T), P_T = P_{t+1}),
            # then row step t: z_t = R; R <- R - rowsum(A_t) * z_t / r.
            for row_start in range(first_row, end_row, BLOCK_R):
                rows, row_ok = _span(row_start, tile_rows, n_rows)
                f = _load_stat(row_potential, t, n_rows, rows, row_ok, n_matrices, 0.0)
                total = tl.load(R_ptr + rows, mask=tl.where(stage > 1, row_ok, False), other=0.0, cache_modifier=".cg")
                for col_start in tl.range(0, n_cols, BLOCK_C, num_stages=STREAM_STAGES):
                    cols, col_ok = _span(col_start, tile_cols, n_cols)
                    tile, offsets = _tile(rows, row_ok, cols, col_ok, n_cols)
                    g = _load_stat(col_potential, t, n_cols, cols, col_ok, n_matrices, 0.0)
                    w = tl.load(w_ptr + t * n_cols + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
                    k = tl.load(K_matrix + offsets, mask=tile, other=0.0).to(tl.float32)
                    upstream = tl.load(grad + offsets, mask=tl.where(stage == 1, tile, False), other=0.0).to(tl.float32)
                    total += tl.sum(_entries(k, f, g, LOG_DOMAIN) * (upstream - w[None, :] / col_sum), axis=1)
                alpha = tl.load(row_stats + _stat_index(t, n_rows, rows, n_matrices), mask=row_ok, other=0.0)
                tl.store(z_ptr + t * n_rows + rows, total, mask=row_ok)
                tl.store(
                    R_ptr + rows,
                    total - _normalized_sum(row_sum, alpha, eps, LOG_DOMAIN) * total / row_sum,
                    mask=row_ok,
                )
            tl.debug_barrier()
            # The slice's share of the update C <- C - A_t^T z_t / r, A_t = S(t, t-1) * K.
            for col_start in range(0, n_cols, BLOCK_C):
                cols, col_ok = _span(col_start, tile_cols, n_cols)
                g = _load_stat(col_potential, t - 1, n_cols, cols, tl.where(t > 0, col_ok, False), n_matrices, NEUTRAL)
                total = tl.zeros((BLOCK_C,), tl.float32)
                for row_start in tl.range(first_row, end_row, BLOCK_R, num_stages=STREAM_STAGES):
                    rows, row_ok = _span(row_start, tile_rows, n_rows)
                    tile, offsets = _tile(rows, row_ok, cols, col_ok, n_cols)
                    f = _load_stat(row_potential, t, n_rows, rows, row_ok, n_matrices, 0.0)
                    z = tl.load(z_ptr + t * n_rows + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
                    k = tl.load(K_matrix + offsets, mask=tile, other=0.0).to(tl.float32)
                    total += tl.sum(_entries(k, f, g, LOG_DOMAIN) * (z[:, None] / row_sum), axis=0)
                tl.store(partial + cols, total, mask=col_ok)
        else:
            # dK = S_T * G - sum_t (S(t, t) * w_t / c + z_t / r * S(t, t-1)).
            for row_start in range(first_row, end_row, BLOCK_R):
                rows, row_ok = _span(row_start, tile_rows, n_rows)
                for col_start in tl.range(0, n_cols, BLOCK_C, num_stages=STREAM_STAGES):
                    cols, col_ok = _span(col_start, tile_cols, n_cols)
                    tile, offsets = _tile(rows, row_ok, cols, col_ok, n_cols)
                    k = tl.load(K_matrix + offsets, mask=tile, other=0.0).to(tl.float32)
                    upstream = tl.load(grad + offsets, mask=tile, other=0.0).to(tl.float32)
                    f = _load_stat(row_potential, last, n_rows, rows, row_ok, n_matrices, 0.0)
                    g = _load_stat(col_potential, last, n_cols, cols, col_ok, n_matrices, 0.0)
                    result = _scaling(k, f, g, LOG_DOMAIN) * upstream
                    for s in range(n_iters):
                        f = _load_stat(row_potential, s, n_rows, rows, row_ok, n_matrices, 0.0)
                        g = _load_stat(col_potential, s, n_cols, cols, col_ok, n_matrices, 0.0)
                        w = tl.load(w_ptr + s * n_cols + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
                        result -= _scaling(k, f, g, LOG_DOMAIN) * (w[None, :] / col_sum)
                        g = _load_stat(
                            col_potential, s - 1, n_cols, cols, tl.where(s > 0, col_ok, False), n_matrices, NEUTRAL
                        )
                        z = tl.load(z_ptr + s * n_rows + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
                        result -= _scaling(k, f, g, LOG_DOMAIN) * (z[:, None] / row_sum)
                    tl.store(
                        grad_K_ptr + matrix * n_rows * n_cols + offsets,
                        result.to(grad_K_ptr.dtype.element_ty),
                        mask=tile,
                    )
        if is_last_program(arrivals_ptr, matrix, n_slices):
            if stage <= n_iters:
                # C from the slices' shares, added in slice order (stage 0: C = the sum;
                # later: C = the stored C minus the sum), then column step t - 1's
                # w = C and C <- C - colsum(P_t) * w / c, pending the next stage's update.
                for col_start in range(0, n_cols, BLOCK_C):
                    cols, col_ok = _span(col_start, tile_cols, n_cols)
                    total = tl.load(
                        C_ptr + cols, mask=tl.where(stage > 0, col_ok, False), other=0.0, cache_modifier=".cg"
                    )
                    for other in range(n_slices):
                        share = tl.load(
                            partial_ptr + (matrix * n_slices + other) * n_cols + cols,
                            mask=col_ok,
                            other=0.0,
                            cache_modifier=".cg",
                        )
                        total = tl.where(stage > 0, total - share, total + share)
                    if not LOG_DOMAIN:
                        if stage == 0:
                            _running_products(col_stats, col_potential, cols, col_ok, n_cols, n_iters, n_matrices, True)
                    if t > 0:
                        beta = tl.load(col_stats + _stat_index(t - 1, n_cols, cols, n_matrices), mask=col_ok, other=0.0)
                        tl.store(w_ptr + (t - 1) * n_cols + cols, total, mask=col_ok)
                        tl.store(
                            C_ptr + cols,
                            total - _normalized_sum(col_sum, beta, eps, LOG_DOMAIN) * total / col_sum,
                            mask=col_ok,
                        )
            _end_stage(arrivals_ptr + matrix, progress_ptr + matrix, stage, n_stages)
        item = _claim(queue_ptr)
    _release_queue(queue_ptr, item, n_items)


# ---------------------------------------------------------------------------------------
# Tier choice, launchers, ahead-of-time variants
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPlan:
    tier: str  # "packed" | "one_matrix" | "streaming" | "streaming_wide"
    constexprs: dict  # block sizes (LOG_DOMAIN is added per call)
    num_warps: int
    matrices_per_program: int

    @property
    def launch_options(self) -> dict:
        """Triton launch options: the warps and, except for packed programs, the block's whole
        register budget as `maxnreg`. Without it ptxas 13 (run by Triton 3.7 with
        --regAllocOptLevel=2) keeps a value or two in local memory (4-8 B of stack around the
        iteration loop) to reach a lower register count for occupancy, on several one_matrix
        and streaming binaries (e.g. the 64x64 forward at 16 warps on sm_90: 40 registers and
        8 B of stack). The cost: the 64x64 backward then holds 80-106 registers at 16 warps,
        one program per SM. Packed launches (thousands of programs, where occupancy matters)
        do not spill and keep ptxas' choice."""
        if self.tier == "packed":
            return {"num_warps": self.num_warps}
        return {"num_warps": self.num_warps, "maxnreg": min(255, REGISTERS_PER_SM // (32 * self.num_warps))}


def launch_plan(n_rows: int, n_cols: int, interpreted: bool = False) -> LaunchPlan:
    """The tier, block sizes and warps the launchers use for `(N, M)` matrices
    (`interpreted`: under TRITON_INTERPRET=1, where streaming tiles are larger).

    The register tier stops at a 4096-element tile: under Triton 3.7 a register-resident
    128x128 fp32 matrix spills on sm_80/sm_90 at 16 and at 32 warps (K, the gradient and
    per-element addresses and masks do not fit), so 128x128 streams from L1/L2 instead,
    still one program per matrix."""
    block_n, block_m = triton.next_power_of_2(n_rows), triton.next_power_of_2(n_cols)
    if n_rows <= PACKED_MAX and n_cols <= PACKED_MAX:
        block_b = PACKED_ELEMENTS // (block_n * block_m)
        return LaunchPlan("packed", {"BLOCK_B": block_b, "BLOCK_N": block_n, "BLOCK_M": block_m}, 4, block_b)
    if block_n * block_m <= REGISTER_MAX_ELEMENTS:
        # 8 elements per thread per live tile (64x64 spills at 8 warps, 16 per thread).
        num_warps = min(16, max(1, block_n * block_m // 256))
        return LaunchPlan("one_matrix", {"BLOCK_B": 1, "BLOCK_N": block_n, "BLOCK_M": block_m}, num_warps, 1)
    whole_rows = block_m <= STREAM_MAX_VECTOR and block_n <= STREAM_MAX_VECTOR
    block_c = block_m if whole_rows else min(STREAM_MAX_COLS, block_m)
    if interpreted:
        block_r = min(INTERPRETED_STREAM_ELEMENTS // block_c, block_n)
    else:
        block_r = max(1, min(STREAM_ELEMENTS // block_c, STREAM_MAX_ROWS, block_n))
    blocks = {"BLOCK_R": block_r, "BLOCK_C": block_c}
    return LaunchPlan("streaming" if whole_rows else "streaming_wide", blocks, STREAM_WARPS, 1)


# Programs a streaming launch aims at: 2 per SM of an H100 SXM (132 SMs) where the device
# is not a GPU (the interpreter, the traffic model), else 2 per SM of the device.
FILL_PROGRAMS = 264
MAX_SLICES = 16  # row slices per matrix: the last slice to finish adds up this many partials


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def stream_slices(plan: LaunchPlan, batch: int, n_rows: int, device: torch.device) -> tuple[int, int]:
    """`(slices per matrix, row tiles per slice)` of a streaming launch: one slice per matrix
    when the batch alone fills the GPU, else enough slices (at most `MAX_SLICES`, at least
    one row tile each) for `batch * slices` programs to fill it."""
    n_tiles = triton.cdiv(n_rows, plan.constexprs["BLOCK_R"])
    fill = 2 * _sm_count(device) if device.type == "cuda" else FILL_PROGRAMS
    wanted = min(MAX_SLICES, n_tiles, triton.cdiv(fill, batch))
    slice_tiles = triton.cdiv(n_tiles, wanted)
    return triton.cdiv(n_tiles, slice_tiles), slice_tiles


# Iterations up to which the packed backward replays the forward instead of reading stats.
RECOMPUTE_MAX_ITERS = 32
REPLAY_MAX_REGISTERS = 128
# Iterations per checkpoint segment of that replay (about sqrt(n_iters) at 20-32 iterations).
REPLAY_SEGMENT = tl.constexpr(5)


def backward_reads_stats(n_rows: int, n_cols: int, n_iters: int) -> bool:
    """Whether the backward reads per-iteration stats from the forward. Not in the packed tier
    up to `RECOMPUTE_MAX_ITERS` iterations: there the stats, `2 * n_iters * (N + M)` floats per
    matrix written and read back (20 iterations of 4x4: 20x the matrix), cost more than
    replaying the forward in registers (90 replayed iterations at 20: about 5 FLOPs per
    byte of stats traffic saved, where an H100 does 20 FLOPs per byte of HBM bandwidth and
    an A100 10)."""
    return launch_plan(n_rows, n_cols).tier != "packed" or n_iters > RECOMPUTE_MAX_ITERS


def sinkhorn_forward(
    K: torch.Tensor, n_iters: int, eps: float, log_domain: bool, row_sum: float, col_sum: float, save_stats: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(P, row_stats, col_stats)`, the stats batch-last `(n_iters, N, B)` float32 when
    `save_stats`, else `(n_iters, N, 0)`: the kernels then store no stats at all."""
    batch, n_rows, n_cols = K.shape
    P = torch.empty_like(K)
    stat_batch = batch if save_stats else 0
    row_stats = K.new_empty((n_iters, n_rows, stat_batch), dtype=torch.float32)
    col_stats = K.new_empty((n_iters, n_cols, stat_batch), dtype=torch.float32)
    if batch > 0:
        plan = launch_plan(n_rows, n_cols, interpreted=triton_interpreting())
        if plan.tier == "streaming":
            n_slices, slice_tiles = stream_slices(plan, batch, n_rows, K.device)
            wrap_triton(_forward_rows_kernel)[(batch * n_slices,)](
                K,
                P,
                row_stats,
                col_stats,
                K.new_empty((batch, n_rows), dtype=torch.float32),
                K.new_empty((batch, n_cols), dtype=torch.float32),
                K.new_empty((batch, n_slices, 2, n_cols), dtype=torch.float32),
                zeroed_tickets(K, 1 + 2 * batch),
                batch,
                n_rows,
                n_cols,
                n_iters,
                n_slices,
                slice_tiles,
                eps,
                row_sum,
                col_sum,
                LOG_DOMAIN=log_domain,
                SAVE_STATS=save_stats,
                **plan.constexprs,
            )
        elif plan.tier == "streaming_wide":
            # Running U, V (linear) or potentials (log without stats; with them they live in the stats).
            scaled = not (log_domain and save_stats)
            row_scale = K.new_empty((batch, n_rows) if scaled else (0,), dtype=torch.float32)
            col_scale = K.new_empty((batch, n_cols) if scaled else (0,), dtype=torch.float32)
            wrap_triton(_forward_streaming_kernel)[(batch,)](
                K,
                P,
                row_stats,
                col_stats,
                row_scale,
                col_scale,
                batch,
                n_rows,
                n_cols,
                n_iters,
                eps,
                row_sum,
                col_sum,
                LOG_DOMAIN=log_domain,
                SAVE_STATS=save_stats,
                **plan.launch_options,
                **plan.constexprs,
            )
        else:
            wrap_triton(_forward_register_kernel)[(triton.cdiv(batch, plan.matrices_per_program),)](
                K,
                P,
                row_stats,
                col_stats,
                batch,
                n_rows,
                n_cols,
                n_iters,
                eps,
                row_sum,
                col_sum,
                LOG_DOMAIN=log_domain,
                SAVE_STATS=save_stats,
                **plan.launch_options,
                **plan.constexprs,
            )
    return P, row_stats, col_stats


def sinkhorn_backward(
    grad_P: torch.Tensor,
    K: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    n_iters: int,
    eps: float,
    log_domain: bool,
    row_sum: float,
    col_sum: float,
) -> torch.Tensor:
    batch, n_rows, n_cols = K.shape
    grad_K = torch.empty_like(K)
    if batch == 0:
        return grad_K
    plan = launch_plan(n_rows, n_cols, interpreted=triton_interpreting())
    if plan.tier in ("streaming", "streaming_wide"):
        # Log domain: the potentials are the stats; linear: the kernel writes U_t, V_t there.
        row_potential = row_stats if log_domain else torch.empty_like(row_stats)
        col_potential = col_stats if log_domain else torch.empty_like(col_stats)
        n_slices, slice_tiles = stream_slices(plan, batch, n_rows, K.device)
        wrap_triton(_backward_streaming_kernel)[(batch * n_slices,)](
            grad_P,
            K,
            row_stats,
            col_stats,
            row_potential,
            col_potential,
            K.new_empty((batch, n_iters + 1, n_rows), dtype=torch.float32),
            K.new_empty((batch, n_iters + 1, n_cols), dtype=torch.float32),
            K.new_empty((batch, n_slices, n_cols), dtype=torch.float32),
            zeroed_tickets(K, 1 + 2 * batch),
            grad_K,
            batch,
            n_rows,
            n_cols,
            n_iters,
            n_slices,
            slice_tiles,
            eps,
            row_sum,
            col_sum,
            LOG_DOMAIN=log_domain,
            **plan.constexprs,
        )
    else:
        recompute = row_stats.shape[-1] == 0
        options = plan.launch_options
        if recompute:
            # ptxas aims the replaying 4x4 log-domain backward at 64 registers (8 programs per
            # SM) and spills 16 B on sm_80 to get there; a cap of 128 lets it keep everything.
            options = {**options, "maxnreg": REPLAY_MAX_REGISTERS}
        wrap_triton(_backward_register_kernel)[(triton.cdiv(batch, plan.matrices_per_program),)](
            grad_P,
            K,
            row_stats,
            col_stats,
            grad_K,
            batch,
            n_rows,
            n_cols,
            n_iters,
            eps,
            row_sum,
            col_sum,
            LOG_DOMAIN=log_domain,
            RECOMPUTE=recompute,
            **options,
            **plan.constexprs,
        )
    return grad_K


# (batch, N, M, n_iters), as in benchmarks/bench_sinkhorn.py: the benchmark shapes, then one
# shape per further tile the launch plan picks (packed 8x8, one_matrix at 2, 4 and 8 warps,
# a 2-row 512-wide streaming tile, the 64-row streaming_wide tile); some sizes, batches and
# n_iters are not multiples of 16 or are 1 so the JIT's less specialized binaries are
# compiled too.
AOT_SHAPES = [
    (160, 16, 16, 3),
    (65536, 4, 4, 20),
    (256, 64, 64, 3),
    (32, 128, 128, 3),
    (7, 8, 8, 1),
    (2, 16, 32, 3),
    (3, 32, 32, 3),
    (5, 30, 60, 3),
    (2, 200, 300, 3),
    (2, 2048, 8, 3),
]
_AOT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def aot_variants() -> list[KernelVariant]:
    """The kernel variants `launch_plan` picks at `AOT_SHAPES`: forward (with and without
    stats) and backward of each tile (packed: also the one replaying the forward),
    fp32/fp16/bf16, linear and log domain; the streaming kernels in each of their tuning
    configurations."""
    kernels = {
        "packed": (_forward_register_kernel, _backward_register_kernel),
        "one_matrix": (_forward_register_kernel, _backward_register_kernel),
        "streaming": (_forward_rows_kernel, _backward_streaming_kernel),
        "streaming_wide": (_forward_streaming_kernel, _backward_streaming_kernel),
    }
    variants = {}
    for _, n_rows, n_cols, _ in AOT_SHAPES:
        plan = launch_plan(n_rows, n_cols)
        forward, backward = kernels[plan.tier]
        # (direction, kernel, its SAVE_STATS or RECOMPUTE flag)
        directions = [("forward", forward, {"SAVE_STATS": True}), ("forward_no_stats", forward, {"SAVE_STATS": False})]
        if plan.tier in ("packed", "one_matrix"):
            directions.append(("backward", backward, {"RECOMPUTE": False}))
            if plan.tier == "packed":
                directions.append(("backward_recompute", backward, {"RECOMPUTE": True}))
        else:
            directions.append(("backward", backward, {}))
        for direction, kernel, flag in directions:
            blocks = ",".join(f"{key}={value}" for key, value in plan.constexprs.items())
            for dtype in _AOT_DTYPES:
                for log_domain in (False, True):
                    name = f"sinkhorn.{direction}.{plan.tier}[{dtype},{'log' if log_domain else 'linear'},{blocks}]"
                    constexprs = {"LOG_DOMAIN": log_domain, **flag, **plan.constexprs}
                    pointer_types = {"K_ptr": f"*{dtype}"}
                    if isinstance(kernel, Autotuned):
                        tuned = autotuned_variants(name, kernel, constexprs, pointer_types)
                    else:
                        name = f"{name[:-1]},warps={plan.num_warps}]"
                        tuned = [KernelVariant(name, kernel, constexprs, plan.num_warps, pointer_types=pointer_types)]
                    variants.update((variant.name, variant) for variant in tuned)
    return list(variants.values())


def aot_launches(shapes=AOT_SHAPES) -> None:
    """Runs the launchers at `shapes` on uninitialized CPU tensors, forward (with and without
    stats) and backward (packed: with and without stats), every dtype and domain
    (for `triton_variants.capture_specializations`,
    which stops each launch)."""
    for batch, n_rows, n_cols, n_iters in shapes:
        for dtype in _AOT_DTYPES.values():
            K = torch.empty((batch, n_rows, n_cols), dtype=dtype)
            for log_domain in (False, True):
                _, row_stats, col_stats = sinkhorn_forward(K, n_iters, 1e-8, log_domain, 1.0, 1.0, save_stats=False)
                if launch_plan(n_rows, n_cols).tier == "packed":
                    sinkhorn_backward(torch.empty_like(K), K, row_stats, col_stats, n_iters, 1e-8, log_domain, 1.0, 1.0)
                _, row_stats, col_stats = sinkhorn_forward(K, n_iters, 1e-8, log_domain, 1.0, 1.0, save_stats=True)
                sinkhorn_backward(torch.empty_like(K), K, row_stats, col_stats, n_iters, 1e-8, log_domain, 1.0, 1.0)
