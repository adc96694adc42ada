"""Train PIUmr (X3D + TFAM, CE + GIRL loss) and report the official MA-52 metrics.

    python models/train.py                       # the main job: synthetic data, CPU-sized (time: README)
    python models/train.py --data-root /data/MA-52                # real MA-52, the paper's recipe
    torchrun --nproc_per_node 8 models/train.py --data-root /data/MA-52
    python models/train.py --out runs/synthetic --resume          # continue a stopped run

Configuration: the defaults of TrainConfig (models/training/config.py) <- a JSON file
(--config; by default configs/synthetic_default.json for synthetic data,
configs/ma52_paper_x3d_m.json for MA-52) <- the options below, one per configuration key.
With --resume the run's saved configuration replaces the file and only options given here
override it. Outputs in --out: config.json (the resolved configuration), last.pt (every
epoch), best.pt (best validation F1_mean), metrics.csv, curves.png, tensorboard/, summary.json.
A mistake in what was given (a missing data root or list, a malformed list, an unusable
checkpoint, a bad option value) prints one error line and exits with status 1.
"""

import argparse
import json
import typing
from pathlib import Path

from models.training.config import FIELDS, GROUPS, TYPES, is_union, resolve_config


def _alternatives(kind) -> list:
    """The types a key of type `kind` may hold besides None."""
    return [k for k in typing.get_args(kind) if k is not type(None)] if is_union(kind) else [kind]


def _parser_of(kind):
    """The argparse `type` for a configuration key of type `kind` (bool keys are flags)."""
    options = _alternatives(kind)
    if len(options) == 2 and set(options) == {str, dict}:  # preset: a name or a JSON object
        return lambda text: json.loads(text) if text.lstrip().startswith("{") else text
    (kind,) = options
    if kind is dict:
        return json.loads
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return lambda text: [item(x) for x in text.split(",") if x]
    return kind


def _metavar(kind) -> str | None:
    """How `--help` shows the value of a key of type `kind` (None: argparse's choices)."""
    kind = _alternatives(kind)[0]
    if typing.get_origin(kind) is list:
        return "A,B,..."
    return {int: "N", float: "X", dict: "JSON"}.get(kind)


def _flag(field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    # Every option defaults to "not given" so that the config file (or a resumed run's saved
    # config) supplies the value unless the user typed it.
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS
    )
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in FIELDS:
        kind, meta, group = TYPES[f.name], f.metadata, groups[f.metadata["group"]]
        text = meta["help"] + (f" [{f.name}]" if _flag(f)[2:] != f.name.replace("_", "-") else "")
        if kind is bool:
            group.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        else:
            group.add_argument(
                _flag(f),
                dest=f.name,
                type=_parser_of(kind),
                choices=meta["choices"] if kind is str else None,
                metavar=meta["metavar"] or _metavar(kind),
                help=text,
            )
    groups["model"].add_argument(
        "--temporal-only", action="store_true", help="TFAM without the frequency branch (--no-frequency)"
    )
    groups["model"].add_argument(
        "--frequency-only", action="store_true", help="TFAM without the temporal branch (--no-temporal)"
    )
    run = groups["run"]
    run.add_argument("--config", metavar="PATH", help="JSON config file (see configs/)")
    run.add_argument(
        "--resume", nargs="?", const="auto", metavar="CHECKPOINT", help="continue a run (default: OUT/last.pt)"
    )
    run.add_argument(
        "--stop-after-epoch",
        type=int,
        metavar="N",
        help="stop after epoch N of the schedule (continue later with --resume)",
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=JSON",
        help="set any config key, e.g. --set 'synthetic_options={\"persons_train\": 12}' (repeatable)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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
            raise SystemExit(
                "--resume continues with the run's saved config; drop --config (override single options instead)"
            )
        base = load_resume_checkpoint(resume)[0]["config"]  # the run reports a fallback to previous.pt
        overrides.setdefault("out_dir", str(Path(resume).parent))
    cfg = resolve_config(overrides, getattr(args, "config", None), base=base)

    from models.training.run import run_training

    return run_training(cfg, resume_path=resume, stop_after_epoch=getattr(args, "stop_after_epoch", None))
