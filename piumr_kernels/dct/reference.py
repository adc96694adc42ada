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


def dct_basis_1d(kernel_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`(k, k)` orthonormal 1-D DCT-II: row `u` is `c(u) cos(pi (2i + 1) u / 2k)` over `i`."""
    k = kernel_size
    u = torch.arange(k, dtype=torch.float64)[:, None]
    i = torch.arange(k, dtype=torch.float64)[None, :]
    scale = torch.full((k, 1), math.sqrt(2.0 / k), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / k)
    return (scale * torch.cos(math.pi * (2 * i + 1) * u / (2 * k))).to(dtype)


def dct_basis_reference(kernel_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`(k*k, k, k)`: filter `d` is `a[d % k, i] * a[d // k, j]` (u = d mod k along H, v = d div k along W)."""
    a = dct_basis_1d(kernel_size)
    k = kernel_size
    d = torch.arange(k * k)
    return (a[d % k][:, :, None] * a[d // k][:, None, :]).to(dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dct_filter_bank_reference(
    x: torch.Tensor,
    kernel_size: int = 7,
    frequencies: list[int] | None = None,
    return_stats: bool = False,
):
    """SPEC §2 the straightforward way; float32 math below float64, results in `x.dtype`."""
    acc = compute_dtype(x.dtype)
    basis = dct_basis_reference(kernel_size, acc)
    if frequencies is not None:
        basis = basis[list(frequencies)]
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
