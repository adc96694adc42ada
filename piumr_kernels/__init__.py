"""Fused kernels for PIUmr: batched Sinkhorn–Knopp, the DCT filter bank, the GIRL loss and
TFAM's two passes over the activation.

Every op has a reference (plain PyTorch), a cpp (compiled CPU) and a triton (GPU) backend;
see `piumr_kernels.info()` and `piumr_kernels.use_backend`.
"""

__version__ = "0.1.0"

from .backends import BackendUnavailableError, info, use_backend
from .dct import DCTFilterBank, dct_basis, dct_filter_bank
from .girl import GIRLLoss, girl_loss
from .sinkhorn_knopp import SinkhornKernel, sinkhorn
from .tfam_pooling import TFAMCombine, TFAMStatistics, tfam_combine, tfam_statistics

__all__ = [
    "BackendUnavailableError",
    "DCTFilterBank",
    "GIRLLoss",
    "SinkhornKernel",
    "TFAMCombine",
    "TFAMStatistics",
    "dct_basis",
    "dct_filter_bank",
    "girl_loss",
    "info",
    "sinkhorn",
    "tfam_combine",
    "tfam_statistics",
    "use_backend",
]
