"""One harness for every fused op's tests: sample inputs, tolerances, upstream gradients and
the float64 reference, shared by tests/test_op_contract.py, tests/test_no_host_sync.py and
tests/test_devices.py.

Each op has a few `Case`s. A case makes its inputs (float64 values drawn from a seeded
generator, then rounded to the tested dtype), calls the op's public function on them
(`run`) and the op's float64 reference on the same rounded values (`reference`); both
return a tuple of outputs with the same structure. Floating outputs that carry a gradient
get a non-uniform upstream gradient (`upstream_gradients`); integer outputs and detached
details are compared forward only.

Tolerances (`TOLERANCE`), the one table every contract check uses. The error of each output
and of each input gradient is `max |actual - fp64 reference|`, measured against
`tol * max(max |fp64 reference|, 1e-3)` (the floor keeps analytically-zero results, e.g. a
single-row Sinkhorn, from demanding relative accuracy on rounding noise). Inputs and
upstream gradients are rounded to the tested dtype before the reference sees them, so only
the op's own arithmetic and output rounding count. Forward and backward share a bound:

    ===============  =======  =======  =======  ========
    op               float64  float32  float16  bfloat16
    ===============  =======  =======  =======  ========
    sinkhorn         1e-9     1e-4     1e-2     4e-2
    dct_filter_bank  1e-9     2e-5     4e-3     3e-2
    girl_loss        1e-9     1e-4     2e-3     1e-2
    tfam_statistics  1e-9     2e-5     2e-3     1.6e-2
    tfam_combine     1e-9     1e-4     2e-3     1.6e-2
    ===============  =======  =======  =======  ========

Why: float64 is fp64 math end to end (reference, cpp). Below float64 every op computes in
float32; Sinkhorn (3 iterations of row and column scaling) and GIRL (log-sum-exp over the
group, 1/tau = 14 amplifies cosine rounding) lose more than the single-pass DCT and TFAM
statistics; tfam_combine's scale gradients sum C*H*W or C*T products. float16/bfloat16
outputs and gradients are rounded to the input dtype (2^-11 / 2^-8 relative), and that
rounding of an intermediate goes through Sinkhorn's iterations again. The numbers come from
the per-op files' own tables; where a file had separate bounds for float32 statistics and
for values stored in the input dtype (TFAM: 2e-5 and 2e-3/1.6e-2), the looser one applies to
every output here, and tfam_combine's scale gradients (sums over C*H*W or C*T products; 2e-4
there) share 1e-4 with its output. float64 is 1e-9 everywhere (the files had 1e-9 or 1e-10).

`gradcheck` (float64) uses `GRADCHECK` (eps 1e-6, atol 1e-7, rtol 1e-3), in fast mode (random
projections of the Jacobian) past `GRADCHECK_FULL_MAX` = 48 differentiated input entries.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable

import pytest
import torch

import piumr_kernels
from piumr_kernels import backends
from piumr_kernels.dct.reference import dct_filter_bank_reference
from piumr_kernels.girl.reference import girl_loss_reference
from piumr_kernels.sinkhorn_knopp.reference import sinkhorn_reference
from piumr_kernels.tfam_pooling.reference import tfam_combine_reference, tfam_statistics_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

BACKENDS = ("reference", "cpp", "triton")
FUSED_BACKENDS = ("cpp", "triton")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

TOLERANCE = {  # op -> dtype -> bound (forward and backward); see the table in the module docstring
    "sinkhorn": {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2},
    "dct_filter_bank": {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2},
    "girl_loss": {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2},
    "tfam_statistics": {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
    "tfam_combine": {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
}
SCALE_FLOOR = 1e-3
GRADCHECK = dict(eps=1e-6, atol=1e-7, rtol=1e-3)
GRADCHECK_FULL_MAX = 48

# Public op -> the name its library ops carry: torch.ops.piumr_kernels.<name>_<backend>[_backward].
LIBRARY_NAME = {
    "sinkhorn": "sinkhorn",
    "dct_filter_bank": "dct_filter_bank",
    "girl_loss": "girl",
    "tfam_statistics": "tfam_statistics",
    "tfam_combine": "tfam_combine",
}
OPS = tuple(LIBRARY_NAME)


# ----------------------------------------------------------------------------- backends


def backend_skip_reason(backend: str, dtype: torch.dtype | None = None, device: torch.device = DEVICE) -> str:
    """Why `backend` cannot run `dtype` on `device` here ("" when it can)."""
    reason = backends._availability(backend, device)
    if reason:
        return reason
    if backend == "triton" and dtype == torch.float64:
        return "the triton backend is float32-only (float16/bfloat16/float32; no float64)"
    return ""


def library_op_names(op: str, backend: str) -> tuple[str, str]:
    """(forward, backward) names under torch.ops.piumr_kernels of `op`'s `backend`."""
    base = f"{LIBRARY_NAME[op]}_{backend}"
    return base, base + "_backward"


def library_op(name: str):
    """torch.ops.piumr_kernels.<name>, or None when it is not registered."""
    return getattr(torch.ops.piumr_kernels, name, None) if hasattr(torch.ops.piumr_kernels, name) else None


def fused_ops() -> dict:
    """{library name: FusedOp}: `piumr_kernels.fused_op.REGISTRY` when the op layer has one,
    else the module-level FusedOp instances the ops' op.py modules declare."""
    import importlib

    fused_op = importlib.import_module("piumr_kernels.fused_op")
    registry = getattr(fused_op, "REGISTRY", None)
    if registry is not None:
        return dict(registry)
    found = {}
    for package in ("sinkhorn_knopp", "dct", "girl", "tfam_pooling"):
        module = importlib.import_module(f"piumr_kernels.{package}.op")
        for value in vars(module).values():
            if isinstance(value, fused_op.FusedOp):
                found[value.name] = value
    return found


# ----------------------------------------------------------------------------- values


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rounded(values: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """fp64 values rounded to `dtype`, on `device` (what both the op and the reference see)."""
    return values.to(dtype).to(device)


def upstream_like(output: torch.Tensor, seed: int) -> torch.Tensor:
    """A non-uniform upstream gradient for `output` (its dtype and device): random signs and
    magnitudes spread over about two decades, so a backward that sums, averages or drops a
    gradient term gives a visibly different answer. A 0-d output gets a scalar other than 1."""
    if output.dim() == 0:
        value = torch.tensor(1.7 + 0.1 * (seed % 7), dtype=torch.float64)
    else:
        g = generator(seed)
        magnitude = torch.exp(2.3 * torch.rand(output.shape, generator=g, dtype=torch.float64))
        value = torch.randn(output.shape, generator=g, dtype=torch.float64) * magnitude
    return value.to(output.dtype).to(output.device)


def differentiable(outputs) -> list[int]:
    """Indices of the outputs that carry a gradient."""
    return [i for i, out in enumerate(outputs) if isinstance(out, torch.Tensor) and out.requires_grad]


def upstream_gradients(outputs, seed: int = 1000) -> dict[int, torch.Tensor]:
    """{output index: non-uniform upstream gradient} for every output carrying a gradient."""
    return {i: upstream_like(outputs[i], seed + i) for i in differentiable(outputs)}


def assert_close(actual, expected, tol: float, what: str) -> None:
    """`actual` within `tol` (a TOLERANCE entry) of the fp64 `expected` (module docstring);
    integer tensors must match exactly, and everything must be finite."""
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}, expected a tensor"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    if not expected.dtype.is_floating_point:
        assert torch.equal(actual.cpu(), expected.cpu()), f"{what}: integer outputs differ"
        return
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64).to(actual.device)
    assert torch.isfinite(actual).all(), (
        f"{what}: non-finite values ({int((~torch.isfinite(actual)).sum())} of {actual.numel()})"
    )
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, SCALE_FLOOR)
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tol * scale, f"{what}: max error {error:.3e} > {tol:.1e} * {scale:.3e}"


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One sample call of a public op.

    `make(dtype, device)` -> the input tuple (fp64 values rounded to `dtype`; `grad_inputs`
    index the float inputs to differentiate). `run(*inputs)` calls the public function and
    returns a tuple of outputs; `reference(*inputs)` the fp64 reference's outputs, same
    structure (it upcasts float inputs itself). Flags: which checks the case takes part in.
    """

    op: str
    id: str
    make: Callable[[torch.dtype, torch.device], tuple]
    run: Callable[..., tuple]
    reference: Callable[..., tuple]
    grad_inputs: tuple[int, ...] = (0,)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    triton: bool = True  # also on the triton interpreter (keep those small)
    reference_backend: bool = True  # also on the reference backend (False: shapes for cpp paths)
    gradcheck: bool = False  # fp64 gradcheck (reference, cpp)
    compile: bool = False  # fullgraph torch.compile vs eager
    opcheck: bool = False  # source of the library ops' sample arguments

    @property
    def name(self) -> str:
        return f"{self.op}-{self.id}"

    def inputs(self, dtype: torch.dtype, device: torch.device = DEVICE, requires_grad: bool = True) -> tuple:
        values = self.make(dtype, device)
        if requires_grad:
            values = tuple(
                v.detach().clone().requires_grad_() if i in self.grad_inputs else v for i, v in enumerate(values)
            )
        return values

    def reference_inputs(self, inputs: tuple, requires_grad: bool = True) -> tuple:
        """The same values in float64 (integer tensors unchanged), fresh leaves."""
        out = []
        for i, value in enumerate(inputs):
            if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
                value = value.detach().to(torch.float64)
                if requires_grad and i in self.grad_inputs:
                    value = value.requires_grad_()
            out.append(value)
        return tuple(out)


def as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def forward_backward(
    fn: Callable[..., tuple], inputs: tuple, grad_inputs, upstream: dict | None = None, seed: int = 1000
):
    """Runs `fn(*inputs)`, then backward with `upstream` (made non-uniform when None) on
    every output carrying a gradient. Returns (outputs, upstream, input gradients)."""
    outputs = as_tuple(fn(*inputs))
    if upstream is None:
        upstream = upstream_gradients(outputs, seed)
    leaves = [inputs[i] for i in grad_inputs]
    used = [i for i in upstream if outputs[i].requires_grad]
    if used and leaves:
        grads = torch.autograd.grad(
            [outputs[i] for i in used], leaves, [upstream[i].to(outputs[i].dtype) for i in used], allow_unused=True
        )
    else:
        grads = tuple(None for _ in leaves)
    return outputs, upstream, grads


GLOBAL_SEED = 1234


def run_case(case: Case, inputs: tuple, upstream: dict | None = None):
    """`forward_backward` of the public function with the global RNG seeded first, so ops
    that draw from it (GIRL without a generator) draw the same on every call."""
    torch.manual_seed(GLOBAL_SEED)
    return forward_backward(case.run, inputs, case.grad_inputs, upstream)


def check_against_reference(case: Case, backend: str, dtype: torch.dtype, device: torch.device = DEVICE) -> None:
    """`case` on `backend` in `dtype`: every output and every input gradient (non-uniform
    upstream gradients, the same rounded values given to the fp64 reference) within
    TOLERANCE[case.op][dtype]; each gradient in the dtype of its input."""
    inputs = case.inputs(dtype, device)
    with backends.use_backend(backend):
        outputs, upstream, grads = run_case(case, inputs)
    ref_inputs = case.reference_inputs(inputs)
    ref_upstream = {i: g.to(torch.float64) for i, g in upstream.items()}
    ref_outputs, _, ref_grads = forward_backward(case.reference, ref_inputs, case.grad_inputs, ref_upstream)
    assert len(outputs) == len(ref_outputs), f"{case.name}: {len(outputs)} outputs, reference has {len(ref_outputs)}"
    tol = TOLERANCE[case.op][dtype]
    for i, (out, ref) in enumerate(zip(outputs, ref_outputs)):
        assert_close(out, ref, tol, f"{case.name} [{backend}, {dtype}] output {i}")
    for i, grad, ref_grad in zip(case.grad_inputs, grads, ref_grads):
        if ref_grad is None:
            assert grad is None or not grad.any(), f"{case.name}: input {i} got a gradient the reference does not have"
            continue
        assert grad is not None, f"{case.name} [{backend}]: input {i} got no gradient"
        assert grad.dtype == inputs[i].dtype, (
            f"{case.name} [{backend}]: gradient of input {i} is {grad.dtype}, input {inputs[i].dtype}"
        )
        assert_close(grad, ref_grad, tol, f"{case.name} [{backend}, {dtype}] gradient of input {i}")


# --- sinkhorn ---------------------------------------------------------------------------------


def _sinkhorn_case(id, shape, log_domain, n_iters=3, dtypes=(torch.float32, torch.float64), triton=True, **flags):
    def make(dtype, device, shape=shape, log_domain=log_domain):
        g = generator(sum(shape) + 7 * log_domain)
        if log_domain:
            values = 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            values = torch.rand(shape, generator=g, dtype=torch.float64) + 0.05
        return (rounded(values, dtype, device),)

    def run(K):
        return (piumr_kernels.sinkhorn(K, n_iters, log_domain=log_domain),)

    def reference(K):
        return (sinkhorn_reference(K.to(torch.float64), n_iters, log_domain=log_domain),)

    domain = "log" if log_domain else "linear"
    return Case("sinkhorn", f"{id}-{domain}", make, run, reference, dtypes=dtypes, triton=triton, **flags)


ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
F64 = (torch.float64,)
# (id, shape, extra flags). Triton tiers: packed (N, M <= 8), one matrix (register tile up
# to 4096 entries), streaming (larger); the cpp paths: 16-matrix lanes blocks of 4x4/8x8/16x16
# (full and partial), plain rows with ragged tails, staged stats (37 matrices).
SINKHORN_SHAPES = [
    ("B1-4x4", (1, 4, 4), {}),
    ("packed-19x4x4", (19, 4, 4), {}),  # a full 16-matrix cpp block and a partial one
    ("packed-33x4x4", (33, 4, 4), dict(compile=True)),
    ("packed-9x4x4", (9, 4, 4), dict(dtypes=ALL_DTYPES, opcheck=True)),
    ("packed-rect-5x3x8", (5, 3, 8), {}),
    ("packed-21x8x8", (21, 8, 8), {}),
    ("lanes-20x16x16", (20, 16, 16), dict(triton=False)),  # cpp: a full 16-matrix block and a partial one
    ("one-matrix-3x16x16", (3, 16, 16), dict(dtypes=ALL_DTYPES, opcheck=True)),
    ("rect-3x5x7", (3, 5, 7), {}),
    ("one-matrix-2x33x20", (2, 33, 20), dict(dtypes=ALL_DTYPES)),
    ("ragged-2x37x45", (2, 37, 45), dict(dtypes=ALL_DTYPES)),
    ("streaming-1x128x128", (1, 128, 128), {}),
    ("streaming-1x65x64", (1, 65, 64), dict(opcheck=True)),
    # cpp-only shapes (the triton streaming tier's odd sizes are in test_sinkhorn_triton_tiers.py)
    ("rect-2x40x100", (2, 40, 100), dict(triton=False, reference_backend=False)),
    ("rows-37x33x40", (37, 33, 40), dict(triton=False, reference_backend=False)),
    ("streaming-2x160x300", (2, 160, 300), dict(triton=False, reference_backend=False)),
    ("streaming-2x150x140", (2, 150, 140), dict(triton=False, reference_backend=False)),
    ("leading-2x3x6x6", (2, 3, 6, 6), {}),
    ("single-row-3x1x7", (3, 1, 7), {}),
    # fp64 gradcheck: the cpp lanes and plain-rows paths
    ("gradcheck-lanes-3x4x5", (3, 4, 5), dict(dtypes=F64, gradcheck=True, triton=False)),
    ("gradcheck-rows-2x40x30", (2, 40, 30), dict(dtypes=F64, gradcheck=True, triton=False)),
]
SINKHORN_CASES = [
    _sinkhorn_case(id, shape, log_domain, **flags)
    for log_domain in (False, True)
    for id, shape, flags in SINKHORN_SHAPES
]


# --- dct_filter_bank --------------------------------------------------------------------------


def _dct_case(
    id, shape, kernel_size=7, frequencies=None, return_stats=True, dtypes=(torch.float32, torch.float64), **flags
):
    def make(dtype, device):
        values = torch.randn(shape, generator=generator(sum(shape)), dtype=torch.float64)
        return (rounded(values, dtype, device),)

    def run(x):
        return as_tuple(piumr_kernels.dct_filter_bank(x, kernel_size, frequencies, return_stats=return_stats))

    def reference(x):
        return as_tuple(dct_filter_bank_reference(x.to(torch.float64), kernel_size, frequencies, return_stats))

    return Case("dct_filter_bank", id, make, run, reference, dtypes=dtypes, **flags)


DCT_CASES = [
    _dct_case(
        "stats-subset-1x3x4x9x11",
        (1, 3, 4, 9, 11),
        frequencies=[5, 0, 48, 13, 13],
        dtypes=ALL_DTYPES,
        opcheck=True,
        compile=True,
    ),
    _dct_case("full-bank-2x2x3x7x7", (2, 2, 3, 7, 7), triton=False),  # 49 filters: minutes in the interpreter
    _dct_case("full-bank-3x2x2x4x4", (3, 2, 2, 4, 4), triton=False),
    _dct_case("E-only-subset-1x2x2x4x4", (1, 2, 2, 4, 4), frequencies=[0, 9, 30], return_stats=False),
    _dct_case("k3-stats-2x2x2x4x3", (2, 2, 2, 4, 3), kernel_size=3, frequencies=[7, 2, 2], gradcheck=True),
    _dct_case("k3-full-1x1x1x1x1", (1, 1, 1, 1, 1), kernel_size=3),
    _dct_case("k3-E-only-full-1x2x1x3x3", (1, 2, 1, 3, 3), kernel_size=3, return_stats=False),
    _dct_case("k3-full-stats-2x2x2x4x3", (2, 2, 2, 4, 3), kernel_size=3, gradcheck=True, triton=False),
]


# --- girl_loss --------------------------------------------------------------------------------


def _tensor_split_sizes(batch: int, num_groups: int) -> list[int]:
    base, extra = divmod(batch, num_groups)
    return [base + 1] * extra + [base] * (num_groups - extra)


def random_partition_of_spec(batch: int, num_groups: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """SPEC §3's pseudo-groups for `generator=torch.Generator().manual_seed(seed)`: a
    permutation drawn with that generator, split into `num_groups` tensor_split chunks."""
    order = torch.randperm(batch, generator=generator(seed))
    return order, _tensor_split_sizes(batch, num_groups)


def explicit_partition_of_spec(groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, list[int]]:
    """SPEC §3's partition for `groups=` ids in `[0, num_groups)`: group g holds the samples
    with id g, in batch order (a group may be empty or a singleton: it is left out)."""
    ids = groups.cpu().tolist()
    members = [[i for i, group in enumerate(ids) if group == g] for g in range(num_groups)]
    order = torch.tensor([i for group in members for i in group], dtype=torch.int64)
    return order, [len(group) for group in members]


def call_girl_reference(features, labels, order, sizes, **options):
    """girl_loss_reference for the partition `(order, sizes)`, whichever way the reference
    takes the partition: group sizes (Python ints) or `offsets` (a `(G + 1,)` int64 tensor on
    the features' device)."""
    if "offsets" in inspect.signature(girl_loss_reference).parameters:
        # Filled in place, not torch.tensor(list, device=...): that also works on fake devices.
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64, device=features.device)
        for g, end in enumerate(itertools.accumulate(sizes)):
            offsets[g + 1] = end
        return girl_loss_reference(features, labels, order, offsets, **options)
    return girl_loss_reference(features, labels, order, list(sizes), **options)


def group_index_of_partition(order: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    index = torch.empty(order.shape[0], dtype=torch.int64)
    for g, members in enumerate(torch.split(order.cpu(), sizes)):
        index[members] = g
    return index


def _girl_case(
    id,
    batch,
    width,
    *,
    num_groups=None,
    groups=None,
    return_details=False,
    generator_seed=None,
    options=None,
    dtypes=(torch.float32, torch.float64),
    **flags,
):
    options = dict(options or {})
    num_classes = 3

    def make(dtype, device):
        g = generator(batch * 31 + width)
        features = 3.0 * torch.randn(batch, width, generator=g, dtype=torch.float64)
        labels = torch.randint(0, num_classes, (batch,), generator=g)
        made = [rounded(features, dtype, device), labels.to(device)]
        if groups is not None:
            made.append(torch.as_tensor(groups).to(device))
        return tuple(made)

    def run(features, labels, group_ids=None):
        kwargs = dict(options)
        kwargs["num_groups"] = num_groups
        if group_ids is not None:
            kwargs["groups"] = group_ids
        else:
            if generator_seed is not None:
                # A CPU generator on every device: the permutation is drawn on the
                # generator's device (SPEC §3), so one seed gives one partition everywhere.
                kwargs["generator"] = generator(generator_seed)
        if return_details:
            loss, details = piumr_kernels.girl_loss(features, labels, return_details=True, **kwargs)
            return loss, details["group_risks"], details["risk_var"], details["group_index"]
        return (piumr_kernels.girl_loss(features, labels, **kwargs),)

    def reference(features, labels, group_ids=None):
        if group_ids is not None:
            order, sizes = explicit_partition_of_spec(group_ids, num_groups)
        elif generator_seed is not None:
            order, sizes = random_partition_of_spec(features.shape[0], num_groups, generator_seed)
        else:
            # No generator: the permutation comes from the global RNG of the features'
            # device, which run_case seeded with GLOBAL_SEED.
            torch.manual_seed(GLOBAL_SEED)
            order = torch.randperm(features.shape[0], device=features.device)
            sizes = _tensor_split_sizes(features.shape[0], num_groups)
        order = order.to(features.device)
        loss, risks, risk_var = call_girl_reference(features.to(torch.float64), labels, order, sizes, **options)
        if return_details:
            return loss, risks.detach(), risk_var.detach(), group_index_of_partition(order, sizes).to(features.device)
        return (loss,)

    return Case("girl_loss", id, make, run, reference, dtypes=dtypes, **flags)


OPTIONS = dict(tau=0.1, eta=0.3, lambda_var=2.0)
GIRL_CASES = [
    # (B, C, G) with B % G != 0 and one group, all four (detach_weights, var_grad) pairs
    _girl_case("random-groups-12x8-G3", 12, 8, num_groups=3, generator_seed=5, options=OPTIONS, opcheck=True),
    _girl_case(
        "random-groups-details-37x24-G4",
        37,
        24,
        num_groups=4,
        generator_seed=6,
        return_details=True,
        options=dict(OPTIONS, detach_weights=False),
    ),
    _girl_case(
        "random-groups-30x16-G4-no-var-grad",
        30,
        16,
        num_groups=4,
        generator_seed=7,
        options=dict(OPTIONS, var_grad=False),
    ),
    _girl_case(
        "one-group-20x40",
        20,
        40,
        num_groups=1,
        generator_seed=8,
        options=dict(OPTIONS, detach_weights=False, var_grad=False),
    ),
    _girl_case(
        "low-precision-24x16-G3",
        24,
        16,
        num_groups=3,
        generator_seed=9,
        options=dict(detach_weights=False),
        dtypes=(torch.float16, torch.bfloat16),
    ),
    # no generator: the global RNG (run_case seeds it), under torch.compile too
    _girl_case(
        "global-rng-details-20x8-G3",
        20,
        8,
        num_groups=3,
        return_details=True,
        options=dict(detach_weights=False),
        compile=True,
    ),
    # ids in [0, num_groups): group 3 is empty and group 4 a singleton, both left out of the
    # loss (SPEC §3)
    _girl_case(
        "explicit-groups-details-10x5",
        10,
        5,
        num_groups=5,
        groups=[0, 2, 0, 2, 2, 0, 1, 1, 0, 4],
        return_details=True,
        options=dict(tau=0.5, eta=0.4, lambda_var=1.5, detach_weights=False),
        gradcheck=True,
        compile=True,
        opcheck=True,
    ),
    # the paper's Var(stopgrad(L_g)) with no penalty: the gradient is the mean risk's
    _girl_case(
        "explicit-groups-no-var-10x5",
        10,
        5,
        num_groups=5,
        groups=[0, 2, 0, 2, 2, 0, 1, 1, 0, 4],
        options=dict(tau=0.5, eta=0.4, lambda_var=0.0, var_grad=False, detach_weights=False),
        dtypes=(torch.float64,),
        gradcheck=True,
        triton=False,
    ),
]


# --- tfam ---------------------------------------------------------------------------------------


def _tfam_statistics_case(id, shape, dtypes=(torch.float32, torch.float64), **flags):
    def make(dtype, device):
        return (rounded(torch.randn(shape, generator=generator(sum(shape)), dtype=torch.float64), dtype, device),)

    def run(x):
        return tuple(piumr_kernels.tfam_statistics(x))

    def reference(x):
        return tuple(tfam_statistics_reference(x.to(torch.float64)))

    return Case("tfam_statistics", id, make, run, reference, dtypes=dtypes, **flags)


def _tfam_combine_case(id, shape, dtypes=(torch.float32, torch.float64), **flags):
    def make(dtype, device):
        g = generator(sum(shape) + 1)
        batch, _, frames, height, width = shape
        x = rounded(torch.randn(shape, generator=g, dtype=torch.float64), dtype, device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        temporal = rounded(torch.randn(batch, frames, generator=g, dtype=torch.float64), acc, device)
        spatial = rounded(torch.randn(batch, height, width, generator=g, dtype=torch.float64), acc, device)
        return x, temporal, spatial

    def run(x, temporal, spatial):
        return (piumr_kernels.tfam_combine(x, temporal, spatial),)

    def reference(x, temporal, spatial):
        return (tfam_combine_reference(x.to(torch.float64), temporal.to(torch.float64), spatial.to(torch.float64)),)

    return Case("tfam_combine", id, make, run, reference, grad_inputs=(0, 1, 2), dtypes=dtypes, **flags)


TFAM_SHAPES = {"2x5x4x6x7": (2, 5, 4, 6, 7), "1x2x3x33x35": (1, 2, 3, 33, 35), "3x1x1x1x1": (3, 1, 1, 1, 1)}
TFAM_CASES = [
    _tfam_statistics_case("2x5x4x6x7", (2, 5, 4, 6, 7), dtypes=ALL_DTYPES, opcheck=True, compile=True),
    _tfam_statistics_case("1x2x3x33x35", (1, 2, 3, 33, 35), dtypes=ALL_DTYPES),
    _tfam_statistics_case("3x1x1x1x1", (3, 1, 1, 1, 1), dtypes=ALL_DTYPES),
    _tfam_statistics_case(
        "gradcheck-2x3x2x3x4", (2, 3, 2, 3, 4), dtypes=(torch.float64,), gradcheck=True, triton=False
    ),
    _tfam_combine_case("2x5x4x6x7", (2, 5, 4, 6, 7), dtypes=ALL_DTYPES, opcheck=True, compile=True),
    _tfam_combine_case("1x2x3x33x35", (1, 2, 3, 33, 35), dtypes=ALL_DTYPES),
    _tfam_combine_case("3x1x1x1x1", (3, 1, 1, 1, 1), dtypes=ALL_DTYPES),
    _tfam_combine_case("gradcheck-2x3x2x3x4", (2, 3, 2, 3, 4), dtypes=(torch.float64,), gradcheck=True, triton=False),
]

CASES: list[Case] = SINKHORN_CASES + DCT_CASES + GIRL_CASES + TFAM_CASES
assert len({case.name for case in CASES}) == len(CASES), "case names must be unique"


def cases(op: str | None = None, **flags) -> list[Case]:
    """The cases of `op` (all ops when None) whose flags match, e.g. cases(gradcheck=True)."""
    return [
        case
        for case in CASES
        if (op is None or case.op == op) and all(getattr(case, flag) == value for flag, value in flags.items())
    ]


def case_params(selected: list[Case], backends_: tuple[str, ...] = BACKENDS, dtypes: tuple | None = None):
    """pytest params (case, backend, dtype) over `selected`, each skipped with its reason
    where the backend cannot run it here (triton: float32-only, and only for `triton` cases)."""
    params = []
    for case, backend in itertools.product(selected, backends_):
        if backend == "reference" and not case.reference_backend:
            continue  # a shape for the fused backends' code paths; the reference has none
        for dtype in dtypes or case.dtypes:
            if dtype not in case.dtypes:
                continue
            reason = backend_skip_reason(backend, dtype)
            if not reason and backend == "triton" and not case.triton:
                reason = "cpp-path shape: kept off the slow triton interpreter (its tiers have their own cases)"
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(case, backend, dtype, marks=marks, id=f"{case.name}-{backend}-{str(dtype)[6:]}"))
    return params
