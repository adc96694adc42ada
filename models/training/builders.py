"""What a run's configuration builds: the model, the loss, the optimiser and the
learning-rate schedule.

The learning rate follows the schedule per optimisation step: `multistep` multiplies it by
`lr_gamma` once `lr_milestones` epochs are done (the paper: x0.1 at 30 and 60), `cosine`
decays it to zero over the run; both after an optional linear warm-up of `warmup_epochs`.
"""

import math

import torch

from models.modelling import DSMLoss, PIUmrLoss, X3DPreset, build_hdf, build_piumr
from models.training.config import TrainConfig, num_classes
from models.training.sam import SAM


def model_preset(cfg: TrainConfig):
    """`preset` is an X3D preset name (XS, S, M, L) or a dict of X3DPreset fields (a custom
    depth, e.g. the CPU-sized model of configs/synthetic_default.json)."""
    preset = cfg.preset
    if isinstance(preset, dict):
        fields = {"name": "custom", "num_frames": cfg.num_frames, "crop_size": cfg.crop_size, **preset}
        return X3DPreset(**fields)
    return preset


def build_model(cfg: TrainConfig, load_pretrained: bool = True) -> torch.nn.Module:
    """PIUmr with the configured preset and ablation switches (or HDF, `model`), sized for
    `num_frames` (TFAM's and DAM's T x T parameters); `pretrained` X3D weights into the
    backbone when `load_pretrained`."""
    pretrained = cfg.pretrained if load_pretrained else None
    if cfg.model == "hdf":
        return build_hdf(model_preset(cfg), num_classes(cfg), num_frames=cfg.num_frames, pretrained=pretrained)
    return build_piumr(
        model_preset(cfg),
        num_classes(cfg),
        tfam=cfg.tfam,
        tfam_stages=tuple(cfg.tfam_stages),
        temporal=cfg.temporal,
        frequency=cfg.frequency,
        fusion=cfg.fusion,
        num_frames=cfg.num_frames,
        pretrained=pretrained,
    )


def build_loss(cfg: TrainConfig) -> torch.nn.Module:
    """PIUmr's CE + GIRL, or HDF's DSM objective (`model` hdf)."""
    if cfg.model == "hdf":
        return DSMLoss(
            scaling=cfg.dsm_scaling,
            lambda_ib=cfg.lambda_ib,
            tau=cfg.girl_tau,
            eta=cfg.girl_eta,
            label_smoothing=cfg.label_smoothing,
        )
    if not cfg.girl:
        return PIUmrLoss(lambda_girl=cfg.lambda_girl, girl=False, label_smoothing=cfg.label_smoothing)
    return PIUmrLoss(
        lambda_girl=cfg.lambda_girl,
        label_smoothing=cfg.label_smoothing,
        num_groups=cfg.girl_num_groups,
        tau=cfg.girl_tau,
        eta=cfg.girl_eta,
        lambda_var=cfg.girl_lambda_var,
    )


# Each `optimizer` choice (TrainConfig.optimizer): a function of (parameters, cfg) returning the optimiser.
OPTIMIZERS = {
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "sam_adamw": lambda params, cfg: SAM(
        torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), rho=cfg.sam_rho
    ),
}


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer | SAM:
    """The `optimizer` of the configuration over the model's parameters (a `SAM` wrapper takes
    the loop's second forward/backward pass, models/training/loop.py)."""
    return OPTIMIZERS[cfg.optimizer](model.parameters(), cfg)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int):
    """Learning-rate multiplier as a function of the optimisation step."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if cfg.lr_schedule == "multistep":
            done_epochs = step / steps_per_epoch
            return scale * cfg.lr_gamma ** sum(done_epochs >= m for m in cfg.lr_milestones)
        progress = min(1.0, max(0.0, (step - warmup) / max(1.0, total - warmup)))
        return scale * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer | SAM, steps_per_epoch: int):
    # LambdaLR needs a torch Optimizer; SAM shares its base optimizer's param_groups.
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    return torch.optim.lr_scheduler.LambdaLR(base, lr_factor(cfg, steps_per_epoch))
