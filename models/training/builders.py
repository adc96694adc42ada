"""What a run's configuration builds: the model, the loss, the optimiser and the
learning-rate schedule.

The learning rate follows the schedule per optimisation step: `multistep` multiplies it by
`lr_gamma` once `lr_milestones` epochs are done (the paper: x0.1 at 30 and 60), `cosine`
decays it to zero over the run; both after an optional linear warm-up of `warmup_epochs`.
"""

import math

import torch

from models.modelling import PIUmrLoss, X3DPreset, build_piumr
from models.training.config import NUM_CLASSES, TrainConfig


def model_preset(cfg: TrainConfig):
    """`preset` is an X3D preset name (XS, S, M, L) or a dict of X3DPreset fields (a custom
    depth, e.g. the CPU-sized model of configs/synthetic_default.json)."""
    preset = cfg.preset
    if isinstance(preset, dict):
        fields = {"name": "custom", "num_frames": cfg.num_frames, "crop_size": cfg.crop_size, **preset}
        return X3DPreset(**fields)
    return preset


def build_model(cfg: TrainConfig, load_pretrained: bool = True) -> torch.nn.Module:
    """PIUmr with the configured preset and ablation switches, sized for `num_frames` (TFAM's
    T x T parameters); `pretrained` X3D weights into the backbone when `load_pretrained`."""
    return build_piumr(model_preset(cfg), NUM_CLASSES, tfam=cfg.tfam, tfam_stages=tuple(cfg.tfam_stages),
                       temporal=cfg.temporal, frequency=cfg.frequency, fusion=cfg.fusion,
                       num_frames=cfg.num_frames, pretrained=cfg.pretrained if load_pretrained else None)


def build_loss(cfg: TrainConfig) -> torch.nn.Module:
    if not cfg.girl:
        return PIUmrLoss(lambda_girl=cfg.lambda_girl, girl=False)
    return PIUmrLoss(lambda_girl=cfg.lambda_girl, num_groups=cfg.girl_num_groups, tau=cfg.girl_tau,
                     eta=cfg.girl_eta, lambda_var=cfg.girl_lambda_var)


# Each `optimizer` choice (TrainConfig.optimizer): a function of (parameters, cfg) returning the optimiser.
OPTIMIZERS = {
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The `optimizer` of the configuration over the model's parameters."""
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


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
