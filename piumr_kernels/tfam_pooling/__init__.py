"""TFAM's fused passes over the activation (SPEC §5): statistics and combine, three backends."""

from .op import TFAMCombine, TFAMLink, TFAMStatistics, tfam_combine, tfam_statistics
from .reference import tfam_combine_reference, tfam_statistics_reference

__all__ = [
    "TFAMCombine",
    "TFAMLink",
    "TFAMStatistics",
    "tfam_combine",
    "tfam_combine_reference",
    "tfam_statistics",
    "tfam_statistics_reference",
]
