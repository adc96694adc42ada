"""Fused kernels for PIUmr: batched Sinkhorn–Knopp, the DCT filter bank and the GIRL loss.

Every op has a reference (plain PyTorch), a cpp (compiled CPU) and a triton (GPU) backend;
see `piumr_kernels.info()` and `piumr_kernels.use_backend`.
"""

__version__ = "0.1.0"

from .backends import BackendUnavailableError, info, use_backend
from .girl import GIRLLoss, girl_loss
from .sinkhorn_knopp import SinkhornKernel, sinkhorn

__all__ = [
    "BackendUnavailableError",
    "GIRLLoss",
    "SinkhornKernel",
    "girl_loss",
    "info",
    "sinkhorn",
    "use_backend",
]
