"""Run configuration for models/train.py: defaults, JSON config files, command-line overrides.

A run's configuration is one flat dict, built in three layers:
    DEFAULTS  <-  a JSON config file (configs/*.json)  <-  options given on the command line.
When no --config is given, the synthetic dataset uses configs/synthetic_default.json (the
project's main job, CPU-sized) and MA-52 uses configs/ma52_paper_x3d_m.json (the paper's
recipe, SPEC §6). On --resume the configuration saved in the checkpoint is the base and only
the options given explicitly on the command line override it.
"""

import json
from pathlib import Path

from models.errors import ConfigError, InputNotFound

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
SYNTHETIC_CONFIG = CONFIG_DIR / "synthetic_default.json"
PAPER_CONFIG = CONFIG_DIR / "ma52_paper_x3d_m.json"

NUM_CLASSES = 52  # MA-52 actions; the synthetic dataset uses the same 52 classes.

# Every key a run understands, with its default and meaning. Config files may set any
# subset; an unknown key is an error (a typo must not be silently ignored).
DEFAULTS = {
    # data
    "dataset": "synthetic",          # synthetic | ma52
    "data_root": None,               # MA-52 root (lists in the root or annotations/)
    "num_frames": 16,                # frames sampled uniformly over each clip
    "crop_size": 224,                # square crop fed to the network
    "synthetic_options": {},         # extra keyword arguments for SyntheticMicroActions
    "num_workers": None,             # DataLoader worker processes per rank (None: the cores per rank)
    "prefetch_factor": 2,            # batches each worker loads ahead
    "repeated_augmentation": 1,      # k augmented clips per decoded training video (batch_size / k videos)
    "max_train_clips": None,         # use only this many training clips (evenly spaced; smoke tests)
    "max_eval_clips": None,          # ... and validation/test clips
    # model (build_piumr); the ablation switches of the paper's Table 3
    "preset": "M",                   # X3D preset (XS, S, M, L) or a dict of X3DPreset fields
    "tfam": True,                    # insert TFAM after the stages below
    "tfam_stages": ["res2", "res3", "res4", "res5"],
    "temporal": True,                # TFAM temporal branch
    "frequency": True,               # TFAM frequency branch
    "fusion": "consistency",         # consistency | mean
    "pretrained": None,              # X3D checkpoint (PyTorchVideo X3D_*.pyth or SlowFast x3d_*.pyth)
    "sync_bn": False,                # SyncBatchNorm under DDP
    # loss: CE + lambda_girl * GIRL
    "girl": True,
    "lambda_girl": 1.0,
    "girl_groups": "random",         # random (pseudo-groups) | subject (real persons)
    "girl_num_groups": 4,
    "girl_tau": 0.07,
    "girl_eta": 0.2,
    "girl_lambda_var": 1.0,
    # optimisation
    "epochs": 120,
    "batch_size": 80,                # global batch: split evenly over the DDP ranks
    "eval_batch_size": None,         # per rank; None = the per-rank training batch
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "lr_schedule": "multistep",      # multistep | cosine
    "lr_milestones": [30, 60],       # epochs at which multistep multiplies the lr by lr_gamma
    "lr_gamma": 0.1,
    "warmup_epochs": 0.0,            # linear warm-up (fractional epochs allowed)
    "grad_clip_norm": None,          # clip the global gradient norm (None = no clipping)
    "amp": "auto",                   # auto | none | bf16 | fp16 (fp16 only on CUDA, with GradScaler)
    "compile": False,                # torch.compile (fullgraph) of the step's normalization, model and loss
    "memory_format": "contiguous",     # contiguous | channels_last (NDHWC activations and 3D weights)
    "max_consecutive_skips": 20,     # fp16: stop when the scaler skips this many steps in a row
    # run
    "seed": 0,
    "device": "auto",                # auto | cpu | cuda
    "torch_threads": None,           # intra-op CPU threads per process (None: torch's default)
    "out_dir": "runs/synthetic",
    "test_at_end": True,             # evaluate the best checkpoint on the test split (labelled splits only)
    "progress": True,                # tqdm progress bars
}

CHOICES = {
    "dataset": ("synthetic", "ma52"),
    "fusion": ("consistency", "mean"),
    "girl_groups": ("random", "subject"),
    "optimizer": ("adamw",),
    "lr_schedule": ("multistep", "cosine"),
    "amp": ("auto", "none", "bf16", "fp16"),
    "memory_format": ("channels_last", "contiguous"),
    "device": ("auto", "cpu", "cuda"),
}

TFAM_STAGES = ("res2", "res3", "res4", "res5")


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
    return {k: v for k, v in data.items() if not k.startswith("_")}


def default_config_path(dataset: str) -> Path:
    return SYNTHETIC_CONFIG if dataset == "synthetic" else PAPER_CONFIG


def resolve_config(overrides: dict, config_path=None, base: dict | None = None) -> dict:
    """DEFAULTS <- config file (or `base`, a saved run config) <- overrides; validated."""
    cfg = dict(DEFAULTS)
    if base is not None:
        cfg.update(base)
    else:
        dataset = overrides.get("dataset") or ("ma52" if overrides.get("data_root") else "synthetic")
        cfg.update(load_config_file(config_path or default_config_path(dataset)))
    cfg.update(overrides)
    if cfg.get("data_root") and "dataset" not in overrides and base is None and cfg["dataset"] == "synthetic":
        cfg["dataset"] = "ma52"  # --data-root alone means "train on this MA-52 copy"
    return validate_config(cfg)


def validate_config(cfg: dict) -> dict:
    """Check names, choices and ranges; errors name the key, what was expected and what came."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(DEFAULTS)}")
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"config '{key}': expected one of {allowed}, got {cfg[key]!r}")
    for key in ("num_frames", "crop_size", "epochs", "batch_size", "girl_num_groups", "max_consecutive_skips",
                "prefetch_factor", "repeated_augmentation"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"config '{key}': expected a positive integer, got {cfg[key]!r}")
    for key in ("lr", "lambda_girl", "girl_tau", "girl_eta"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            raise ConfigError(f"config '{key}': expected a positive number, got {cfg[key]!r}")
    for key in ("max_train_clips", "max_eval_clips"):
        if cfg[key] is not None and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ConfigError(f"config '{key}': expected a positive integer or null, got {cfg[key]!r}")
    if cfg["torch_threads"] is not None and (not isinstance(cfg["torch_threads"], int) or cfg["torch_threads"] < 1):
        raise ConfigError(f"config 'torch_threads': expected a positive integer or null, got {cfg['torch_threads']!r}")
    if cfg["num_workers"] is not None and (not isinstance(cfg["num_workers"], int) or cfg["num_workers"] < 0):
        raise ConfigError(f"config 'num_workers': expected an integer >= 0 or null, got {cfg['num_workers']!r}")
    if not isinstance(cfg["compile"], bool):
        raise ConfigError(f"config 'compile': expected true or false, got {cfg['compile']!r}")
    bad_stages = [s for s in cfg["tfam_stages"] if s not in TFAM_STAGES]
    if bad_stages or not cfg["tfam_stages"]:
        raise ConfigError(f"config 'tfam_stages': expected a non-empty subset of {TFAM_STAGES}, got {cfg['tfam_stages']!r}")
    if cfg["tfam"] and not (cfg["temporal"] or cfg["frequency"]):
        raise ConfigError("config: TFAM needs at least one branch; 'temporal' and 'frequency' are both false (use tfam=false / --no-tfam to drop TFAM)")
    if cfg["dataset"] == "ma52" and not cfg["data_root"]:
        raise ConfigError("config 'data_root': the ma52 dataset needs --data-root PATH (the folder holding the MA-52 lists and videos)")
    if not isinstance(cfg["synthetic_options"], dict):
        raise ConfigError(f"config 'synthetic_options': expected a JSON object, got {cfg['synthetic_options']!r}")
    if sorted(cfg["lr_milestones"]) != list(cfg["lr_milestones"]):
        raise ConfigError(f"config 'lr_milestones': expected increasing epochs, got {cfg['lr_milestones']!r}")
    return cfg
