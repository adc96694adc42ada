"""GIRL loss (SPEC §3): in-group Gaussian-weighted contrastive loss with a group-risk
variance penalty; reference, cpp and triton backends behind one op."""

from .op import GIRLLoss, girl_loss
from .precision import set_triton_fp32_precision, triton_fp32_precision
from .reference import girl_loss_reference

__all__ = ["GIRLLoss", "girl_loss", "girl_loss_reference", "set_triton_fp32_precision", "triton_fp32_precision"]
