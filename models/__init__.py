"""PIUmr reference model: X3D backbone, TFAM, training objective.

- `models.x3d`: X3D-XS/S/M/L in PyTorchVideo's `create_x3d` layout (`build_x3d`, `PRESETS`).
- `models.checkpoints`: official PyTorchVideo / SlowFast X3D checkpoints (`load_x3d_checkpoint`).
- `models.tfam`: the temporal-frequency attention module (`TFAM`).
- `models.piumr`: X3D + TFAM (`build_piumr`, `PIUmr`), CE + GIRL objective (`PIUmrLoss`),
  the paper's ablation rows (`ABLATIONS`).
"""
