"""Batched Sinkhorn–Knopp (SPEC §1): reference, cpp and triton backends behind one op."""

from .op import SinkhornKernel, sinkhorn
from .reference import sinkhorn_reference

__all__ = ["SinkhornKernel", "sinkhorn", "sinkhorn_reference"]
