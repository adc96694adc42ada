"""The PIUmr training and evaluation loop (used by models/train.py and models/evaluate.py).

Decisions a user meets here:
- `batch_size` is the global batch (the paper's 80): under torchrun each rank gets
  batch_size / world_size clips, so a recipe behaves the same on 1 or 8 GPUs.
- The learning rate follows the schedule per optimisation step: `multistep` multiplies it
  by `lr_gamma` once `lr_milestones` epochs are done (the paper: x0.1 at 30 and 60),
  `cosine` decays it to zero over the run; both after an optional linear warm-up.
- Mixed precision `amp`: `auto` is bf16 autocast on GPUs that support it (else fp16 with a
  GradScaler) and full precision on CPU (CPU bf16 is available with `amp=bf16`). The loss
  (CE + GIRL) is always computed in float32 on float32 logits and features.
- The input pipeline: workers return uint8 (MA-52) or float (synthetic) frames, already
  cropped and flipped; X3D's normalization runs on the device inside the step
  (`model_step`). Batches come through pinned memory with non-blocking copies from
  persistent workers (`num_workers` per rank, default the cores available to the rank;
  `prefetch_factor` batches ahead each). Augmentation seeds come from the sampler, so an
  epoch's clips do not depend on the workers. `repeated_augmentation` k: each video is
  decoded once and gives k differently augmented clips of the batch (batch_size / k videos
  per step).
- `compile`: torch.compile(fullgraph=True) of the step's forward (normalization, model,
  loss); `memory_format` contiguous (default) or channels_last (NDHWC, measured faster on
  CPU for both the synthetic job's model and PIUmr-M, not yet measured on a GPU; refused
  with CPU bf16 autocast at fewer than 5 frames, where PyTorch 2.13's CPU depthwise
  temporal convolution returns garbage weight gradients); cudnn.benchmark on CUDA.
- A non-finite loss or gradient norm stops the run with NonFiniteLossError naming the epoch
  and step, before the optimiser touches the weights; checkpoints are only written after a
  finished epoch, so the last one stays valid. Under fp16 the GradScaler skips such steps
  instead; they are counted per epoch and the run stops after `max_consecutive_skips` in a
  row.
- GIRL groups: `random` pseudo-groups (the paper), or `subject`: one group per person in the
  batch; persons with a single clip in the batch are pooled into one extra group, because
  GIRL leaves out a group of fewer than two members.
- Unreadable clips never end a run: the dataset reports each one and the batch goes on
  without it (`train_dropped`/`val_dropped` per epoch). A batch left shorter than
  2 x girl_num_groups uses fewer random groups, max(1, B // 2) (girl_loss's documented
  rule, SPEC §3). A batch with no readable clip on some rank is skipped on every rank, as
  if it were not there (no forward, no optimisation step, the LR schedule does not move),
  and counted (`train_empty_steps`).
- Checkpoints (models/training_state.py) carry a sha256 of their content; `last.pt`'s
  predecessor is kept as `previous.pt`, and --resume falls back to it, saying why, when
  last.pt is missing or damaged.
- Validation runs after every epoch on every rank's shard of the split (no padding, no
  duplicates) and the predictions are gathered, so metrics are over the whole split exactly
  once. Only rank 0 writes files.
"""

import json
import math
import numbers
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from models import distributed as dist_utils
from models.run_log import RunLog
from models.train_config import NUM_CLASSES
from models.errors import ConfigError
from models.training_state import (CHECKPOINT_FORMAT, LAST_NAME, PREVIOUS_NAME, capture_rng_state, epoch_seed,
                                   load_checkpoint, load_resume_checkpoint, remove_stale_temporaries,
                                   restore_rng_state, save_atomic, seed_everything)

BEST_NAME = "best.pt"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the weights were not updated."""


# --------------------------------------------------------------------------- data


def cores_per_rank() -> int:
    """CPU cores this process may use, shared evenly by the ranks on this node."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def num_workers(cfg: dict) -> int:
    return cores_per_rank() if cfg["num_workers"] is None else cfg["num_workers"]


def build_dataset(cfg: dict, split: str, train: bool):
    """The split of the configured dataset; `train` turns on training augmentation (random
    crop and flip, repeated `repeated_augmentation` times per decode)."""
    from models.data import MA52Dataset, SyntheticMicroActions

    common = dict(split=split, num_frames=cfg["num_frames"], size=cfg["crop_size"], training=train,
                  repeats=cfg["repeated_augmentation"] if train else 1)
    if cfg["dataset"] == "synthetic":
        dataset = SyntheticMicroActions(**common, **cfg["synthetic_options"])
    else:
        # Decoder threads only help on cores the workers leave idle.
        threads = max(1, cores_per_rank() // max(1, num_workers(cfg)))
        dataset = MA52Dataset(cfg["data_root"], **common, decode_threads=threads)
    limit = cfg["max_train_clips"] if split == "train" else cfg["max_eval_clips"]
    if limit is not None and limit < len(dataset):
        # Evenly spaced clips keep every part of the list; items keep their original "index".
        dataset = KeyedSubset(dataset, np.unique(np.linspace(0, len(dataset) - 1, limit).round().astype(int)).tolist())
    return dataset


class KeyedSubset(Dataset):
    """torch's Subset for keys that may carry an augmentation seed: `(i, seed)` reads
    `(indices[i], seed)` (Subset would index its list with the tuple)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        return self.dataset[self.indices[index] if seed is None else (self.indices[index], seed)]

    def __len__(self) -> int:
        return len(self.indices)


class ShardSampler(Sampler):
    """Rank r of w takes items r, r+w, r+2w, ...: every item exactly once over the ranks
    (DistributedSampler pads with repeats, which would count some clips twice)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loader(dataset, cfg: dict, info: dist_utils.DistInfo, train: bool, batch_size: int,
                 persistent: bool = True) -> DataLoader:
    """`batch_size` clips per step (with repeated augmentation k: batch_size / k videos)."""
    from models.data import SeededSampler, collate_clips

    if train:
        sampler = SeededSampler(DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                                   shuffle=True, seed=cfg["seed"], drop_last=True),
                                cfg["seed"], info.rank)
        batch_size //= cfg["repeated_augmentation"]
    else:
        sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    workers = num_workers(cfg)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_clips, drop_last=train, pin_memory=info.device.type == "cuda",
                      persistent_workers=persistent and workers > 0,
                      prefetch_factor=cfg["prefetch_factor"] if workers > 0 else None,
                      # Its own generator: the worker base seeds it draws (whenever an iterator
                      # starts) must not move the global RNG, which GIRL and TFAM use.
                      generator=torch.Generator())


# --------------------------------------------------------------------------- model, loss, optimiser


def model_preset(cfg: dict):
    """`preset` is an X3D preset name (XS, S, M, L) or a dict of X3DPreset fields (a custom
    depth, e.g. the CPU-sized model of configs/synthetic_default.json)."""
    preset = cfg["preset"]
    if isinstance(preset, dict):
        from models.x3d import X3DPreset

        fields = {"name": "custom", "num_frames": cfg["num_frames"], "crop_size": cfg["crop_size"], **preset}
        return X3DPreset(**fields)
    return preset


def build_model(cfg: dict, load_pretrained: bool = True) -> torch.nn.Module:
    """PIUmr with the configured preset and ablation switches, sized for `num_frames` (TFAM's
    T x T parameters); `pretrained` X3D weights into the backbone when `load_pretrained`."""
    from models.piumr import build_piumr

    return build_piumr(model_preset(cfg), NUM_CLASSES, tfam=cfg["tfam"], tfam_stages=tuple(cfg["tfam_stages"]),
                       temporal=cfg["temporal"], frequency=cfg["frequency"], fusion=cfg["fusion"],
                       num_frames=cfg["num_frames"], pretrained=cfg["pretrained"] if load_pretrained else None)


def build_loss(cfg: dict) -> torch.nn.Module:
    from models.piumr import PIUmrLoss

    if not cfg["girl"]:
        return PIUmrLoss(lambda_girl=cfg["lambda_girl"], girl=False)
    return PIUmrLoss(lambda_girl=cfg["lambda_girl"], num_groups=cfg["girl_num_groups"], tau=cfg["girl_tau"],
                     eta=cfg["girl_eta"], lambda_var=cfg["girl_lambda_var"])


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


def lr_factor(cfg: dict, steps_per_epoch: int):
    """Learning-rate multiplier as a function of the optimisation step."""
    warmup = cfg["warmup_epochs"] * steps_per_epoch
    total = cfg["epochs"] * steps_per_epoch

    def factor(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if cfg["lr_schedule"] == "multistep":
            done_epochs = step / steps_per_epoch
            return scale * cfg["lr_gamma"] ** sum(done_epochs >= m for m in cfg["lr_milestones"])
        progress = min(1.0, max(0.0, (step - warmup) / max(1.0, total - warmup)))
        return scale * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device` (None: full precision)."""
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("amp 'fp16' needs a CUDA device (use 'bf16' on CPU)")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":  # auto
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """The 5-D weights (3D convolutions) in channels_last_3d, in place. Module.to(memory_format=)
    cannot be used: it also converts the 4-D tensors, which channels_last_3d rejects."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dim() == 5:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)
    return model


def check_memory_format(channels_last: bool, amp_dtype: torch.dtype | None, device: torch.device,
                        num_frames: int) -> None:
    """Refuses the one combination known to train on garbage: under CPU bf16 autocast with
    channels_last_3d, PyTorch 2.13's depthwise 5x1x1 convolution (X3D's stem `conv_xy`) reads
    uninitialized memory in its weight gradient when the clip has 3 or 4 frames (seen as
    gradient norms from 1e3 to 1e25 for the same batch; 1, 2 and 5+ frames were exact)."""
    if channels_last and amp_dtype == torch.bfloat16 and device.type == "cpu" and num_frames < 5:
        raise ConfigError(
            f"memory_format channels_last with bf16 autocast on CPU needs num_frames >= 5, got {num_frames}: "
            "PyTorch's CPU depthwise temporal convolution gives wrong weight gradients there; "
            "use --memory-format contiguous (or --amp none)"
        )


def model_step(model, loss_fn, frames, labels, groups=None, num_groups=None, amp_dtype=None,
               channels_last: bool = False):
    """The forward part of a training step: normalize the batch's frames on their device,
    run the model (autocast to `amp_dtype`), compute the float32 loss. Returns
    `(loss, parts, logits)`; what `compile` hands to torch.compile."""
    from models.data import normalize_frames

    clip = normalize_frames(frames, channels_last)
    with autocast(clip.device, amp_dtype):
        logits, features = model(clip)
    loss, parts = loss_fn(logits.float(), features.float(), labels, groups=groups, num_groups=num_groups)
    return loss, parts, logits


# --------------------------------------------------------------------------- one epoch


def _seed_epoch(cfg: dict, epoch: int, info: dist_utils.DistInfo, loader: DataLoader) -> None:
    """Make everything random in this epoch a function of (seed, epoch, rank): exact resume."""
    seed = epoch_seed(cfg["seed"], epoch, info.rank)
    seed_everything(seed)
    loader.sampler.set_epoch(epoch)  # data order (same permutation on every rank) and augmentation seeds


def train_one_epoch(run: "Run", epoch: int) -> dict:
    cfg, info = run.cfg, run.info
    run.model.train()
    _seed_epoch(cfg, epoch, info, run.train_loader)
    sums = {"loss": 0.0, "ce": 0.0, "girl": 0.0, "correct": 0.0, "clips": 0.0, "dropped": 0.0, "skipped": 0.0,
            "empty": 0.0}
    consecutive_skips = 0
    steps = len(run.train_loader)
    bar = tqdm(run.train_loader, total=steps, desc=f"epoch {epoch}/{cfg['epochs']}", leave=False,
               disable=not (info.is_main and cfg["progress"]), dynamic_ncols=True)
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
        if cfg["girl_groups"] == "subject":
            groups, num_groups = subject_groups(batch["subject"])
            groups = groups.to(info.device, non_blocking=True)
        loss, parts, logits = run.step(run.model, run.loss_fn, frames, labels, groups, num_groups, run.amp_dtype,
                                       run.channels_last)
        loss_finite = bool(torch.isfinite(loss))
        if run.scaler is None and dist_utils.any_rank(not loss_finite, info):
            raise NonFiniteLossError(
                f"non-finite loss at {where}: loss={loss.item()}, ce={float(parts['ce'])}, girl={float(parts['girl'])}. "
                f"The weights were not updated; {run.last_checkpoint_note()} Lower the learning rate or enable "
                f"gradient clipping (grad_clip_norm), then continue with --resume.")
        run.optimizer.zero_grad(set_to_none=True)
        skipped = False
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)
            grad_norm = run.grad_norm()
            scale_before = run.scaler.get_scale()
            run.scaler.step(run.optimizer)
            run.scaler.update()
            skipped = run.scaler.get_scale() < scale_before
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            if consecutive_skips >= cfg["max_consecutive_skips"]:
                raise NonFiniteLossError(
                    f"the fp16 GradScaler skipped {consecutive_skips} steps in a row up to {where} (non-finite loss "
                    f"or gradients; scale now {run.scaler.get_scale():.3g}). {run.last_checkpoint_note()}")
        else:
            loss.backward()
            grad_norm = run.grad_norm()
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite gradient norm at {where} (loss {loss.item():.4f} was finite). The weights were not "
                    f"updated; {run.last_checkpoint_note()} Lower the learning rate or set grad_clip_norm, then --resume.")
            run.optimizer.step()
        run.scheduler.step()
        run.global_step += 1
        n = labels.numel()
        sums["skipped"] += skipped
        if loss_finite:
            sums["loss"] += loss.item() * n
            sums["ce"] += float(parts["ce"]) * n
            sums["girl"] += float(parts["girl"]) * n
            sums["correct"] += (logits.argmax(1) == labels).sum().item()
            sums["clips"] += n
        if info.is_main:
            lr = run.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            run.log.step_scalars(run.global_step, {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm})
    totals = dict(zip(sums, dist_utils.all_reduce_sum(list(sums.values()), info)))
    clips = max(totals["clips"], 1.0)
    return {"train_loss": totals["loss"] / clips, "train_ce": totals["ce"] / clips, "train_girl": totals["girl"] / clips,
            "train_action_top1": totals["correct"] / clips, "train_dropped": int(totals["dropped"]),
            "train_skipped_steps": int(totals["skipped"]), "train_empty_steps": int(totals["empty"])}


# --------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, info: dist_utils.DistInfo, amp_dtype=None,
            with_features: bool = False, progress: bool = False, desc: str = "eval",
            channels_last: bool = False) -> dict:
    """Scores (N, 52) float32, labels, subjects, dataset indices (and features (N, D)) for the
    whole split, gathered from every rank and sorted by dataset index (= list order)."""
    model.eval()
    parts = {"index": [], "scores": [], "label": [], "subject": []}
    if with_features:
        parts["features"] = []
    dropped = 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (info.is_main and progress), dynamic_ncols=True):
        dropped += batch["num_dropped"]
        if batch["clip"].shape[0] == 0:
            continue
        from models.data import normalize_frames

        clip = normalize_frames(batch["clip"].to(info.device, non_blocking=True), channels_last)
        with autocast(info.device, amp_dtype):
            logits, features = model(clip)
        parts["scores"].append(logits.float().cpu())
        if with_features:
            parts["features"].append(features.float().cpu())
        for key in ("index", "label", "subject"):
            parts[key].append(torch.as_tensor(batch[key]).cpu())
    local = {key: torch.cat(chunks) if chunks else None for key, chunks in parts.items()}
    gathered = [g for g in dist_utils.all_gather_objects(local, info) if g["index"] is not None]
    if not gathered:
        raise RuntimeError(f"{desc}: no clip could be read (dropped {dropped})")
    merged = {key: torch.cat([g[key] for g in gathered]) for key in parts}
    order = torch.argsort(merged["index"])
    result = {key: value[order] for key, value in merged.items()}
    result["num_dropped"] = int(dist_utils.all_reduce_sum([dropped], info)[0])
    return result


def evaluate_predictions(pred: dict) -> dict:
    from models.metrics import compute_metrics

    metrics = compute_metrics(pred["scores"], pred["label"])
    return {key: value if isinstance(value, int) else float(value) for key, value in metrics.items()
            if isinstance(value, numbers.Real) or (torch.is_tensor(value) and value.numel() == 1)}


def split_has_labels(cfg: dict, split: str) -> bool:
    """MA-52 test labels are dummy zeros (SPEC §6); every synthetic split is labelled."""
    return not (cfg["dataset"] == "ma52" and split == "test")


# --------------------------------------------------------------------------- the run


class Run:
    """Everything one training run holds: data, model, optimiser state, logs."""

    def __init__(self, cfg: dict, info: dist_utils.DistInfo, resume_path=None):
        self.cfg, self.info = cfg, info
        self.out_dir = Path(cfg["out_dir"])
        if cfg["batch_size"] % info.world_size:
            raise ConfigError(f"config 'batch_size' ({cfg['batch_size']}) is the global batch and must be divisible "
                              f"by the number of processes ({info.world_size})")
        self.batch_per_rank = cfg["batch_size"] // info.world_size
        if self.batch_per_rank % cfg["repeated_augmentation"]:
            raise ConfigError(f"config 'repeated_augmentation' ({cfg['repeated_augmentation']}) must divide the "
                              f"per-rank batch ({self.batch_per_rank} clips): each video gives that many clips")
        if cfg["girl"] and cfg["girl_groups"] == "random" and self.batch_per_rank < 2 * cfg["girl_num_groups"]:
            raise ConfigError(f"GIRL needs >= 2 clips in each of its {cfg['girl_num_groups']} groups, but each rank "
                              f"gets {self.batch_per_rank} clips: raise batch_size or lower girl_num_groups")
        if info.is_main:
            for name in (LAST_NAME, PREVIOUS_NAME, BEST_NAME):  # a run killed while saving leaves temporaries
                remove_stale_temporaries(self.out_dir / name)
        seed_everything(cfg["seed"])  # identical initial weights on every rank
        self.train_set = build_dataset(cfg, "train", train=True)
        self.val_set = build_dataset(cfg, "val", train=False)
        self.train_loader = build_loader(self.train_set, cfg, info, train=True, batch_size=self.batch_per_rank)
        if len(self.train_loader) == 0:
            raise ConfigError(f"the training split has {len(self.train_set)} clips, fewer than one batch of "
                              f"{cfg['batch_size']}: lower batch_size")
        self.val_loader = build_loader(self.val_set, cfg, info, train=False,
                                       batch_size=cfg["eval_batch_size"] or self.batch_per_rank)
        self.channels_last = cfg["memory_format"] == "channels_last"
        self.amp_dtype = resolve_amp(cfg["amp"], info.device)
        check_memory_format(self.channels_last, self.amp_dtype, info.device, cfg["num_frames"])
        model = build_model(cfg, load_pretrained=resume_path is None).to(info.device)
        if self.channels_last:
            model = to_channels_last(model)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed training shapes: pick the fastest kernels once
        self.num_parameters = sum(p.numel() for p in model.parameters())
        if info.enabled:
            if cfg["sync_bn"]:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        self.model = model
        self.loss_fn = build_loss(cfg).to(info.device)
        self.step = torch.compile(model_step, fullgraph=True) if cfg["compile"] else model_step
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, len(self.train_loader)))
        self.start_epoch, self.global_step, self.history, self.resumed_from = 1, 0, [], None
        self.best = {"epoch": None, "val_f1_mean": -1.0}
        if resume_path is not None:
            self._resume(resume_path)
        self.log = RunLog(self.out_dir, enabled=info.is_main, resume_step=self.global_step if resume_path else None)

    @property
    def bare_model(self) -> torch.nn.Module:
        return self.model.module if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else self.model

    def grad_norm(self) -> float:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.cfg["grad_clip_norm"]:
            return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip_norm"]))
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def last_checkpoint_note(self) -> str:
        if self.history:
            return f"the last checkpoint ({self.out_dir / LAST_NAME}, epoch {self.history[-1]['epoch']}) is intact."
        return "no checkpoint had been written yet."

    def _resume(self, path) -> None:
        ckpt, used, problems = load_resume_checkpoint(path)
        for problem in problems:
            self.say(f"warning: {problem}; resuming from {used} (epoch {ckpt['epoch']}) instead")
        self.resumed_from = used
        self.bare_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"])
        self.start_epoch = ckpt["epoch"] + 1
        self.global_step = ckpt["global_step"]
        self.history = list(ckpt["history"])
        self.best = dict(ckpt["best"])

    def checkpoint(self, epoch: int, val_metrics: dict) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "global_step": self.global_step,
            "config": self.cfg,
            "model": self.bare_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
            # The data order of epoch e is DistributedSampler(seed, epoch=e): these two numbers are its state.
            "sampler": {"seed": self.cfg["seed"], "epoch": epoch},
            "history": self.history,
            "best": self.best,
            "val_metrics": val_metrics,
            "world_size": self.info.world_size,
        }

    def say(self, text: str) -> None:
        if self.info.is_main:
            tqdm.write(text)

    def describe(self) -> str:
        cfg = self.cfg
        preset = cfg["preset"]
        name = (f"X3D-{preset.get('name', 'custom')} (depth factor {preset.get('depth_factor')})"
                if isinstance(preset, dict) else f"X3D-{preset}")
        dataset = getattr(self.train_set, "dataset", self.train_set)  # through a max_train_clips Subset
        source = f"\nreading {dataset.source}" if hasattr(dataset, "source") else ""
        return (f"PIUmr on {name} ({self.num_parameters / 1e6:.2f} M parameters; TFAM "
                f"{'on ' + ','.join(cfg['tfam_stages']) if cfg['tfam'] else 'off'}; GIRL "
                f"{cfg['girl_groups'] + ' groups' if cfg['girl'] else 'off'}) on {cfg['dataset']}: "
                f"{len(self.train_set)} train / {len(self.val_set)} val clips of {cfg['num_frames']}x"
                f"{cfg['crop_size']}^2; {cfg['epochs']} epochs x {len(self.train_loader)} steps, batch "
                f"{cfg['batch_size']} ({self.info.world_size} process(es) on {self.info.device.type}), amp "
                f"{self.amp_dtype or 'off'}, {'compiled' if cfg['compile'] else 'eager'}, "
                f"{'channels_last' if self.channels_last else 'contiguous'}; {num_workers(cfg)} loader workers per "
                f"process; writing to {self.out_dir}{source}")


def run_training(cfg: dict, resume_path=None, stop_after_epoch: int | None = None) -> dict:
    """Train (or continue training) per `cfg`; returns a summary with the final metrics.

    `stop_after_epoch` ends the run after that epoch, as an interruption would (e.g. to fit a
    time-limited job); `resume_path` continues from a last.pt.
    """
    info = dist_utils.setup(cfg["device"])
    try:
        return _train(cfg, info, resume_path, stop_after_epoch)
    finally:
        dist_utils.cleanup()


def _train(cfg: dict, info: dist_utils.DistInfo, resume_path, stop_after_epoch) -> dict:
    started = time.perf_counter()
    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    run = Run(cfg, info, resume_path)
    run.say(run.describe())
    if run.start_epoch > 1:
        run.say(f"resumed from {run.resumed_from} after epoch {run.start_epoch - 1}")
    run.say(RunLog.header())
    for past in run.history:
        run.say(RunLog.row(past))
    last_epoch = min(cfg["epochs"], stop_after_epoch or cfg["epochs"])
    val_metrics = _val_metrics_of(run.history[-1]) if run.history else None
    try:
        for epoch in range(run.start_epoch, last_epoch + 1):
            epoch_start = time.perf_counter()
            record = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"]}
            record.update(train_one_epoch(run, epoch))
            pred = predict(run.bare_model, run.val_loader, info, run.amp_dtype, progress=cfg["progress"],
                           desc=f"val {epoch}", channels_last=run.channels_last)
            val_metrics = evaluate_predictions(pred)
            record.update({f"val_{k}": v for k, v in val_metrics.items()})
            record["val_dropped"] = pred["num_dropped"]
            record["epoch_seconds"] = time.perf_counter() - epoch_start
            run.history.append(record)
            improved = record["val_f1_mean"] > run.best["val_f1_mean"]
            if improved:
                run.best = {"epoch": epoch, "val_f1_mean": record["val_f1_mean"]}
            if info.is_main:
                payload = run.checkpoint(epoch, val_metrics)
                save_atomic(payload, run.out_dir / LAST_NAME, previous=PREVIOUS_NAME)
                if improved:
                    save_atomic({k: payload[k] for k in ("format", "epoch", "config", "model", "val_metrics")},
                                run.out_dir / BEST_NAME)
                run.log.epoch_end(run.history, run.global_step)
            run.say(RunLog.row(record))
            for kind in ("train_dropped", "val_dropped"):
                if record[kind]:
                    run.say(f"warning: epoch {epoch}: {record[kind]} unreadable clip(s) skipped in {kind[:-8]}")
            if record["train_empty_steps"]:
                run.say(f"warning: epoch {epoch}: {record['train_empty_steps']} step(s) skipped: no readable clip "
                        f"in the batch")
            if record["train_skipped_steps"]:
                run.say(f"note: epoch {epoch}: the fp16 GradScaler skipped {record['train_skipped_steps']} step(s)")
            dist_utils.barrier(info)
    except KeyboardInterrupt:
        run.say(f"interrupted; {run.last_checkpoint_note()} Continue with --resume.")
        raise
    finally:
        run.log.close()
    summary = {"epochs_done": run.history[-1]["epoch"] if run.history else 0, "best": run.best,
               "val": val_metrics, "history": run.history, "test": None,
               "seconds": time.perf_counter() - started, "out_dir": str(run.out_dir)}
    finished = summary["epochs_done"] == cfg["epochs"]
    if finished and cfg["test_at_end"] and split_has_labels(cfg, "test"):
        summary["test"] = _test_best(run)
    if info.is_main:
        run.say(_summary_text(summary, cfg, finished))
        with open(run.out_dir / "summary.json", "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
    return summary


def _val_metrics_of(record: dict) -> dict:
    return {key[4:]: value for key, value in record.items() if key.startswith("val_") and key != "val_dropped"}


def _test_best(run: Run) -> dict:
    """Metrics of the best checkpoint (by validation F1_mean) on the test split."""
    best = load_checkpoint(run.out_dir / BEST_NAME, map_location=run.info.device) if run.info.is_main else None
    best_state = dist_utils.broadcast_object(best["model"] if best else None, run.info)
    model = build_model(run.cfg, load_pretrained=False).to(run.info.device)
    model.load_state_dict(best_state)
    test_set = build_dataset(run.cfg, "test", train=False)
    if run.channels_last:
        model = to_channels_last(model)
    loader = build_loader(test_set, run.cfg, run.info, train=False,
                          batch_size=run.cfg["eval_batch_size"] or run.batch_per_rank, persistent=False)
    pred = predict(model, loader, run.info, run.amp_dtype, progress=run.cfg["progress"], desc="test",
                   channels_last=run.channels_last)
    return evaluate_predictions(pred)


def _summary_text(summary: dict, cfg: dict, finished: bool) -> str:
    def fmt(m: dict) -> str:
        return (f"action top-1 {m['action_top1']:.1%}, top-5 {m['action_top5']:.1%}, body top-1 "
                f"{m['body_top1']:.1%}, F1_mean {m['f1_mean']:.1%}")

    lines = [f"{'finished' if finished else 'stopped after'} epoch {summary['epochs_done']}/{cfg['epochs']} in "
             f"{summary['seconds'] / 60:.1f} min; checkpoints in {summary['out_dir']}"]
    if summary["val"]:
        lines.append(f"last epoch, validation: {fmt(summary['val'])}")
    if summary["best"]["epoch"] is not None:
        lines.append(f"best epoch {summary['best']['epoch']} by validation F1_mean ({summary['best']['val_f1_mean']:.1%})")
    if summary["test"]:
        held_out = " (held-out persons)" if cfg["dataset"] == "synthetic" else ""
        lines.append(f"best checkpoint, test{held_out}: {fmt(summary['test'])}")
    if not finished:
        lines.append("continue with --resume")
    return "\n".join(lines)
