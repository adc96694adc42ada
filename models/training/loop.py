"""One training epoch: the step (forward, loss, backward, optimiser) over the training loader.

- `compile`: torch.compile(fullgraph=True) of `model_step` (normalization, model, loss).
- A non-finite loss or gradient norm stops the run with NonFiniteLossError naming the epoch
  and step, before the optimiser touches the weights. Under fp16 the GradScaler skips such
  steps instead; they are counted per epoch and the run stops after `max_consecutive_skips`
  in a row.
- GIRL groups: `random` pseudo-groups (the paper), or `subject`: one group per person in the
  batch; persons with a single clip in the batch are pooled into one extra group, because
  GIRL leaves out a group of fewer than two members.
- Unreadable clips never end a run: the dataset reports each one and the batch goes on
  without it (`train_dropped` per epoch). A batch left shorter than 2 x girl_num_groups uses
  fewer random groups, max(1, B // 2) (girl_loss's documented rule, SPEC §3). A batch with
  no readable clip on some rank is skipped on every rank, as if it were not there (no
  forward, no optimisation step, the LR schedule does not move), and counted
  (`train_empty_steps`).
"""

import math

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.data import normalize_frames
from models.training import distributed as dist_utils
from models.training.checkpointing import epoch_seed, seed_everything
from models.training.config import TrainConfig
from models.training.precision import autocast
from models.training.sam import SAM

# Whether GIRL acts, per epoch (mean over the epoch's clips of each step's value): the fraction of
# anchors with a same-class partner in their group, the mean size of the groups GIRL counts, the
# variance of the group risks. None when GIRL is off.
GIRL_DIAGNOSTICS = ("girl_positive_fraction", "girl_group_size", "girl_var")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the weights were not updated."""


def subject_groups(subjects: torch.Tensor) -> tuple[torch.Tensor, int]:
    """GIRL groups from the batch's person ids (a CPU tensor, so the host reads here wait on
    no device): `(ids in [0, G), G)`. One group per person with >= 2 clips in the batch; the
    clips of persons seen once are pooled into one extra group (joined to the smallest group
    when that pool would hold a single clip, which GIRL would otherwise leave out)."""
    _, person, counts = torch.unique(subjects, return_inverse=True, return_counts=True)
    kept = counts >= 2
    group_of_person = torch.cumsum(kept.long(), 0) - 1
    num_kept = int(kept.sum())
    pooled = ~kept[person]
    num_pooled = int(pooled.sum())
    groups = torch.where(pooled, torch.full_like(person, num_kept), group_of_person[person])
    if num_pooled == 1 and num_kept > 0:
        sizes = torch.bincount(groups[~pooled], minlength=num_kept)
        groups[pooled] = int(torch.argmin(sizes))
        return groups, num_kept
    return groups, num_kept + (num_pooled > 0)


def model_step(
    model, loss_fn, frames, labels, groups=None, num_groups=None, amp_dtype=None, channels_last: bool = False
):
    """The forward part of a training step: normalize the batch's frames on their device,
    run the model (autocast to `amp_dtype`), compute the float32 loss. Returns
    `(loss, parts, logits)`; what `compile` hands to torch.compile."""
    clip = normalize_frames(frames, channels_last)
    with autocast(clip.device, amp_dtype):
        logits, features = model(clip)
    loss, parts = loss_fn(logits.float(), features.float(), labels, groups=groups, num_groups=num_groups)
    return loss, parts, logits


def backward(optimizer, loss, second_pass=None, scale=lambda value: value) -> None:
    """`loss.backward()`; with `second_pass = (step, args)` (SAM) also the ascent, `step(*args)`'s
    loss (scaled by `scale`) backward at the ascended weights, and the restore."""
    loss.backward()
    if second_pass is not None:
        step, args = second_pass
        optimizer.ascent_step()
        scale(step(*args)[0]).backward()
        optimizer.restore()


def _seed_epoch(cfg: TrainConfig, epoch: int, info: dist_utils.DistInfo, loader: DataLoader) -> None:
    """Make everything random in this epoch a function of (seed, epoch, rank): exact resume."""
    seed = epoch_seed(cfg.seed, epoch, info.rank)
    seed_everything(seed)
    loader.sampler.set_epoch(epoch)  # data order (same permutation on every rank) and augmentation seeds


def train_one_epoch(run, epoch: int) -> dict:
    """Train `run` (a models.training.run.Run) for one epoch; returns the epoch's training record."""
    cfg, info = run.cfg, run.info
    run.model.train()
    _seed_epoch(cfg, epoch, info, run.train_loader)
    sums = {
        "loss": 0.0,
        "ce": 0.0,
        "girl": 0.0,
        "correct": 0.0,
        "clips": 0.0,
        "dropped": 0.0,
        "skipped": 0.0,
        "empty": 0.0,
        **dict.fromkeys(GIRL_DIAGNOSTICS, 0.0),
    }
    consecutive_skips = 0
    steps = len(run.train_loader)
    bar = tqdm(
        run.train_loader,
        total=steps,
        desc=f"epoch {epoch}/{cfg.epochs}",
        leave=False,
        disable=not (info.is_main and cfg.progress),
        dynamic_ncols=True,
    )
    for step, batch in enumerate(bar, start=1):
        where = f"epoch {epoch}, step {step}/{steps} (global step {run.global_step + 1})"
        sums["dropped"] += batch["num_dropped"]
        # Every rank skips together: a rank without a forward would leave DDP's gradient all-reduce waiting.
        if dist_utils.any_rank(batch["clip"].shape[0] == 0, info):
            sums["empty"] += 1
            continue
        frames = batch["clip"].to(info.device, non_blocking=True)
        labels = batch["label"].to(info.device, non_blocking=True)
        groups, num_groups = None, None
        if cfg.girl_groups == "subject":
            groups, num_groups = subject_groups(batch["subject"])
            groups = groups.to(info.device, non_blocking=True)
        loss, parts, logits = run.step(
            run.model, run.loss_fn, frames, labels, groups, num_groups, run.amp_dtype, run.channels_last
        )
        loss_finite = bool(torch.isfinite(loss))
        if run.scaler is None and dist_utils.any_rank(not loss_finite, info):
            raise NonFiniteLossError(
                f"non-finite loss at {where}: loss={loss.item()}, ce={float(parts['ce'])}, "
                f"girl={float(parts['girl'])}. "
                f"The weights were not updated; {run.last_checkpoint_note()} Lower the learning rate or enable "
                f"gradient clipping (grad_clip_norm), then continue with --resume."
            )
        run.optimizer.zero_grad(set_to_none=True)
        skipped = False
        # SAM: the step's gradient is the second pass's, at the ascended weights (models/training/sam.py).
        second_pass = (
            (run.step, (run.model, run.loss_fn, frames, labels, groups, num_groups, run.amp_dtype, run.channels_last))
            if isinstance(run.optimizer, SAM)
            else None
        )
        if run.scaler is not None:
            backward(run.optimizer, run.scaler.scale(loss), second_pass, run.scaler.scale)
            run.scaler.unscale_(run.optimizer)
            grad_norm = run.grad_norm()
            scale_before = run.scaler.get_scale()
            run.scaler.step(run.optimizer)
            run.scaler.update()
            skipped = run.scaler.get_scale() < scale_before
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            if consecutive_skips >= cfg.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"the fp16 GradScaler skipped {consecutive_skips} steps in a row up to {where} (non-finite loss "
                    f"or gradients; scale now {run.scaler.get_scale():.3g}). {run.last_checkpoint_note()}"
                )
        else:
            backward(run.optimizer, loss, second_pass)
            grad_norm = run.grad_norm()
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite gradient norm at {where} (loss {loss.item():.4f} was finite). The weights were not "
                    f"updated; {run.last_checkpoint_note()} Lower the learning rate or set grad_clip_norm, "
                    "then --resume."
                )
            run.optimizer.step()
        if hasattr(run.loss_fn, "observe_grad_norm"):  # HDF's gradient-norm loss scaling
            run.loss_fn.observe_grad_norm(grad_norm)
        run.scheduler.step()
        run.global_step += 1
        n = labels.numel()
        sums["skipped"] += skipped
        if loss_finite:
            sums["loss"] += loss.item() * n
            sums["ce"] += float(parts["ce"]) * n
            sums["girl"] += float(parts["girl"]) * n
            for key in GIRL_DIAGNOSTICS:
                sums[key] += float(parts[key]) * n if key in parts else 0.0
            sums["correct"] += (logits.argmax(1) == labels).sum().item()
            sums["clips"] += n
        if info.is_main:
            lr = run.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            run.log.step_scalars(run.global_step, {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm})
    totals = dict(zip(sums, dist_utils.all_reduce_sum(list(sums.values()), info)))
    clips = max(totals["clips"], 1.0)
    return {
        "train_loss": totals["loss"] / clips,
        "train_ce": totals["ce"] / clips,
        "train_girl": totals["girl"] / clips,
        "train_action_top1": totals["correct"] / clips,
        "train_dropped": int(totals["dropped"]),
        "train_skipped_steps": int(totals["skipped"]),
        "train_empty_steps": int(totals["empty"]),
        **{f"train_{key}": totals[key] / clips if cfg.girl else None for key in GIRL_DIAGNOSTICS},
    }
