"""Public DCT filter-bank op (SPEC §2): argument checks, backend dispatch, torch.library registration.

The fused backends (cpp, triton) are two torch.library ops each. The forward reads `x`
once into the scaled channel sum `s[b] = (1/T) sum_{c,t} x[b, c, t]` and returns
`(E, mean, var, s)`, with `mean`, `var` and `s` in the accumulation dtype (float32, or
float64 for float64 input). Autograd saves only `s` `(B, H, W)` and `mean` `(B, D)`; the
backward recomputes `E` from `s` (cpp: k^2 + k^3 multiply-adds per pixel for the whole
bank; triton: k^2 + k per pixel and filter, so no intermediate map is stored), forms
`G_d = dE_d + dmean_d / HW + dvar_d * 2 (E_d - mean_d) / HW`, applies the adjoint
`g = sum_d D_d (convolved with) G_d` and returns `g / T` as a `(B, H, W)` map; the
gradient of `x` is that map expanded over `(C, T)` (a view, no large write).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .. import backends
from .._checks import check_flag, check_float_tensor, check_int
from ..fused_op import FusedOp, accumulation_dtype
from .reference import dct_basis_reference, dct_filter_bank_reference


def _fake_forward(x, kernel_size, frequencies):
    batch, _, _, height, width = x.shape
    acc = accumulation_dtype(x.dtype)
    n_filters = len(frequencies)
    return (
        x.new_empty((batch, n_filters, height, width)),
        x.new_empty((batch, n_filters), dtype=acc),
        x.new_empty((batch, n_filters), dtype=acc),
        x.new_empty((batch, height, width), dtype=acc),
    )


def _fake_backward(grad_E, grad_mean, grad_var, s, mean, kernel_size, frequencies, frames):
    return grad_E.new_empty(s.shape)


def _setup_context(ctx, inputs, output):
    x, kernel_size, frequencies = inputs
    E, mean, _, s = output
    ctx.save_for_backward(s, mean)
    ctx.params = (kernel_size, frequencies)
    ctx.x_shape = x.shape
    ctx.E_meta = (E.shape, E.dtype)
    ctx.mark_non_differentiable(s)


def _backward(ctx, backward_op, grad_E, grad_mean, grad_var, _grad_s):
    if grad_E is None and grad_mean is None and grad_var is None:
        return None, None, None
    s, mean = ctx.saved_tensors
    kernel_size, frequencies = ctx.params
    # An output nobody used contributes nothing; the kernels take a zero gradient for it.
    E_shape, E_dtype = ctx.E_meta
    grad_E = grad_E if grad_E is not None else s.new_zeros(E_shape, dtype=E_dtype)
    grad_mean = grad_mean if grad_mean is not None else torch.zeros_like(mean)
    grad_var = grad_var if grad_var is not None else torch.zeros_like(mean)
    grad_map = backward_op(
        grad_E.contiguous(),
        grad_mean.contiguous(),
        grad_var.contiguous(),
        s,
        mean,
        kernel_size,
        frequencies,
        ctx.x_shape[2],
    )
    # dx[b, c, t] = g[b] / T for every (c, t): an expanded view, never materialized here.
    batch, _, _, height, width = ctx.x_shape
    return grad_map.view(batch, 1, 1, height, width).expand(ctx.x_shape), None, None


def _triton_launchers():
    from . import triton_kernels

    return triton_kernels.dct_forward, triton_kernels.dct_backward


DCT_FILTER_BANK = FusedOp(
    "dct_filter_bank", _fake_forward, _fake_backward, _setup_context, _backward, _triton_launchers
)
DCT_FILTER_BANK.register()


# k * k filters of k * k taps: 63 (3969 filters) is far past any useful bank, and a huge
# kernel_size would build the index list of all its filters before anything else.
MAX_KERNEL_SIZE = 63


def _check_kernel_size(kernel_size: object) -> int:
    kernel_size = check_int("kernel_size", kernel_size, 1, MAX_KERNEL_SIZE)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (3, 5, 7, ...) so the filter has a centre, got {kernel_size}")
    return kernel_size


def _check_frequencies(frequencies: object, kernel_size: int) -> list[int]:
    n_filters = kernel_size * kernel_size
    if frequencies is None:
        return list(range(n_filters))
    if isinstance(frequencies, torch.Tensor):
        if frequencies.dim() != 1 or frequencies.dtype.is_floating_point or frequencies.dtype.is_complex:
            raise TypeError(
                f"frequencies must be a sequence of ints or a 1-D integer tensor, got a tensor of "
                f"shape {tuple(frequencies.shape)} and dtype {frequencies.dtype}"
            )
        frequencies = frequencies.tolist()
    if isinstance(frequencies, (str, bytes)) or not isinstance(frequencies, Sequence):
        raise TypeError(f"frequencies must be None or a sequence of ints, got {type(frequencies).__name__}")
    if len(frequencies) == 0:
        raise ValueError("frequencies must select at least one filter, got an empty sequence")
    for index in frequencies:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"frequencies must hold ints, got {index!r} ({type(index).__name__})")
        if not 0 <= index < n_filters:
            raise ValueError(
                f"frequencies must be filter indices in [0, {n_filters}) for kernel_size={kernel_size}, got {index}"
            )
    return [int(index) for index in frequencies]


def dct_basis(kernel_size: int = 7, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal 2-D DCT-II filter bank, `(k*k, k, k)` (SPEC §2).

    Filter `d` is `D_d[i, j] = c(u) c(v) cos(pi (2i+1) u / 2k) cos(pi (2j+1) v / 2k)` with
    `u = d mod k` (frequency along H, rows `i`) and `v = d div k` (along W, columns `j`),
    `c(0) = sqrt(1/k)`, `c(>0) = sqrt(2/k)`: the HDF/FSTA-SNN order, so weights trained
    there line up. Filter 0 is the constant `1/k`. `kernel_size` must be odd
    (at most 63). Computed in float64 and then cast to `dtype`.
    """
    kernel_size = _check_kernel_size(kernel_size)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dct_basis_reference(kernel_size, dtype)


def dct_filter_bank(
    x: torch.Tensor,
    kernel_size: int = 7,
    frequencies: Sequence[int] | torch.Tensor | None = None,
    return_stats: bool = False,
):
    """DCT filter-bank energies of a video (SPEC §2, PIUmr Eq. (1) as HDF implements it).

    `x`: `(B, C, T, H, W)`, any strides, any `C, T, H, W >= 1` (maps smaller than the
    filter are fine). Returns `E` `(B, D, H, W)` in `x.dtype` with
    `E[b, d] = D_d (cross-correlated with) s[b]`, zero padding `k // 2`, stride 1, where
    `s[b] = (1/T) sum_t sum_c x[b, c, t]`: the same numbers as `Conv2d(x.mean(2), weight)`
    with each filter of :func:`dct_basis` repeated over the `C` input channels.
    `frequencies`: `None` for all `D = k*k` filters, else the filter indices `d` to keep,
    in the order given. `return_stats=True` also returns `mean` and `var`, each `(B, D)`
    in `x.dtype`: the mean and population variance (divide by `H * W`) over the positions,
    computed stably: moments of `E - E[b, d, 0, 0]` in two passes (reference), the map's
    sum then the deviations from that mean, whose sum corrects its rounding (cpp: corrected
    two-pass), or per-tile moments merged with Chan's formula (triton); never
    `E[x^2] - E[x]^2`.

    Gradients flow through `E` and the stats; the gradient of `x` is `(1/T) g[b]` with
    `g = sum_d D_d (convolved with) dE_d`, the same for every `(c, t)`, and the fused
    backends return it as an expanded view. float16/bfloat16/float32 use float32
    accumulation; float64 runs on the reference and cpp backends.

    Range: `E`, `mean` and `var` come back in `x.dtype`. They are finite while
    `C * max |x|` times the filter gain (at most `kernel_size`) fits that dtype (float16:
    65504, so float16 inputs near 60000 overflow `E` with any C) and, for `var`, while the
    spread of `E` stays below the square root of the dtype's largest value (float32 about
    1.8e19, float16 about 255); beyond that they are inf, as `Conv2d` would give.
    """
    check_float_tensor("x", x, dim=5)
    kernel_size = _check_kernel_size(kernel_size)
    frequencies = _check_frequencies(frequencies, kernel_size)
    return_stats = check_flag("return_stats", return_stats)
    batch, channels, frames, height, width = x.shape
    for name, size in (("C", channels), ("T", frames), ("H", height), ("W", width)):
        if size < 1:
            raise ValueError(f"x must have {name} >= 1 in (B, C, T, H, W), got shape {tuple(x.shape)}")

    backend = backends.resolve_backend(x, cpp_op="dct_filter_bank_cpp")
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError("x: the triton backend supports float16, bfloat16 and float32, got float64")
    if backend == "reference":
        return dct_filter_bank_reference(x, kernel_size, frequencies, return_stats)
    E, mean, var, _ = DCT_FILTER_BANK(backend, x, kernel_size, frequencies)
    if not return_stats:
        return E
    return E, mean.to(x.dtype), var.to(x.dtype)


class DCTFilterBank(nn.Module):
    """`nn.Module` form of :func:`dct_filter_bank` (fixed DCT-II filters, no parameters).

    `forward(x, return_stats=False)` returns `E` `(B, D, H, W)`, or `(E, mean, var)`.
    """

    def __init__(self, kernel_size: int = 7, frequencies: Sequence[int] | torch.Tensor | None = None) -> None:
        super().__init__()
        self.kernel_size = _check_kernel_size(kernel_size)
        self.frequencies = None if frequencies is None else _check_frequencies(frequencies, self.kernel_size)

    @property
    def num_filters(self) -> int:
        return self.kernel_size**2 if self.frequencies is None else len(self.frequencies)

    def forward(self, x: torch.Tensor, return_stats: bool = False):
        return dct_filter_bank(x, self.kernel_size, self.frequencies, return_stats)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, frequencies={self.frequencies}"
