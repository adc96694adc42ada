"""The network: X3D backbone, its pretrained weights, TFAM and PIUmr.

- `models.modelling.x3d`: X3D-XS/S/M/L in PyTorchVideo's `create_x3d` layout (`build_x3d`, `PRESETS`).
- `models.modelling.x3d_weights`: Kinetics-pretrained X3D weights from the official
  PyTorchVideo / SlowFast files (`load_x3d_checkpoint`).
- `models.modelling.tfam`: the temporal-frequency attention module (`TFAM`).
- `models.modelling.piumr`: X3D + TFAM (`build_piumr`, `PIUmr`), the CE + GIRL objective
  (`PIUmrLoss`), the paper's ablation rows (`ABLATIONS`).
- `models.modelling.hdf`: the predecessor method HDF, X3D + DAM (`build_hdf`, `HDF`, `DAM`)
  and its DSM objective (`DSMLoss`), docs/hdf.md.
- `models.modelling.objective`: the call both objectives share (`Objective`: cross-entropy
  plus a term on the features).
"""

from models.modelling.hdf import DAM, HDF, DSMLoss, build_hdf
from models.modelling.piumr import ABLATIONS, PIUmr, PIUmrLoss, build_piumr
from models.modelling.tfam import TFAM
from models.modelling.x3d import PRESETS, X3D, X3DPreset, build_x3d
from models.modelling.x3d_weights import load_x3d_checkpoint

__all__ = [
    "ABLATIONS",
    "DAM",
    "DSMLoss",
    "HDF",
    "PRESETS",
    "PIUmr",
    "PIUmrLoss",
    "TFAM",
    "X3D",
    "X3DPreset",
    "build_hdf",
    "build_piumr",
    "build_x3d",
    "load_x3d_checkpoint",
]
