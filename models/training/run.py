"""A training run from start to end (used by models/train.py): set up data, model, optimiser
and logs (`Run`), train and validate epoch after epoch, checkpoint, test the best epoch.

- `batch_size` is the global batch (the paper's 80): under torchrun each rank gets
  batch_size / world_size clips, so a recipe behaves the same on 1 or 8 GPUs.
- Checkpoints (models/training/checkpointing.py) are only written after a finished epoch,
  so the last one stays valid when a step fails; each carries a sha256 of its content;
  `last.pt`'s predecessor is kept as `previous.pt`, and --resume falls back to it, saying
  why, when last.pt is missing or damaged.
- Validation runs after every epoch over the whole split (models/evaluation/prediction.py).
  Only rank 0 writes files.
- cudnn.benchmark is on for CUDA (the training shapes are fixed).
"""

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.data.synthetic import SAME_PERSONS_SPLIT
from models.errors import ConfigError
from models.evaluation.prediction import evaluate_predictions, predict, selection_metric, split_has_labels
from models.training import distributed as dist_utils
from models.training.builders import build_loss, build_model, build_optimizer, build_scheduler
from models.training.checkpointing import (
    CHECKPOINT_FORMAT,
    LAST_NAME,
    PREVIOUS_NAME,
    capture_rng_state,
    load_checkpoint,
    load_resume_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_atomic,
    seed_everything,
)
from models.training.config import TrainConfig
from models.training.data_loading import build_dataset, build_loader, num_workers
from models.training.loop import model_step, train_one_epoch
from models.training.precision import check_memory_format, resolve_amp, to_channels_last
from models.training.run_log import RunLog

BEST_NAME = "best.pt"


class Run:
    """Everything one training run holds: data, model, optimiser state, logs."""

    def __init__(self, cfg: TrainConfig, info: dist_utils.DistInfo, resume_path=None):
        self.cfg, self.info = cfg, info
        self.out_dir = Path(cfg.out_dir)
        if cfg.batch_size % info.world_size:
            raise ConfigError(
                f"config 'batch_size' ({cfg.batch_size}) is the global batch and must be divisible "
                f"by the number of processes ({info.world_size})"
            )
        self.batch_per_rank = cfg.batch_size // info.world_size
        if self.batch_per_rank % cfg.repeated_augmentation:
            raise ConfigError(
                f"config 'repeated_augmentation' ({cfg.repeated_augmentation}) must divide the "
                f"per-rank batch ({self.batch_per_rank} clips): each video gives that many clips"
            )
        if (
            cfg.model == "piumr"
            and cfg.girl
            and cfg.girl_groups == "random"
            and self.batch_per_rank < 2 * cfg.girl_num_groups
        ):
            raise ConfigError(
                f"GIRL needs >= 2 clips in each of its {cfg.girl_num_groups} groups, but each rank "
                f"gets {self.batch_per_rank} clips: raise batch_size or lower girl_num_groups"
            )
        if info.is_main:
            for name in (LAST_NAME, PREVIOUS_NAME, BEST_NAME):  # a run killed while saving leaves temporaries
                remove_stale_temporaries(self.out_dir / name)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.train_set = build_dataset(cfg, "train", train=True)
        self.val_set = build_dataset(cfg, "val", train=False)
        self.train_loader = build_loader(self.train_set, cfg, info, train=True, batch_size=self.batch_per_rank)
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"the training split has {len(self.train_set)} clips, fewer than one batch of "
                f"{cfg.batch_size}: lower batch_size"
            )
        self.val_loader = build_loader(
            self.val_set, cfg, info, train=False, batch_size=cfg.eval_batch_size or self.batch_per_rank
        )
        self.channels_last = cfg.memory_format == "channels_last"
        self.amp_dtype = resolve_amp(cfg.amp, info.device)
        check_memory_format(self.channels_last, self.amp_dtype, info.device, cfg.num_frames)
        model = build_model(cfg, load_pretrained=resume_path is None).to(info.device)
        if self.channels_last:
            model = to_channels_last(model)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed training shapes: pick the fastest kernels once
        self.num_parameters = sum(p.numel() for p in model.parameters())
        if info.enabled:
            if cfg.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
            )
        self.model = model
        self.loss_fn = build_loss(cfg).to(info.device)
        self.step = torch.compile(model_step, fullgraph=True) if cfg.compile else model_step
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.train_loader))
        self.start_epoch, self.global_step, self.history, self.resumed_from = 1, 0, [], None
        self.selection = "val_" + selection_metric(cfg.dataset)[0]
        self.best = {"epoch": None, self.selection: -1.0}
        if resume_path is not None:
            self._resume(resume_path)
        self.log = RunLog(self.out_dir, enabled=info.is_main, resume_step=self.global_step if resume_path else None)

    @property
    def bare_model(self) -> torch.nn.Module:
        return self.model.module if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else self.model

    def grad_norm(self) -> float:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip_norm:
            return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm))
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
            "config": self.cfg.to_dict(),
            "model": self.bare_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
            # The data order of epoch e is DistributedSampler(seed, epoch=e): these two numbers are its state.
            "sampler": {"seed": self.cfg.seed, "epoch": epoch},
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
        preset = cfg.preset
        name = (
            f"X3D-{preset.get('name', 'custom')} (depth factor {preset.get('depth_factor')})"
            if isinstance(preset, dict)
            else f"X3D-{preset}"
        )
        dataset = getattr(self.train_set, "dataset", self.train_set)  # through a max_train_clips Subset
        source = f"\nreading {dataset.source}" if hasattr(dataset, "source") else ""
        parts = (
            f"TFAM {'on ' + ','.join(cfg.tfam_stages) if cfg.tfam else 'off'}; GIRL "
            f"{cfg.girl_groups + ' groups' if cfg.girl else 'off'}"
            if cfg.model == "piumr"
            else f"DAM after every stage; DSM, {cfg.dsm_scaling} scaling"
        )
        return (
            f"{'PIUmr' if cfg.model == 'piumr' else 'HDF'} on {name} ({self.num_parameters / 1e6:.2f} M "
            f"parameters; {parts}; {cfg.optimizer}) on {cfg.dataset}: "
            f"{len(self.train_set)} train / {len(self.val_set)} val clips of {cfg.num_frames}x"
            f"{cfg.crop_size}^2; {cfg.epochs} epochs x {len(self.train_loader)} steps, batch "
            f"{cfg.batch_size} ({self.info.world_size} process(es) on {self.info.device.type}), amp "
            f"{self.amp_dtype or 'off'}, {'compiled' if cfg.compile else 'eager'}, "
            f"{'channels_last' if self.channels_last else 'contiguous'}; {num_workers(cfg)} loader workers per "
            f"process; writing to {self.out_dir}{source}"
        )


def run_training(cfg: TrainConfig, resume_path=None, stop_after_epoch: int | None = None) -> dict:
    """Train (or continue training) per `cfg`; returns a summary with the final metrics.

    `stop_after_epoch` ends the run after that epoch, as an interruption would (e.g. to fit a
    time-limited job); `resume_path` continues from a last.pt.
    """
    info = dist_utils.setup(cfg.device)
    try:
        return _train(cfg, info, resume_path, stop_after_epoch)
    finally:
        dist_utils.cleanup()


def _train(cfg: TrainConfig, info: dist_utils.DistInfo, resume_path, stop_after_epoch) -> dict:
    started = time.perf_counter()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    run = Run(cfg, info, resume_path)
    if info.is_main:
        (run.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    run.say(run.describe())
    if run.start_epoch > 1:
        run.say(f"resumed from {run.resumed_from} after epoch {run.start_epoch - 1}")
    run.say(RunLog.header())
    for past in run.history:
        run.say(RunLog.row(past))
    last_epoch = min(cfg.epochs, stop_after_epoch or cfg.epochs)
    val_metrics = _val_metrics_of(run.history[-1]) if run.history else None
    try:
        for epoch in range(run.start_epoch, last_epoch + 1):
            epoch_start = time.perf_counter()
            record = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"]}
            record.update(train_one_epoch(run, epoch))
            pred = predict(
                run.bare_model,
                run.val_loader,
                info,
                run.amp_dtype,
                progress=cfg.progress,
                desc=f"val {epoch}",
                channels_last=run.channels_last,
            )
            val_metrics = evaluate_predictions(pred, cfg.dataset)
            record.update({f"val_{k}": v for k, v in val_metrics.items()})
            record["val_dropped"] = pred["num_dropped"]
            record["epoch_seconds"] = time.perf_counter() - epoch_start
            run.history.append(record)
            improved = record[run.selection] > run.best[run.selection]
            if improved:
                run.best = {"epoch": epoch, run.selection: record[run.selection]}
            if info.is_main:
                payload = run.checkpoint(epoch, val_metrics)
                save_atomic(payload, run.out_dir / LAST_NAME, previous=PREVIOUS_NAME)
                if improved:
                    save_atomic(
                        {k: payload[k] for k in ("format", "epoch", "config", "model", "val_metrics")},
                        run.out_dir / BEST_NAME,
                    )
                run.log.epoch_end(run.history, run.global_step)
            run.say(RunLog.row(record))
            for kind in ("train_dropped", "val_dropped"):
                if record[kind]:
                    run.say(f"warning: epoch {epoch}: {record[kind]} unreadable clip(s) skipped in {kind[:-8]}")
            if record["train_empty_steps"]:
                run.say(
                    f"warning: epoch {epoch}: {record['train_empty_steps']} step(s) skipped: no readable clip "
                    f"in the batch"
                )
            if record["train_skipped_steps"]:
                run.say(f"note: epoch {epoch}: the fp16 GradScaler skipped {record['train_skipped_steps']} step(s)")
            dist_utils.barrier(info)
    except KeyboardInterrupt:
        run.say(f"interrupted; {run.last_checkpoint_note()} Continue with --resume.")
        raise
    finally:
        run.log.close()
    summary = {
        "epochs_done": run.history[-1]["epoch"] if run.history else 0,
        "best": run.best,
        "val": val_metrics,
        "history": run.history,
        "test": None,
        "test_same_persons": None,
        "seconds": time.perf_counter() - started,
        "out_dir": str(run.out_dir),
    }
    finished = summary["epochs_done"] == cfg.epochs
    if finished and cfg.test_at_end and split_has_labels(cfg, "test"):
        # Synthetic data also has new clips of the training persons: the person gap.
        splits = ("test", SAME_PERSONS_SPLIT) if cfg.dataset == "synthetic" else ("test",)
        tested = _test_best(run, splits)
        summary["test"], summary["test_same_persons"] = tested["test"], tested.get(SAME_PERSONS_SPLIT)
    if info.is_main:
        run.say(_summary_text(summary, cfg, finished))
        with open(run.out_dir / "summary.json", "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
    return summary


def _val_metrics_of(record: dict) -> dict:
    return {key[4:]: value for key, value in record.items() if key.startswith("val_") and key != "val_dropped"}


def _test_best(run: Run, splits) -> dict:
    """`{split: metrics}` of the best checkpoint (by the validation selection metric) on each of `splits`."""
    best = load_checkpoint(run.out_dir / BEST_NAME, map_location=run.info.device) if run.info.is_main else None
    best_state = dist_utils.broadcast_object(best["model"] if best else None, run.info)
    model = build_model(run.cfg, load_pretrained=False).to(run.info.device)
    model.load_state_dict(best_state)
    if run.channels_last:
        model = to_channels_last(model)
    results = {}
    for split in splits:
        loader = build_loader(
            build_dataset(run.cfg, split, train=False),
            run.cfg,
            run.info,
            train=False,
            batch_size=run.cfg.eval_batch_size or run.batch_per_rank,
            persistent=False,
        )
        pred = predict(
            model,
            loader,
            run.info,
            run.amp_dtype,
            progress=run.cfg.progress,
            desc=split,
            channels_last=run.channels_last,
        )
        results[split] = evaluate_predictions(pred, run.cfg.dataset)
    return results


def _summary_text(summary: dict, cfg: TrainConfig, finished: bool) -> str:
    def fmt(m: dict) -> str:
        if cfg.dataset == "dfew":
            return f"WAR {m['war']:.1%}, UAR {m['uar']:.1%}"
        return (
            f"action top-1 {m['action_top1']:.1%}, top-5 {m['action_top5']:.1%}, body top-1 "
            f"{m['body_top1']:.1%}, F1_mean {m['f1_mean']:.1%}"
        )

    lines = [
        f"{'finished' if finished else 'stopped after'} epoch {summary['epochs_done']}/{cfg.epochs} in "
        f"{summary['seconds'] / 60:.1f} min; checkpoints in {summary['out_dir']}"
    ]
    if summary["val"]:
        lines.append(f"last epoch, validation: {fmt(summary['val'])}")
    if summary["best"]["epoch"] is not None:
        key, metric = selection_metric(cfg.dataset)
        lines.append(
            f"best epoch {summary['best']['epoch']} by validation {metric} ({summary['best']['val_' + key]:.1%})"
        )
    if summary["test"]:
        held_out = " (held-out persons)" if cfg.dataset == "synthetic" else ""
        lines.append(f"best checkpoint, test{held_out}: {fmt(summary['test'])}")
    if summary["test_same_persons"]:
        same = summary["test_same_persons"]
        lines.append(
            f"best checkpoint, new clips of training persons: {fmt(same)}; person gap (held-out minus "
            f"same persons, action top-1) {100 * (summary['test']['action_top1'] - same['action_top1']):+.1f} "
            f"points"
        )
    if not finished:
        lines.append("continue with --resume")
    return "\n".join(lines)
