"""DCT filter bank (SPEC §2): reference, cpp and triton backends behind one op."""

from .op import DCTFilterBank, dct_basis, dct_filter_bank
from .reference import dct_filter_bank_reference

__all__ = ["DCTFilterBank", "dct_basis", "dct_filter_bank", "dct_filter_bank_reference"]
