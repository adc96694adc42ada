"""Train PIUmr (X3D + TFAM, CE + GIRL loss) and report the official MA-52 metrics.

    python models/train.py                       # the main job: synthetic data, CPU-sized, <= 10 min
    python models/train.py --data-root /data/MA-52                # real MA-52, the paper's recipe
    torchrun --nproc_per_node 8 models/train.py --data-root /data/MA-52
    python models/train.py --out runs/synthetic --resume          # continue a stopped run

Configuration: DEFAULTS (models/training/config.py) <- a JSON file (--config; by default
configs/synthetic_default.json for synthetic data, configs/ma52_paper_x3d_m.json for MA-52)
<- the options below. With --resume the run's saved configuration replaces the file and only
options given here override it. Outputs in --out: last.pt (every epoch), best.pt (best
validation F1_mean), metrics.csv, curves.png, tensorboard/, summary.json.
A mistake in what was given (a missing data root or list, a malformed list, an unusable
checkpoint, a bad option value) prints one error line and exits with status 1.
"""

import argparse
import json
from pathlib import Path

from models.training.config import CHOICES, resolve_config


def parse_args(argv=None) -> argparse.Namespace:
    # Every option defaults to "not given" so that the config file (or a resumed run's saved
    # config) supplies the value unless the user typed it.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    run = p.add_argument_group("run")
    run.add_argument("--config", help="JSON config file (see configs/)")
    run.add_argument("--out", dest="out_dir", help="output folder for checkpoints and logs")
    run.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                     help="continue a run (default: OUT/last.pt)")
    run.add_argument("--stop-after-epoch", type=int, metavar="N",
                     help="stop after epoch N of the schedule (continue later with --resume)")
    run.add_argument("--seed", type=int)
    run.add_argument("--device", choices=CHOICES["device"])
    run.add_argument("--amp", choices=CHOICES["amp"], help="mixed precision (auto: bf16/fp16 on GPU, off on CPU)")
    run.add_argument("--workers", dest="num_workers", type=int,
                     help="DataLoader workers per process (default: the CPU cores per process)")
    run.add_argument("--prefetch", dest="prefetch_factor", type=int, help="batches each worker loads ahead")
    run.add_argument("--compile", action="store_true", help="torch.compile (fullgraph) the model and loss")
    run.add_argument("--memory-format", choices=CHOICES["memory_format"],
                     help="contiguous (default) or channels_last (NDHWC)")
    run.add_argument("--threads", dest="torch_threads", type=int, help="CPU threads per process for torch")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    run.add_argument("--no-test", dest="test_at_end", action="store_false",
                     help="skip evaluating the best checkpoint on the test split at the end")
    run.add_argument("--set", action="append", metavar="KEY=JSON", help="set any config key, e.g. --set "
                     "'synthetic_options={\"persons_train\": 12}' (repeatable)")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=CHOICES["dataset"])
    data.add_argument("--data-root", help="MA-52 root folder (implies --dataset ma52)")
    data.add_argument("--num-frames", type=int)
    data.add_argument("--crop-size", type=int)
    data.add_argument("--max-train-clips", type=int, help="train on this many clips only (smoke tests)")
    data.add_argument("--max-eval-clips", type=int, help="validate/test on this many clips only")
    data.add_argument("--repeated-aug", dest="repeated_augmentation", type=int, metavar="K",
                      help="repeated augmentation: K augmented clips per decoded training video")

    model = p.add_argument_group("model and ablations (paper Table 3)")
    model.add_argument("--preset", type=lambda s: json.loads(s) if s.lstrip().startswith("{") else s,
                       help="X3D preset XS|S|M|L, or a JSON object of X3DPreset fields, e.g. "
                       "'{\"name\": \"cpu\", \"depth_factor\": 0.5}'")
    model.add_argument("--pretrained", help="X3D checkpoint (PyTorchVideo X3D_*.pyth or SlowFast x3d_*.pyth)")
    model.add_argument("--no-tfam", dest="tfam", action="store_false", help="plain X3D backbone")
    model.add_argument("--tfam-stages", type=lambda s: [x for x in s.split(",") if x],
                       help="comma-separated stages to insert TFAM after, e.g. res4,res5")
    model.add_argument("--temporal-only", action="store_true", help="TFAM without the frequency branch")
    model.add_argument("--frequency-only", action="store_true", help="TFAM without the temporal branch")
    model.add_argument("--fusion", choices=CHOICES["fusion"], help="branch fusion (mean = 0.5/0.5)")
    model.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")

    loss = p.add_argument_group("loss")
    loss.add_argument("--no-girl", dest="girl", action="store_false", help="cross-entropy only")
    loss.add_argument("--lambda-girl", type=float)
    loss.add_argument("--girl-groups", choices=CHOICES["girl_groups"],
                      help="random pseudo-groups (paper) or real persons (subject ids)")
    loss.add_argument("--girl-num-groups", type=int)
    loss.add_argument("--girl-tau", type=float)
    loss.add_argument("--girl-eta", type=float)
    loss.add_argument("--girl-lambda-var", type=float)

    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--batch-size", type=int, help="global batch, split over torchrun processes")
    optim.add_argument("--eval-batch-size", type=int, help="per process")
    optim.add_argument("--lr", type=float)
    optim.add_argument("--weight-decay", type=float)
    optim.add_argument("--lr-schedule", choices=CHOICES["lr_schedule"])
    optim.add_argument("--lr-milestones", type=lambda s: [int(x) for x in s.split(",") if x])
    optim.add_argument("--warmup-epochs", type=float)
    optim.add_argument("--grad-clip-norm", type=float)
    return p.parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The config keys the user set on the command line."""
    given = dict(vars(args))
    for key in ("config", "resume", "stop_after_epoch", "set"):
        given.pop(key, None)
    temporal_only, frequency_only = given.pop("temporal_only", False), given.pop("frequency_only", False)
    if temporal_only and frequency_only:
        raise SystemExit("--temporal-only and --frequency-only exclude each other")
    if temporal_only:
        given.update(temporal=True, frequency=False)
    if frequency_only:
        given.update(temporal=False, frequency=True)
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=JSON_VALUE, got {item!r}")
        try:
            given[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            given[key.strip()] = value  # a bare string
    return given


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = overrides_from_args(args)
    resume = getattr(args, "resume", None)
    base = None
    if resume:
        from models.training.checkpointing import LAST_NAME, load_resume_checkpoint

        if resume == "auto":
            out_dir = overrides.get("out_dir")
            if out_dir is None:
                raise SystemExit("--resume without a checkpoint path needs --out (the run's folder)")
            resume = str(Path(out_dir) / LAST_NAME)
        if hasattr(args, "config"):
            raise SystemExit("--resume continues with the run's saved config; drop --config (override single options instead)")
        base = load_resume_checkpoint(resume)[0]["config"]  # the run reports a fallback to previous.pt
        overrides.setdefault("out_dir", str(Path(resume).parent))
    cfg = resolve_config(overrides, getattr(args, "config", None), base=base)

    from models.training.run import run_training

    return run_training(cfg, resume_path=resume, stop_after_epoch=getattr(args, "stop_after_epoch", None))

