"""Adversarial and random cases for every public op, and how one case's outcome is judged.

A case is one call of a public op (`piumr_kernels.<op>` or its `nn.Module`) on inputs built
fresh for each backend: wrong ranks, empty dimensions, every dtype, non-contiguous,
expanded (stride 0), flipped and overlapping views, channels-last, NaN/inf/huge/denormal
values, extreme and wrong-typed parameters, partial `requires_grad`, mixed devices (CPU
with `meta`), plus random valid calls drawn by hypothesis. Torch has no negative strides:
`torch.flip` (a reversed copy) stands in for them.

Outcomes (`judge`):
- "clear_error": a TypeError/ValueError whose message names the case's argument;
- "sensible": a result whose outputs (and input gradients, where an input requires grad)
  are finite and match the reference backend within the op harness' tolerance (float32's
  for float32 and float64 results: this checks consistency, the contract tests check
  precision); for a case marked `finite=False` (non-finite inputs, or inputs beyond a
  documented range) non-finite entries may only sit where the reference has them (a NaN
  may spread less, e.g. past a DCT tap that is exactly zero, never further), and the
  entries finite on both sides must match;
- "other": anything else (another exception, silent non-finite values, a mismatch, a
  reference-valid case refused, or, judged by the driver, a crash or a hang).

Run as a script, this module is the worker the driver (tests/test_fuzz_ops.py) starts in a
subprocess: `python fuzz_ops_cases.py <op> <first case index> [<backend that crashed
there>]` prints `start <index> <backend>` before each attempt and one JSON line per judged
case and backend, so a crash or hang costs only the attempt that was running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from op_harness import TOLERANCE

import piumr_kernels
from piumr_kernels import backends

BACKENDS = ("reference", "cpp", "triton")
OPS = ("sinkhorn", "dct_filter_bank", "girl_loss", "tfam_statistics", "tfam_combine")
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
WRONG_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)
RANDOM_CASES_PER_OP = 12


@dataclasses.dataclass
class Call:
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    leaves: tuple = ()  # tensors whose gradients are compared (views' bases)


@dataclasses.dataclass
class Case:
    op: str
    label: str
    build: Callable[[], Call]
    argument: str  # what a clear error must name
    valid: bool = False  # the reference must return a result
    finite: bool = True  # outputs and gradients must be finite
    call: Callable | None = None  # default: piumr_kernels.<op>


# ----------------------------------------------------------------------------- tensors


def uniform(shape, dtype=torch.float32, low=0.1, high=1.0, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
    return values.to(dtype)


def leaf(tensor: torch.Tensor, grad: bool) -> torch.Tensor:
    return tensor.requires_grad_(grad and tensor.dtype.is_floating_point)


LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "flipped", "overlapping", "channels_last")


def laid_out(values: torch.Tensor, layout: str, grad: bool) -> tuple[torch.Tensor, tuple]:
    """`values` (or, for expanded/overlapping, a tensor of its shape) in `layout`, as a view
    of a leaf that requires grad when `grad`; returns (view, leaves)."""
    shape = values.shape
    if layout == "contiguous":
        base = leaf(values.clone(), grad)
        return base, (base,)
    if layout == "transposed":
        base = leaf(values.transpose(-1, -2).contiguous(), grad)
        return base.transpose(-1, -2), (base,)
    if layout == "sliced":
        base = leaf(torch.repeat_interleave(values, 2, dim=-1).clone(), grad)
        return base[..., ::2], (base,)
    if layout == "expanded":
        base = leaf(values[:1].clone(), grad)
        return base.expand(shape), (base,)
    if layout == "flipped":
        base = leaf(values.clone(), grad)
        return torch.flip(base, dims=(-1,)), (base,)
    if layout == "overlapping":
        # Rows overlap in memory: x[..., i, j] = storage[offset + i + j].
        strides = [1] * len(shape)
        for dim in range(len(shape) - 3, -1, -1):
            strides[dim] = strides[dim + 1] * (shape[dim + 1] + 2)
        size = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
        base = leaf(uniform((size,), values.dtype), grad)
        return base.as_strided(shape, strides), (base,)
    if layout == "channels_last":
        if values.dim() == 5:
            base = leaf(values.contiguous(memory_format=torch.channels_last_3d), grad)
        elif values.dim() == 4:
            base = leaf(values.contiguous(memory_format=torch.channels_last), grad)
        else:  # the leading (batch) dimension innermost in memory
            base = leaf(values.movedim(0, -1).contiguous(), grad)
            return base.movedim(-1, 0), (base,)
        return base, (base,)
    raise ValueError(layout)


SPECIAL_KINDS = ("nan", "inf", "-inf", "max", "1e30", "denormal", "zeros", "negative")


def special(values: torch.Tensor, kind: str) -> torch.Tensor:
    """`values` with one entry set to NaN/inf/-inf/its negative, or all of them scaled to the
    dtype's largest value, 1e30, its denormal range, or zero."""
    info = torch.finfo(values.dtype)
    out = values.clone()
    flat = out.view(-1)
    if kind == "nan":
        flat[flat.numel() // 2] = float("nan")
    elif kind == "inf":
        flat[0] = float("inf")
    elif kind == "-inf":
        flat[-1] = float("-inf")
    elif kind == "max":
        out = values / values.abs().amax() * info.max
    elif kind == "1e30":
        out = values * 1e30
    elif kind == "denormal":
        out = values * info.tiny / 8
    elif kind == "zeros":
        out = torch.zeros_like(values)
    elif kind == "negative":
        flat[1] = -flat[1]
    else:
        raise ValueError(kind)
    return out


# ----------------------------------------------------------------------------- op cases


def tensor_cases(
    op: str,
    argument: str,
    shape: tuple,
    call: Callable[[torch.Tensor], Call],
    ranks: tuple[int, ...],
    finite: tuple[str, ...],
    non_finite: tuple[str, ...] = (),
    other_tensors: bool = False,
) -> list[Case]:
    """Cases on one tensor argument of `op`: `call(t)` puts `t` into an otherwise valid call.
    `finite` and `non_finite` name the special values (`SPECIAL_KINDS`) tried, with results
    that must stay finite or that may not;
    `other_tensors`: the call has other tensors, so `t` on another device is a mismatch."""
    cases = []
    add = cases.append

    def build_with(make):
        return lambda: call(*make())

    for rank in ranks:
        add(Case(op, f"{argument} rank {rank}", build_with(lambda rank=rank: (uniform((2,) * rank),)), argument))
    add(Case(op, f"{argument} python list", build_with(lambda: (uniform(shape).tolist(),)), argument))
    add(Case(op, f"{argument} numpy array", build_with(lambda: (uniform(shape).numpy(),)), argument))
    for dim in range(len(shape)):
        empty = tuple(0 if d == dim else n for d, n in enumerate(shape))
        add(Case(op, f"{argument} empty dim {dim}", build_with(lambda empty=empty: (uniform(empty),)), argument))
    for dtype in FLOATS:
        add(
            Case(
                op,
                f"{argument} {dtype} grad",
                build_with(lambda dtype=dtype: laid_out(uniform(shape, dtype), "contiguous", True)),
                argument,
                valid=True,
            )
        )
    for dtype in WRONG_DTYPES:
        add(
            Case(op, f"{argument} {dtype}", build_with(lambda dtype=dtype: ((uniform(shape) * 3).to(dtype),)), argument)
        )
    for layout in LAYOUTS:
        add(
            Case(
                op,
                f"{argument} {layout} grad",
                build_with(lambda layout=layout: laid_out(uniform(shape), layout, True)),
                argument,
                valid=True,
            )
        )
    unknown = set(finite + non_finite) - set(SPECIAL_KINDS)
    if unknown:
        raise ValueError(f"finite, non_finite: expected kinds from {SPECIAL_KINDS}, got {sorted(unknown)}")
    for kind in (kind for kind in SPECIAL_KINDS if kind in finite + non_finite):
        for dtype in (torch.float32, torch.float16):
            add(
                Case(
                    op,
                    f"{argument} {kind} {dtype}",
                    build_with(lambda kind=kind, dtype=dtype: (special(uniform(shape, dtype), kind),)),
                    argument,
                    valid=True,
                    finite=kind in finite and not (kind == "1e30" and dtype == torch.float16),
                )
            )
    if other_tensors:
        add(
            Case(op, f"{argument} on meta, the rest on cpu", build_with(lambda: (uniform(shape).to("meta"),)), argument)
        )
    return cases


def parameter_cases(op: str, make: Callable[[dict], Call], values: dict[str, list]) -> list[Case]:
    """One case per (parameter, value): `make(kwargs)` is an otherwise valid call. A value
    given as `(value, True)` is valid (the reference must accept it)."""
    cases = []
    for name, options in values.items():
        for option in options:
            value, valid = (
                option if isinstance(option, tuple) and len(option) == 2 and option[1] is True else (option, False)
            )
            label = f"{name}={value!r}" if not isinstance(value, torch.Tensor) else f"{name}=tensor({value.tolist()})"
            cases.append(Case(op, label, lambda name=name, value=value: make({name: value}), name, valid=valid))
    return cases


BAD_REALS = [float("nan"), float("inf"), float("-inf"), "0.1", torch.tensor(0.1), None, [0.1]]
BAD_FLAGS = ["yes", torch.tensor(True), None, 2.5]
GOOD_FLAGS = [(np.bool_(True), True), (False, True)]


def sinkhorn_cases() -> list[Case]:
    op = "sinkhorn"
    shape = (3, 4, 5)

    def with_K(K, leaves=None):
        return Call((K,), {"n_iters": 3}, leaves or ())

    cases = tensor_cases(
        op,
        "K",
        shape,
        lambda K, leaves=(): with_K(K, leaves),
        ranks=(0, 1),
        finite=("1e30", "denormal", "zeros"),
        non_finite=("nan", "inf", "max", "negative"),
    )
    for kind in ("nan", "inf", "negative"):
        cases.append(
            Case(
                op,
                f"K {kind} validate=True",
                lambda kind=kind: Call((special(uniform(shape), kind),), {"validate": True}),
                "K",
            )
        )
    cases.append(
        Case(
            op,
            "K log domain nan validate=True",
            lambda: Call((special(uniform(shape), "nan"),), {"log_domain": True, "validate": True}),
            "K",
        )
    )
    cases.append(Case(op, "K zero row, 5 iterations, grad", lambda: _zero_row_call(5), "K", valid=True, finite=False))
    cases.append(Case(op, "K zero row, 3 iterations, grad", lambda: _zero_row_call(3), "K", valid=True))
    cases.append(Case(op, "K batch 0 grad", lambda: laid_out_call((0, 4, 4)), "K", valid=True))
    cases.append(Case(op, "K (2, 0, 3, 3) grad", lambda: laid_out_call((2, 0, 3, 3)), "K", valid=True))
    cases.append(
        Case(
            op,
            "K channels_last 4-D grad",
            lambda: view_call(laid_out(uniform((2, 3, 4, 4)), "channels_last", True), {"n_iters": 2}),
            "K",
            valid=True,
        )
    )

    def make(kwargs):
        return Call((uniform(shape),), kwargs)

    cases += parameter_cases(
        op,
        make,
        {
            "n_iters": [
                0,
                -1,
                10_001,
                2**31,
                2**58,
                2**59,
                2**63,
                (np.int64(2), True),
                (np.int32(3), True),
                (10_000, True),
                True,
                3.0,
                "3",
                torch.tensor(3),
                None,
            ],
            "eps": [-1e-3, 1e-300, 1e-45, (0.0, True), (np.float32(1e-6), True), (1e-30, True), 1e300] + BAD_REALS,
            "row_sum": [0.0, -1.0, 1e-300, 1e39, 1e300, (np.float64(2.0), True), (1e30, True)] + BAD_REALS,
            "col_sum": [0.0, -2.0, 1e300, (0.5, True)] + BAD_REALS,
            "log_domain": BAD_FLAGS + GOOD_FLAGS,
            "validate": ["yes", torch.tensor(True), (True, True)],
        },
    )
    cases.append(
        Case(
            op,
            "row_sum=1e5 with float16 K",
            lambda: Call((uniform(shape, torch.float16),), {"row_sum": 1e5}),
            "row_sum",
        )
    )
    cases.append(
        Case(op, "n_iters=2**59 on 16x16x16", lambda: Call((uniform((16, 16, 16)),), {"n_iters": 2**59}), "n_iters")
    )
    cases.append(
        Case(op, "n_iters=2**58 on 4x40x40", lambda: Call((uniform((4, 40, 40)),), {"n_iters": 2**58}), "n_iters")
    )
    module_cases = {
        "SinkhornKernel(n_iters=2**59)": (lambda: piumr_kernels.SinkhornKernel(n_iters=2**59), "n_iters"),
        "SinkhornKernel(eps=inf)": (lambda: piumr_kernels.SinkhornKernel(eps=float("inf")), "eps"),
        "SinkhornKernel(row_sum=inf)": (lambda: piumr_kernels.SinkhornKernel(row_sum=float("inf")), "row_sum"),
        "SinkhornKernel(col_sum=inf)": (lambda: piumr_kernels.SinkhornKernel(col_sum=float("inf")), "col_sum"),
        "SinkhornKernel(log_domain='no')": (lambda: piumr_kernels.SinkhornKernel(log_domain="no"), "log_domain"),
    }
    for label, (module, argument) in module_cases.items():
        cases.append(
            Case(op, label, lambda: Call((uniform(shape),)), argument, call=lambda K, module=module: module()(K))
        )
    return cases


def view_call(view_and_leaves: tuple[torch.Tensor, tuple], kwargs: dict | None = None) -> Call:
    """A call on the one tensor `laid_out` returned, comparing its leaves' gradients."""
    view, leaves = view_and_leaves
    return Call((view,), kwargs or {}, leaves)


def laid_out_call(shape) -> Call:
    view, leaves = laid_out(uniform(shape), "contiguous", True)
    return Call((view,), {"n_iters": 3}, leaves)


def _zero_row_call(n_iters: int) -> Call:
    K = uniform((2, 4, 5))
    K[0, 1] = 0
    K[1, :, 2] = 0
    K.requires_grad_(True)
    return Call((K,), {"n_iters": n_iters}, (K,))


def dct_cases() -> list[Case]:
    op = "dct_filter_bank"
    shape = (2, 2, 2, 5, 4)

    def with_x(x, leaves=()):
        return Call((x,), {"kernel_size": 3, "return_stats": True}, leaves)

    cases = tensor_cases(
        op,
        "x",
        shape,
        with_x,
        ranks=(0, 4, 6),
        finite=("denormal", "zeros"),
        non_finite=("nan", "inf", "max", "1e30"),
    )
    for label, build, finite in (
        ("x float16 near 60000 (E beyond float16)", lambda: with_x(uniform(shape, torch.float16, 50000, 60000)), False),
        ("x float32 1e15 (var 1e30 still finite)", lambda: with_x(uniform(shape, torch.float32, 0.5e15, 1e15)), True),
        ("x batch 0 grad", lambda: with_x(*laid_out(uniform((0, 2, 2, 3, 3)), "contiguous", True)), True),
    ):
        cases.append(Case(op, label, build, "x", valid=True, finite=finite))

    def make(kwargs):
        return Call((uniform(shape),), {"kernel_size": 3, **kwargs})

    cases += parameter_cases(
        op,
        make,
        {
            "kernel_size": [
                0,
                -3,
                2,
                64,
                2**40,
                2**40 + 1,
                True,
                3.0,
                "3",
                torch.tensor(3),
                None,
                (np.int64(5), True),
                (1, True),
                (9, True),
            ],
            "frequencies": [
                [],
                [9],
                [-1],
                [0.5],
                [True],
                "012",
                3,
                torch.tensor([0.0]),
                torch.tensor([[0, 1]]),
                ([8, 0, 4], True),
                (torch.tensor([1, 2]), True),
                ((np.int64(2), 3), True),
                ([0, 0], True),
            ],
            "return_stats": BAD_FLAGS + GOOD_FLAGS,
        },
    )
    cases.append(
        Case(
            op,
            "dct_basis(kernel_size=4)",
            lambda: Call((), {"kernel_size": 4}),
            "kernel_size",
            call=piumr_kernels.dct_basis,
        )
    )
    cases.append(
        Case(
            op,
            "dct_basis(dtype=torch.int64)",
            lambda: Call((), {"dtype": torch.int64}),
            "dtype",
            call=piumr_kernels.dct_basis,
        )
    )
    cases.append(
        Case(
            op,
            "DCTFilterBank(kernel_size='7')",
            lambda: Call((uniform(shape),)),
            "kernel_size",
            call=lambda x: piumr_kernels.DCTFilterBank(kernel_size="7")(x),
        )
    )
    return cases


def girl_cases() -> list[Case]:
    op = "girl_loss"
    batch, width = 8, 5

    def labels():
        return torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])

    def with_features(z, leaves=()):
        return Call((z, labels()), {"num_groups": 2}, leaves)

    cases = tensor_cases(
        op,
        "features",
        (batch, width),
        with_features,
        ranks=(0, 1, 3),
        finite=("max", "1e30", "denormal", "zeros", "negative"),
        non_finite=("nan", "inf"),
        other_tensors=True,
    )
    for label, value in {
        "float": labels().float(),
        "bool": labels().bool(),
        "2-D": labels()[None],
        "short": labels()[:5],
        "list": [0, 1] * 4,
        "meta": labels().to("meta"),
    }.items():
        cases.append(Case(op, f"labels {label}", lambda value=value: Call((uniform((batch, width)), value)), "labels"))
    cases.append(Case(op, "labels int32 grad", _girl_int32_labels, "labels", valid=True))
    cases.append(
        Case(op, "features batch 1", lambda: Call((uniform((1, width)), torch.tensor([0]))), "features", valid=True)
    )

    def make(kwargs):
        return Call((uniform((batch, width)), labels()), {"num_groups": 2, **kwargs})

    cases += parameter_cases(
        op,
        make,
        {
            "num_groups": [0, -1, True, 2.0, "2", torch.tensor(2), None, (np.int64(3), True), (2**40, True), (9, True)],
            "tau": [0.0, -0.1, 1e-30, 1e-4, (1e-3, True), (1e30, True), (np.float32(0.1), True)] + BAD_REALS,
            "eta": [0.0, -0.2, 1e-30, 1e-6, (1e-3, True), (1e30, True)] + BAD_REALS,
            "lambda_var": [-1.0, 1e7, 1e300, (0.0, True), (1e6, True)] + BAD_REALS,
            "var_grad": BAD_FLAGS + GOOD_FLAGS,
            "detach_weights": BAD_FLAGS + GOOD_FLAGS,
            "return_details": ["yes", (True, True)],
            "groups": [
                torch.tensor([0, 1] * 4).float(),
                torch.tensor([0, 1, 2, 3]),
                [0, 1] * 4,
                (torch.tensor([0, 1] * 4), True),
                (torch.tensor([1, 0, 1, 0, 1, 0, 1, 1], dtype=torch.int32), True),
            ],
        },
    )
    cases.append(
        Case(
            op,
            "groups with num_groups=2**40",
            lambda: Call(
                (uniform((batch, width)), labels()), {"num_groups": 2**40, "groups": torch.tensor([0, 1] * 4)}
            ),
            "num_groups",
        )
    )
    cases.append(
        Case(
            op,
            "groups out of range validate=True",
            lambda: Call(
                (uniform((batch, width)), labels()),
                {"num_groups": 2, "groups": torch.tensor([0, 5] * 4), "validate": True},
            ),
            "groups",
        )
    )
    cases.append(
        Case(
            op,
            "groups on meta",
            lambda: Call((uniform((batch, width)), labels()), {"groups": torch.tensor([0, 1] * 4).to("meta")}),
            "groups",
        )
    )
    cases.append(
        Case(
            op,
            "GIRLLoss(tau=1e-30)",
            lambda: Call((uniform((batch, width)), labels())),
            "tau",
            call=lambda z, y: piumr_kernels.GIRLLoss(tau=1e-30)(z, y),
        )
    )
    cases.append(
        Case(
            op,
            "GIRLLoss(lambda_var=inf)",
            lambda: Call((uniform((batch, width)), labels())),
            "lambda_var",
            call=lambda z, y: piumr_kernels.GIRLLoss(lambda_var=float("inf"))(z, y),
        )
    )
    return cases


def _girl_int32_labels() -> Call:
    z = leaf(uniform((8, 5)), True)
    return Call((z, torch.tensor([0, 1, 0, 1, 2, 2, 0, 1], dtype=torch.int32)), {"num_groups": 2}, (z,))


def tfam_x_cases(
    op: str, shape: tuple, call: Callable[[torch.Tensor], Call], other_tensors: bool = False
) -> list[Case]:
    """`tensor_cases` on the activation `x` (rank 5) of a TFAM op: its results stay finite
    for every special value but NaN, inf and the dtype's largest values."""
    return tensor_cases(
        op,
        "x",
        shape,
        call,
        ranks=(0, 4, 6),
        finite=("1e30", "denormal", "zeros", "negative"),
        non_finite=("nan", "inf", "max"),
        other_tensors=other_tensors,
    )


def tfam_statistics_cases() -> list[Case]:
    op = "tfam_statistics"
    shape = (2, 3, 2, 3, 4)
    cases = tfam_x_cases(op, shape, lambda x, leaves=(): Call((x,), {}, leaves))
    cases.append(
        Case(op, "x float16 near 60000", lambda: Call((uniform(shape, torch.float16, 50000, 60000),)), "x", valid=True)
    )
    cases.append(
        Case(
            op,
            "x batch 0 grad",
            lambda: view_call(laid_out(uniform((0, 2, 2, 3, 3)), "contiguous", True)),
            "x",
            valid=True,
        )
    )
    cases.append(
        Case(
            op,
            "TFAMStatistics module",
            lambda: Call((uniform(shape),)),
            "x",
            valid=True,
            call=lambda x: piumr_kernels.TFAMStatistics()(x),
        )
    )
    return cases


def tfam_combine_cases() -> list[Case]:
    op = "tfam_combine"
    batch, channels, frames, height, width = 2, 3, 2, 3, 4
    shape = (batch, channels, frames, height, width)

    def scales(dtype=torch.float32):
        return uniform((batch, frames), dtype, seed=1), uniform((batch, height, width), dtype, seed=2)

    def with_x(x, leaves=()):
        return Call((x, *scales()), {}, leaves)

    cases = tfam_x_cases(op, shape, with_x, other_tensors=True)

    def with_temporal(t, leaves=()):
        return Call((uniform(shape), t, scales()[1]), {}, leaves)

    def with_spatial(s, leaves=()):
        return Call((uniform(shape), scales()[0], s), {}, leaves)

    cases += tensor_cases(
        op,
        "temporal_scale",
        (batch, frames),
        with_temporal,
        ranks=(0, 1, 3),
        finite=("1e30", "zeros"),
        non_finite=("nan",),
        other_tensors=True,
    )
    cases += tensor_cases(
        op,
        "spatial_scale",
        (batch, height, width),
        with_spatial,
        ranks=(0, 2, 4),
        finite=("denormal",),
        non_finite=("inf",),
        other_tensors=True,
    )
    cases.append(
        Case(
            op,
            "x float16 near 60000 (output beyond float16)",
            lambda: Call((uniform(shape, torch.float16, 50000, 60000), *scales())),
            "x",
            valid=True,
            finite=False,
        )
    )
    for grads in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        cases.append(
            Case(
                op,
                f"partial requires_grad {grads}",
                lambda grads=grads: _partial_grad_combine(shape, grads),
                "x",
                valid=True,
            )
        )
    cases.append(
        Case(
            op,
            "float64 x with float32 scales",
            lambda: Call((uniform(shape, torch.float64), *scales(torch.float32))),
            "x",
            valid=True,
        )
    )
    cases.append(
        Case(
            op,
            "TFAMCombine module",
            lambda: Call((uniform(shape), *scales())),
            "x",
            valid=True,
            call=lambda x, t, s: piumr_kernels.TFAMCombine()(x, t, s),
        )
    )
    return cases


def _partial_grad_combine(shape, grads) -> Call:
    batch, _, frames, height, width = shape
    x = leaf(uniform(shape), grads[0])
    t = leaf(uniform((batch, frames), seed=1), grads[1])
    s = leaf(uniform((batch, height, width), seed=2), grads[2])
    return Call((x, t, s), {}, tuple(v for v, g in zip((x, t, s), grads) if g))


# ----------------------------------------------------------------------------- random cases


def random_cases(op: str, count: int = RANDOM_CASES_PER_OP) -> list[Case]:
    """`count` valid calls of `op` drawn by hypothesis (derandomized: the same list every run)."""
    drawn: list[Case] = []
    strategy = RANDOM_STRATEGIES[op]

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(case):
        drawn.append(case)

    collect()
    return drawn[:count]


DTYPES = st.sampled_from(FLOATS)
LAYOUT = st.sampled_from(("contiguous", "transposed", "sliced", "expanded", "channels_last"))
SCALE = st.sampled_from((1e-3, 1.0, 100.0))


@st.composite
def random_sinkhorn(draw) -> Case:
    batch = draw(st.integers(1, 3))
    n_rows, n_cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dtype, layout, scale = draw(DTYPES), draw(LAYOUT), draw(SCALE)
    log_domain = draw(st.booleans())
    kwargs = {
        "n_iters": draw(st.integers(1, 6)),
        "eps": draw(st.sampled_from((0.0, 1e-8, 1e-3))),
        "log_domain": log_domain,
        "row_sum": draw(st.floats(0.1, 10.0)),
    }
    low = -2.0 if log_domain else 0.1
    label = f"random {(batch, n_rows, n_cols)} {dtype} {layout} x{scale} {kwargs}"
    return Case(
        "sinkhorn",
        label,
        lambda: view_call(laid_out(uniform((batch, n_rows, n_cols), dtype, low * scale, scale), layout, True), kwargs),
        "K",
        valid=True,
    )


@st.composite
def random_dct(draw) -> Case:
    shape = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 6)),
    )
    dtype, layout, scale = draw(DTYPES), draw(LAYOUT), draw(SCALE)
    kernel_size = draw(st.sampled_from((1, 3, 5)))
    frequencies = draw(st.none() | st.lists(st.integers(0, kernel_size**2 - 1), min_size=1, max_size=4))
    kwargs = {"kernel_size": kernel_size, "frequencies": frequencies, "return_stats": draw(st.booleans())}
    label = f"random {shape} {dtype} {layout} x{scale} {kwargs}"
    return Case(
        "dct_filter_bank",
        label,
        lambda: view_call(laid_out(uniform(shape, dtype, -scale, scale), layout, True), kwargs),
        "x",
        valid=True,
    )


@st.composite
def random_girl(draw) -> Case:
    # Width 1 is not drawn: every cosine is then +-1 and the gradient through the
    # normalization is exactly zero by cancellation, so any float32 backend (the reference's
    # own float32 run included) returns rounding noise amplified by 1/|z| (~1e-2 at |z| = 1e-3),
    # which no tolerance relative to the result can judge.
    batch, width = draw(st.integers(1, 10)), draw(st.integers(2, 6))
    dtype, scale = draw(DTYPES), draw(SCALE)
    num_groups = draw(st.integers(1, 4))
    explicit = draw(st.booleans()) and num_groups <= batch
    kwargs = {
        "num_groups": num_groups,
        "tau": draw(st.floats(0.02, 1.0)),
        "eta": draw(st.floats(0.05, 2.0)),
        "lambda_var": draw(st.floats(0.0, 10.0)),
        "var_grad": draw(st.booleans()),
        "detach_weights": draw(st.booleans()),
    }
    seed = draw(st.integers(0, 1000))
    label = f"random ({batch}, {width}) {dtype} x{scale} groups={'ids' if explicit else 'random'} {kwargs}"

    def build():
        generator = torch.Generator().manual_seed(seed)
        z = leaf(uniform((batch, width), dtype, -scale, scale, seed), True)
        labels = torch.randint(0, 3, (batch,), generator=generator)
        extra = {"groups": torch.randint(0, num_groups, (batch,), generator=generator)} if explicit else {}
        return Call((z, labels), {**kwargs, **extra, "generator": torch.Generator().manual_seed(seed)}, (z,))

    return Case("girl_loss", label, build, "features", valid=True)


@st.composite
def random_tfam_statistics(draw) -> Case:
    shape = tuple(draw(st.integers(1, 3)) for _ in range(5))
    dtype, layout, scale = draw(DTYPES), draw(LAYOUT), draw(SCALE)
    label = f"random {shape} {dtype} {layout} x{scale}"
    return Case(
        "tfam_statistics",
        label,
        lambda: view_call(laid_out(uniform(shape, dtype, -scale, scale), layout, True)),
        "x",
        valid=True,
    )


@st.composite
def random_tfam_combine(draw) -> Case:
    batch, channels, frames, height, width = (draw(st.integers(1, 3)) for _ in range(5))
    dtype, layout, scale = draw(DTYPES), draw(LAYOUT), draw(SCALE)
    grads = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    label = f"random {(batch, channels, frames, height, width)} {dtype} {layout} x{scale} grads={grads}"

    def build():
        x, leaves = laid_out(uniform((batch, channels, frames, height, width), dtype, -scale, scale), layout, grads[0])
        t = leaf(uniform((batch, frames), dtype, seed=1), grads[1])
        s = leaf(uniform((batch, height, width), dtype, seed=2), grads[2])
        return Call((x, t, s), {}, tuple(v for v, g in zip((leaves[0], t, s), grads) if g))

    return Case("tfam_combine", label, build, "x", valid=True)


RANDOM_STRATEGIES = {
    "sinkhorn": random_sinkhorn(),
    "dct_filter_bank": random_dct(),
    "girl_loss": random_girl(),
    "tfam_statistics": random_tfam_statistics(),
    "tfam_combine": random_tfam_combine(),
}
ADVERSARIAL = {
    "sinkhorn": sinkhorn_cases,
    "dct_filter_bank": dct_cases,
    "girl_loss": girl_cases,
    "tfam_statistics": tfam_statistics_cases,
    "tfam_combine": tfam_combine_cases,
}


def cases_of(op: str) -> list[Case]:
    return ADVERSARIAL[op]() + random_cases(op)


# ----------------------------------------------------------------------------- judging


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in _tensors(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def evaluate(case: Case, backend: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Runs the case on `backend`: (outputs, gradients of its leaves), both detached."""
    call = case.build()
    function = case.call or getattr(piumr_kernels, case.op)
    torch.manual_seed(0)  # the random GIRL partition: the same on every backend
    with backends.use_backend(backend):
        result = function(*call.args, **call.kwargs)
        outputs = _tensors(result)
        differentiable = [t for t in outputs if t.requires_grad]
        grads = []
        if call.leaves and differentiable:
            upstream = [uniform(t.shape, t.dtype, -1.0, 1.0, seed=7 + i) for i, t in enumerate(differentiable)]
            torch.autograd.backward(differentiable, upstream)
            grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in call.leaves]
    return [t.detach() for t in outputs], [g.detach() for g in grads]


def _mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float, finite: bool) -> str | None:
    if tuple(actual.shape) != tuple(expected.shape) or actual.dtype != expected.dtype:
        return f"{name}: {tuple(actual.shape)} {actual.dtype} vs reference {tuple(expected.shape)} {expected.dtype}"
    if not actual.dtype.is_floating_point:
        return None if torch.equal(actual, expected) else f"{name}: integer values differ from the reference"
    actual, expected = actual.double(), expected.double()
    ok_actual, ok_expected = torch.isfinite(actual), torch.isfinite(expected)
    if finite and not ok_actual.all():
        return f"{name}: {int((~ok_actual).sum())} non-finite of {actual.numel()}"
    if (~ok_actual & ok_expected).any():
        return f"{name}: non-finite where the reference is finite"
    both = ok_actual & ok_expected
    if not both.any():
        return None
    scale = max(expected[both].abs().max().item(), 1e-3)
    error = (actual[both] - expected[both]).abs().max().item()
    # Both sides are rounded to the dtype, so twice the harness' bound against fp64.
    if error > 2 * tol * scale:
        return f"{name}: max error {error:.3g} > 2 * {tol:.1g} * {scale:.3g} against the reference"
    return None


def attempt(case: Case, backend: str) -> dict:
    """{"outputs", "grads"} of the case on `backend`, or {"error": the exception}."""
    try:
        outputs, grads = evaluate(case, backend)
    except Exception as error:
        return {"error": error}
    return {"outputs": outputs, "grads": grads}


def judge(case: Case, backend: str, result: dict, reference: dict | None) -> dict:
    """The outcome of `result` (an `attempt` of `case` on `backend`; see the module
    docstring). `reference`: the reference backend's attempt, None when judging it."""
    error = result.get("error")
    if error is not None:
        detail = f"{type(error).__name__}: {error}"
        clear = isinstance(error, (TypeError, ValueError)) and case.argument in str(error)
        if clear and not (case.valid and reference is None):
            return {"outcome": "clear_error", "detail": detail}
        return {"outcome": "other", "detail": detail}
    outputs, grads = result["outputs"], result["grads"]
    problems = []
    if reference is None:
        for name, values in [(f"output {i}", t) for i, t in enumerate(outputs)] + [
            (f"grad {i}", g) for i, g in enumerate(grads)
        ]:
            if case.finite and values.dtype.is_floating_point and not torch.isfinite(values).all():
                problems.append(f"{name}: non-finite values")
    elif "error" in reference:
        problems.append(f"returned a result where the reference refused: {reference['error']}")
    else:
        if len(outputs) != len(reference["outputs"]) or len(grads) != len(reference["grads"]):
            problems.append("a different number of outputs or gradients than the reference")
        pairs = list(zip(outputs, reference["outputs"])) + list(zip(grads, reference["grads"]))
        for i, (actual, expected) in enumerate(pairs):
            # float64 results of mixed-precision calls (float32 math) get the float32 bound.
            dtype = expected.dtype if expected.dtype in FLOATS[2:] else torch.float32
            problem = _mismatch(f"tensor {i}", actual, expected, TOLERANCE[case.op][dtype], case.finite)
            if problem:
                problems.append(problem)
    if problems:
        return {"outcome": "other", "detail": "; ".join(problems)}
    return {"outcome": "sensible", "detail": ""}


def run_worker(op: str, start: int, resume_after: str | None = None) -> None:
    """Judges the cases of `op` from index `start`, printing one JSON line per case and
    backend; `resume_after`: the backend whose attempt at case `start` crashed or hung
    (the restarted worker goes on with the next backend)."""
    runnable = [name for name in BACKENDS if not backends._availability(name, torch.device("cpu"))]
    for index, case in enumerate(cases_of(op)):
        if index < start:
            continue
        skipped = runnable[: runnable.index(resume_after) + 1] if index == start and resume_after else []
        reference = {"error": RuntimeError("the reference attempt crashed or hung")}
        if "reference" not in skipped:
            print(f"start {index} reference", flush=True)
            reference = attempt(case, "reference")
        for backend in runnable:
            if backend in skipped:
                continue
            if backend != "reference":
                print(f"start {index} {backend}", flush=True)
            result = reference if backend == "reference" else attempt(case, backend)
            verdict = judge(case, backend, result, None if backend == "reference" else reference)
            print(json.dumps({"index": index, "label": case.label, "backend": backend, **verdict}), flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    run_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
