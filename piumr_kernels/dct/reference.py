"""The DCT filter bank in plain PyTorch: the basis, and the op exactly as HDF writes it.

`dct_filter_bank_reference` is PIUmr Eq. (1) as HDF implements it: the temporal mean of
`x`, then `Conv2d` with every DCT filter repeated over all `C` input channels. It is the
readable ground truth and the eager benchmark baseline; the fused backends compute the
same numbers from the channel sum (one read of `x`) and separable 1-D passes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..fused_op import accumulation_dtype


def dct_basis_1d(
    kernel_size: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """`(k, k)` orthonormal 1-D DCT-II: row `u` is `c(u) cos(pi (2i + 1) u / 2k)` over `i`.
    Built on `device` (no host-to-device copy), in float64, then cast to `dtype`."""
    k = kernel_size
    u = torch.arange(k, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(k, dtype=torch.float64, device=device)[None, :]
    scale = torch.full_like(u, math.sqrt(2.0 / k)).masked_fill(u == 0, math.sqrt(1.0 / k))
    return (scale * torch.cos(math.pi * (2 * i + 1) * u / (2 * k))).to(dtype)


def dct_basis_reference(
    kernel_size: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """`(k*k, k, k)`: filter `d` is `a[d % k, i] * a[d // k, j]` (u = d mod k along H, v = d div k along W)."""
    a = dct_basis_1d(kernel_size, device=device)
    k = kernel_size
    d = torch.arange(k * k, device=device)
    return (a[d % k][:, :, None] * a[d // k][:, None, :]).to(dtype)


def select_filters(bank: torch.Tensor, frequencies: list[int] | None) -> torch.Tensor:
    """The rows `frequencies` of `bank` (all of them for None), gathered on its device: each
    row is a view, so no index tensor is copied from the host."""
    if frequencies is None or list(frequencies) == list(range(bank.shape[0])):
        return bank
    return torch.stack([bank[index] for index in frequencies])


def dct_filter_bank_reference(
    x: torch.Tensor,
    kernel_size: int = 7,
    frequencies: list[int] | None = None,
    return_stats: bool = False,
):
    """SPEC §2 the straightforward way; float32 math below float64, results in `x.dtype`."""
    acc = accumulation_dtype(x.dtype)
    basis = select_filters(dct_basis_reference(kernel_size, acc, x.device), frequencies)
    channels = x.shape[1]
    weight = basis[:, None].expand(-1, channels, -1, -1)
    E = F.conv2d(x.to(acc).mean(dim=2), weight, padding=kernel_size // 2)
    if not return_stats:
        return E.to(x.dtype)
    # Two passes over E - E[..., 0, 0] (mean, then mean squared deviation): stable, unlike
    # E[x^2] - E[x]^2, and the shift keeps a mean far from zero from costing precision.
    shift = E[:, :, :1, :1]
    deviation = E - shift
    offset = deviation.mean(dim=(2, 3), keepdim=True)
    var = (deviation - offset).square().mean(dim=(2, 3))
    mean = (shift + offset)[:, :, 0, 0]
    return E.to(x.dtype), mean.to(x.dtype), var.to(x.dtype)
