"""The configuration of a training run: every key declared once, in `TrainConfig`.

Each field of `TrainConfig` is a configuration key with its type, default, help text, its
`--help` group (data, model, loss, optimisation, run) and, where they apply, its choices and
lower bound. The command line of models/train.py (models/training/cli.py) and the JSON
config files are derived from it, and `TrainConfig.validate` is the one place values are
checked. A run's configuration is built in three layers:

    the field defaults  <-  a JSON config file (configs/*.json)  <-  options on the command line.

When no --config is given, the synthetic dataset uses configs/synthetic_default.json (the
project's main job, CPU-sized) and MA-52 uses configs/ma52_paper_x3d_m.json (the paper's
recipe, SPEC §6). On --resume the configuration saved in the checkpoint is the base and only
the options given explicitly on the command line override it. Config files and saved
checkpoints hold the flat dict of `TrainConfig.to_dict()`; an unknown key is an error (a
typo must not be silently ignored).

Adding a key: declare it here with `option(...)`, read it as `cfg.<name>`; its command-line
flag, `--help` entry, config-file key and validation follow.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from models.errors import ConfigError, InputNotFound

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
SYNTHETIC_CONFIG = CONFIG_DIR / "synthetic_default.json"
PAPER_CONFIG = CONFIG_DIR / "ma52_paper_x3d_m.json"
DFEW_CONFIG = CONFIG_DIR / "hdf_dfew.json"

NUM_CLASSES = 52  # MA-52 actions; the synthetic dataset uses the same 52 classes.
DFEW_CLASSES = 7  # DFEW's expressions (models.data.dfew.LABELS)
DFEW_FOLDS = 5
GROUPS = ("data", "model", "loss", "optimisation", "run")
TFAM_STAGES = ("res2", "res3", "res4", "res5")


def option(
    group: str,
    default,
    help: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    above: float | None = None,
    flag: str | None = None,
    metavar: str | None = None,
):
    """A configuration key: `group` of `--help`, `choices` (for a list: of each element),
    `minimum` (>=) or `above` (>) for numbers, `flag`: the command-line name when it is not
    `--<name with dashes>`."""
    metadata = {
        "group": group,
        "help": help,
        "choices": choices,
        "minimum": minimum,
        "above": above,
        "flag": flag,
        "metavar": metavar,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # data
    dataset: str = option("data", "synthetic", "the dataset to train on", choices=("synthetic", "ma52", "dfew"))
    data_root: str | None = option(
        "data",
        None,
        "MA-52 root folder (lists in the root or annotations/; given "
        "alone it implies --dataset ma52) or DFEW root (EmoLabel_DataSplit/, Clip/)",
        metavar="PATH",
    )
    dfew_fold: int = option(
        "data", 1, "DFEW fold 1..5: train on its train file, validate and test on its test file", minimum=1
    )
    num_frames: int = option("data", 16, "frames sampled uniformly over each clip", minimum=1)
    crop_size: int = option("data", 224, "side of the square crop fed to the network", minimum=1)
    synthetic_options: dict = option(
        "data", {}, "extra keyword arguments of SyntheticMicroActions, as JSON, e.g. '{\"persons_train\": 12}'"
    )
    num_workers: int | None = option(
        "data",
        None,
        "DataLoader worker processes per process (default: the CPU cores per process)",
        minimum=0,
        flag="--workers",
    )
    prefetch_factor: int = option("data", 2, "batches each worker loads ahead", minimum=1, flag="--prefetch")
    repeated_augmentation: int = option(
        "data",
        1,
        "repeated augmentation: K augmented clips per decoded training video (batch_size / K videos per step)",
        minimum=1,
        flag="--repeated-aug",
        metavar="K",
    )
    batch_sampler: str = option(
        "data",
        "random",
        "training batches: random, or m_per_class (class-balanced: "
        "m_per_class clips of each of batch/m classes, so GIRL's groups hold same-class "
        "partners)",
        choices=("random", "m_per_class"),
    )
    m_per_class: int = option(
        "data",
        4,
        "clips per class in a batch with batch_sampler m_per_class (a multiple of repeated_augmentation)",
        minimum=1,
        metavar="M",
    )
    max_train_clips: int | None = option(
        "data", None, "train on this many clips only, evenly spaced (smoke tests)", minimum=1
    )
    max_eval_clips: int | None = option("data", None, "validate and test on this many clips only", minimum=1)
    # model (build_piumr or build_hdf); the ablation switches of the paper's Table 3
    model: str = option(
        "model",
        "piumr",
        "PIUmr (X3D + TFAM, CE + GIRL) or HDF (X3D + DAM, HDF's DSM loss: docs/hdf.md)",
        choices=("piumr", "hdf"),
    )
    preset: str | dict = option(
        "model",
        "M",
        'X3D preset XS|S|M|L, or a JSON object of X3DPreset fields, e.g. \'{"name": "cpu", "depth_factor": 0.5}\'',
        choices=("XS", "S", "M", "L"),
        metavar="NAME|JSON",
    )
    tfam: bool = option("model", True, "TFAM after the stages of tfam_stages (--no-tfam: plain X3D)")
    tfam_stages: list[str] = option(
        "model", list(TFAM_STAGES), "comma-separated stages to insert TFAM after, e.g. res4,res5", choices=TFAM_STAGES
    )
    temporal: bool = option("model", True, "TFAM's temporal branch")
    frequency: bool = option("model", True, "TFAM's frequency branch")
    fusion: str = option(
        "model", "consistency", "fusion of TFAM's branches (mean: 0.5/0.5)", choices=("consistency", "mean")
    )
    pretrained: str | None = option(
        "model", None, "X3D checkpoint (PyTorchVideo X3D_*.pyth or SlowFast x3d_*.pyth)", metavar="PATH"
    )
    sync_bn: bool = option("model", False, "SyncBatchNorm under torchrun")
    # loss: CE + lambda_girl * GIRL
    girl: bool = option("loss", True, "the GIRL term (--no-girl: cross-entropy only)")
    lambda_girl: float = option("loss", 1.0, "weight of GIRL in CE + lambda * GIRL", above=0)
    girl_groups: str = option(
        "loss",
        "random",
        "GIRL groups: random pseudo-groups (the paper) or real persons (subject ids)",
        choices=("random", "subject"),
    )
    girl_num_groups: int = option(
        "loss",
        4,
        "random pseudo-groups per batch (with girl_groups subject and batch_sampler m_per_class: persons per batch)",
        minimum=1,
    )
    girl_tau: float = option("loss", 0.07, "GIRL's temperature", above=0)
    girl_eta: float = option("loss", 0.2, "GIRL's eta (SPEC §3)", above=0)
    girl_lambda_var: float = option("loss", 1.0, "weight of GIRL's variance term", minimum=0)
    label_smoothing: float = option("loss", 0.0, "label smoothing of the cross-entropy, in [0, 1]", minimum=0)
    dsm_scaling: str = option(
        "loss",
        "fixed",
        "HDF's loss weights: fixed (10 CE + 0.1 DSM, HDF's code) or "
        "gradient (from the previous step's gradient norm, HDF's paper)",
        choices=("fixed", "gradient"),
    )
    lambda_ib: float = option(
        "loss",
        0.1,
        "HDF: weight of DSM's information-bottleneck term (girl_tau and girl_eta set DSM's contrastive term)",
        minimum=0,
    )
    # optimisation
    epochs: int = option("optimisation", 120, "epochs of the schedule", minimum=1)
    batch_size: int = option("optimisation", 80, "global batch, split evenly over the torchrun processes", minimum=1)
    eval_batch_size: int | None = option(
        "optimisation",
        None,
        "validation/test clips per process and step (default: the per-process training batch)",
        minimum=1,
    )
    optimizer: str = option(
        "optimisation",
        "adamw",
        "the optimiser (sam_adamw: SAM around AdamW, two forward/backward passes per step)",
        choices=("adamw", "sam_adamw"),
    )
    sam_rho: float = option("optimisation", 0.05, "SAM's ascent radius (optimizer sam_adamw)", above=0)
    lr: float = option("optimisation", 1e-3, "peak learning rate", above=0)
    weight_decay: float = option("optimisation", 1e-4, "decoupled weight decay", minimum=0)
    lr_schedule: str = option(
        "optimisation", "multistep", "learning-rate schedule after the warm-up", choices=("multistep", "cosine")
    )
    lr_milestones: list[int] = option(
        "optimisation",
        [30, 60],
        "comma-separated epochs at which multistep multiplies the learning rate by lr_gamma",
        minimum=1,
    )
    lr_gamma: float = option("optimisation", 0.1, "multistep's factor at each milestone", above=0)
    warmup_epochs: float = option("optimisation", 0.0, "linear warm-up, in (fractional) epochs", minimum=0)
    grad_clip_norm: float | None = option(
        "optimisation", None, "clip the global gradient norm (default: no clipping)", above=0
    )
    max_consecutive_skips: int = option(
        "optimisation", 20, "fp16: stop when the GradScaler skips this many steps in a row", minimum=1
    )
    # run
    seed: int = option("run", 0, "seed of everything random (exact resume on CPU)")
    device: str = option("run", "auto", "where to train", choices=("auto", "cpu", "cuda"))
    amp: str = option(
        "run",
        "auto",
        "mixed precision (auto: bf16, or fp16 with a GradScaler, on a GPU; off on CPU; fp16 only on CUDA)",
        choices=("auto", "none", "bf16", "fp16"),
    )
    compile: bool = option("run", False, "torch.compile (fullgraph) the step's normalization, model and loss")
    memory_format: str = option(
        "run",
        "contiguous",
        "activation and 3D-weight layout (channels_last: NDHWC)",
        choices=("contiguous", "channels_last"),
    )
    torch_threads: int | None = option(
        "run", None, "CPU threads per process for torch (default: torch's)", minimum=1, flag="--threads"
    )
    out_dir: str = option(
        "run", "runs/synthetic", "output folder for checkpoints and logs", flag="--out", metavar="PATH"
    )
    test_at_end: bool = option(
        "run", True, "evaluate the best checkpoint on the test split at the end (labelled splits only)", flag="--test"
    )
    progress: bool = option("run", True, "tqdm progress bars")

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        """A configuration from a flat dict (a config file, a checkpoint's saved config); the
        keys it lacks keep their defaults; an unknown key is an error naming it and `source`."""
        check_keys(values, source)
        return cls(**copy.deepcopy(values))

    def to_dict(self) -> dict:
        """The flat dict config files and checkpoints hold."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Every key's type, choices and bounds, then the rules between keys; an error names
        the key, what was expected and what was found."""
        for f in FIELDS:
            check_value(f, getattr(self, f.name))
        if self.tfam and not (self.temporal or self.frequency):
            raise ConfigError(
                "config: TFAM needs at least one branch; 'temporal' and 'frequency' are both false "
                "(use tfam=false / --no-tfam to drop TFAM)"
            )
        if not self.tfam_stages:
            raise ConfigError(f"config 'tfam_stages': expected a non-empty subset of {TFAM_STAGES}, got []")
        if self.dataset == "ma52" and not self.data_root:
            raise ConfigError(
                "config 'data_root': the ma52 dataset needs --data-root PATH (the folder holding the "
                "MA-52 lists and videos)"
            )
        if self.dataset == "dfew" and not self.data_root:
            raise ConfigError(
                "config 'data_root': the dfew dataset needs --data-root PATH (the folder holding "
                "EmoLabel_DataSplit and Clip)"
            )
        if self.dfew_fold > DFEW_FOLDS:
            raise ConfigError(f"config 'dfew_fold': expected a fold in 1..{DFEW_FOLDS}, got {self.dfew_fold}")
        if self.label_smoothing > 1:
            raise ConfigError(f"config 'label_smoothing': expected a value in [0, 1], got {self.label_smoothing}")
        if self.model == "hdf" and self.girl_groups == "subject":
            raise ConfigError(
                "config 'girl_groups': HDF's DSM contrasts the whole batch as one group, expected "
                "'random' with model 'hdf', got 'subject'"
            )
        if sorted(self.lr_milestones) != list(self.lr_milestones):
            raise ConfigError(f"config 'lr_milestones': expected increasing epochs, got {self.lr_milestones!r}")


FIELDS = dataclasses.fields(TrainConfig)
TYPES = typing.get_type_hints(TrainConfig)
BY_NAME = {f.name: f for f in FIELDS}


def is_union(kind) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _matches(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if is_union(kind):
        return any(_matches(value, k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(kind)[0]) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def describe(kind) -> str:
    """`kind` in words, for error messages."""
    if kind is type(None):
        return "null"
    if is_union(kind):
        return " or ".join(describe(k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return f"a list of {describe(typing.get_args(kind)[0]).split(' ', 1)[1]}s"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a JSON object"}[
        kind
    ]


def check_value(f: dataclasses.Field, value) -> None:
    """One key's type, choices and bounds."""
    kind, meta = TYPES[f.name], f.metadata
    if not _matches(value, kind):
        raise ConfigError(f"config '{f.name}': expected {describe(kind)}, got {value!r}")
    items = value if isinstance(value, list) else [value]
    if meta["choices"] is not None:
        bad = [v for v in items if isinstance(v, str) and v not in meta["choices"]]
        if bad:
            raise ConfigError(f"config '{f.name}': expected one of {meta['choices']}, got {value!r}")
    numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if meta["minimum"] is not None and any(v < meta["minimum"] for v in numbers):
        raise ConfigError(f"config '{f.name}': expected a value >= {meta['minimum']}, got {value!r}")
    if meta["above"] is not None and any(v <= meta["above"] for v in numbers):
        raise ConfigError(f"config '{f.name}': expected a value > {meta['above']}, got {value!r}")


def check_keys(values: dict, source: str) -> None:
    """Every key of `values` is a configuration key; the error names the unknown ones and `source`."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {unknown}; known keys: {sorted(BY_NAME)}")


def choices(name: str) -> tuple:
    """The allowed values of the key `name`."""
    return BY_NAME[name].metadata["choices"]


def load_config_file(path) -> dict:
    """Read a JSON config file; keys starting with '_' are comments and are dropped."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSON or UTF-8
        raise ConfigError(f"config file {path}: expected JSON, got {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a JSON object, got {type(data).__name__}")
    values = {k: v for k, v in data.items() if not k.startswith("_")}
    check_keys(values, f"config file {path}")
    return values


def default_config_path(dataset: str) -> Path:
    return {"synthetic": SYNTHETIC_CONFIG, "dfew": DFEW_CONFIG}.get(dataset, PAPER_CONFIG)


def num_classes(cfg: TrainConfig) -> int:
    """The classifier's outputs for the configured dataset."""
    return DFEW_CLASSES if cfg.dataset == "dfew" else NUM_CLASSES


def resolve_config(overrides: dict, config_path=None, base: dict | None = None) -> TrainConfig:
    """Field defaults <- config file (or `base`, a saved run's config) <- overrides; validated."""
    if base is not None:
        values = dict(base)
    else:
        dataset = overrides.get("dataset") or ("ma52" if overrides.get("data_root") else "synthetic")
        values = load_config_file(config_path or default_config_path(dataset))
    values.update(overrides)
    synthetic = values.get("dataset", "synthetic") == "synthetic"
    if values.get("data_root") and "dataset" not in overrides and base is None and synthetic:
        values["dataset"] = "ma52"  # --data-root alone means "train on this MA-52 copy"
    return TrainConfig.from_dict(values, "config")
