"""Devices: every op runs on the device of its inputs, and mixed devices are a clear error.

No GPU is needed: under `FakeTensorMode(allow_non_fake_inputs=False)` tensors made with
`device="cuda"` are fake CUDA tensors, and any op that meets a CUDA tensor with a CPU tensor
(other than a 0-d scalar, as on a real GPU) raises. So running an op's forward and backward
on fake CUDA inputs proves that no CPU constant (a basis, a mask, an index, offsets) is
built on the default device and combined with the input.

A CPU-only torch build makes fake CUDA tensors, but views, slices, copies and autograd on
them need CUDA's device guard (an error, or for autograd a process abort), so there the
checks run on fake *meta* tensors: FakeTensorMode checks devices the same way for them (a CPU
tensor meeting a meta tensor raises, 0-d CPU scalars aside), while plain meta tensors do not
(conv2d takes a CPU weight). With a CUDA build of torch the fake CUDA variants run too.
FakeTensorMode itself lets a few ops through (its convolution rule ignores the weight's
device), so `StrictDevices` checks every aten op's arguments on top of it; the negative
controls show both catch a CPU constant.

- the fp64 references in piumr_kernels/<op>/reference.py, called directly;
- the public functions on the reference backend (their argument handling and partitions
  run too), and on the triton backend (the launchers' allocations; the kernels themselves
  do not run under fake tensors);
- inputs on different devices (meta + cpu, fake cuda + fake cpu) give an error naming the
  arguments and their devices, from the public functions on every backend and from the
  FusedOp call path when `piumr_kernels.fused_op.REGISTRY` exists.
"""

from __future__ import annotations

import contextlib

import op_harness as H
import pytest
import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import piumr_kernels
from piumr_kernels import backends
from piumr_kernels.dct.reference import dct_filter_bank_reference
from piumr_kernels.sinkhorn_knopp.reference import sinkhorn_reference
from piumr_kernels.tfam_pooling.reference import tfam_combine_reference, tfam_statistics_reference

CUDA = torch.device("cuda")
CUDA_BUILT = torch.backends.cuda.is_built()
NO_FAKE_CUDA = (
    "this torch build has no CUDA: fake CUDA tensors can be made, but views, slices, copies and "
    "autograd on them need CUDA's device guard ('PyTorch is not linked with support for cuda "
    "devices', autograd aborts the process); fake meta tensors run the same device checks"
)
# (fake device, whether autograd runs on it)
FAKE_DEVICES = [
    pytest.param(
        torch.device("cuda"), True, id="fake-cuda", marks=[] if CUDA_BUILT else [pytest.mark.skip(reason=NO_FAKE_CUDA)]
    ),
    pytest.param(torch.device("meta"), True, id="fake-meta"),
]


class StrictDevices(TorchDispatchMode):
    """Every aten op's tensor arguments on one device (0-d CPU scalars aside, as on a GPU).

    Runs inside FakeTensorMode, which checks most ops itself but not all: its convolution
    rule takes the input's device without looking at the weight's, so a CPU filter bank
    meeting a CUDA input would pass unseen. Copies between devices are what `.to` is for."""

    ALLOWED = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.ALLOWED:
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                raise RuntimeError(f"{func}: tensors on different devices: {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_mode(mode: FakeTensorMode | None = None):
    """FakeTensorMode (no real tensors allowed in) with StrictDevices on top."""
    with mode or FakeTensorMode(allow_non_fake_inputs=False), StrictDevices():
        yield


def _fake_cuda_supported() -> str:
    try:
        with FakeTensorMode(allow_non_fake_inputs=False):
            torch.empty(2, device="cuda")
    except Exception as error:  # pragma: no cover - depends on the torch build
        return f"fake CUDA tensors are not available in this torch build: {error}"
    return ""


pytestmark = pytest.mark.skipif(bool(_fake_cuda_supported()), reason=_fake_cuda_supported() or "")


def _backward(outputs, leaves):
    outputs = [o for o in H.as_tuple(outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
    grads = torch.autograd.grad(outputs, leaves, [torch.ones_like(o) for o in outputs], allow_unused=True)
    for leaf, grad in zip(leaves, grads):
        if grad is not None:
            assert grad.device == leaf.device, f"gradient on {grad.device}, input on {leaf.device}"
    return grads


def _assert_on(device, outputs):
    for out in H.as_tuple(outputs):
        if isinstance(out, torch.Tensor):
            assert out.device.type == device.type, f"output on {out.device}, inputs on {device}"


# ----------------------------------------------------------------------------- references


def _leaf(tensor, grad):
    return tensor.requires_grad_() if grad else tensor


def _sinkhorn(log_domain):
    def run(device, grad):
        K = _leaf(torch.rand(3, 5, 6, device=device, dtype=torch.float64), grad)
        P = sinkhorn_reference(K, 3, log_domain=log_domain)
        return P, [K]

    return run


def _dct(frequencies, return_stats):
    def run(device, grad):
        x = _leaf(torch.randn(2, 3, 2, 6, 5, device=device), grad)
        return dct_filter_bank_reference(x, 7, frequencies, return_stats), [x]

    return run


def _girl(detach_weights, var_grad):
    def run(device, grad):
        features = _leaf(torch.randn(10, 4, device=device, dtype=torch.float64), grad)
        labels = torch.randint(0, 3, (10,), device=device)
        order = torch.randperm(10, device=device)
        out = H.call_girl_reference(
            features,
            labels,
            order,
            [4, 3, 3],
            tau=0.1,
            eta=0.3,
            lambda_var=1.0,
            var_grad=var_grad,
            detach_weights=detach_weights,
        )
        return out, [features]

    return run


def _tfam_statistics(device, grad):
    x = _leaf(torch.randn(2, 3, 4, 5, 6, device=device), grad)
    return tfam_statistics_reference(x), [x]


def _tfam_combine(device, grad):
    x = _leaf(torch.randn(2, 3, 4, 5, 6, device=device, dtype=torch.bfloat16), grad)
    ts = _leaf(torch.randn(2, 4, device=device), grad)
    ss = _leaf(torch.randn(2, 5, 6, device=device), grad)
    return tfam_combine_reference(x, ts, ss), [x, ts, ss]


REFERENCES = {
    "sinkhorn-linear": _sinkhorn(False),
    "sinkhorn-log": _sinkhorn(True),
    "dct-full-bank": _dct(None, False),
    "dct-stats-subset": _dct([5, 0, 48, 13], True),
    "girl-detached-weights": _girl(True, True),
    "girl-differentiated-weights": _girl(False, False),
    "tfam_statistics": _tfam_statistics,
    "tfam_combine": _tfam_combine,
}


@pytest.mark.parametrize("device,grad", FAKE_DEVICES)
@pytest.mark.parametrize("run", REFERENCES.values(), ids=REFERENCES.keys())
def test_reference_forward_backward_on_fake_device(run, device, grad):
    with fake_mode():
        outputs, leaves = run(device, grad)
        _assert_on(device, outputs)
        if grad:
            _backward(outputs, leaves)


CPU_CONSTANTS = {
    # the DCT reference before it built its basis on the input's device
    "conv2d with a CPU weight": lambda x: torch.nn.functional.conv2d(x[:, 0, 0, None], torch.ones(2, 1, 3, 3)),
    "a CPU index vector": lambda x: x * torch.arange(x.shape[-1], dtype=x.dtype),
    "a CPU mask": lambda x: torch.where(torch.ones(x.shape[-1], dtype=torch.bool), x, 0.0),
}


@pytest.mark.parametrize("device,grad", FAKE_DEVICES)
@pytest.mark.parametrize("mix", CPU_CONSTANTS.values(), ids=CPU_CONSTANTS.keys())
def test_fake_device_catches_a_cpu_constant(mix, device, grad):
    """Negative control: a CPU constant meeting the input is an error on the fake device."""
    with fake_mode():
        x = torch.empty(2, 3, 4, 5, 6, device=device)
        with pytest.raises(RuntimeError, match="device"):
            mix(x)


# ----------------------------------------------------------------------------- public functions


def _public_params():
    params = []
    for case in H.CASES:
        if case.op == "sinkhorn" and not any(
            tier in case.id for tier in ("packed-9x4x4", "one-matrix-3x16x16", "streaming-1x65x64")
        ):
            continue  # the other shapes run the same Python on fake tensors
        for backend in ("reference", "triton"):
            for device_param in FAKE_DEVICES:
                device, grad = device_param.values
                if backend == "triton" and device.type != "cuda":
                    continue  # the triton backend takes CUDA tensors only
                reason = ""
                if device.type == "cuda" and not CUDA_BUILT:
                    reason = NO_FAKE_CUDA
                if backend == "triton" and not reason:
                    if backends.triton_interpreting():
                        reason = (
                            "TRITON_INTERPRET=1: torch.library.wrap_triton returns the raw kernel under the "
                            "interpreter, so a triton op on fake tensors would run the interpreter on them"
                        )
                params.append(
                    pytest.param(
                        case,
                        backend,
                        device,
                        grad,
                        marks=[pytest.mark.skip(reason=reason)] if reason else [],
                        id=f"{case.name}-{backend}-{device_param.id}",
                    )
                )
    return params


def fake_inputs(case, dtype, device, grad, mode):
    """`case`'s inputs as tensors of the same shapes and dtypes on `device`, fake under
    `mode` (values do not matter to fake tensors; copying real CPU values to a fake CUDA
    tensor needs CUDA in the torch build)."""
    real = case.make(dtype, torch.device("cpu"))  # made outside the mode: real CPU tensors
    with mode:
        made = []
        for i, value in enumerate(real):
            fake = torch.empty(value.shape, dtype=value.dtype, device=device)
            made.append(fake.requires_grad_() if grad and i in case.grad_inputs else fake)
    return tuple(made)


@pytest.mark.parametrize("case,backend,device,grad", _public_params())
def test_public_function_on_fake_device(case, backend, device, grad):
    """The public function, forward and backward, with every input on a fake device."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    inputs = fake_inputs(case, torch.float32, device, grad, mode)
    with fake_mode(mode), backends.use_backend(backend):
        outputs = H.as_tuple(case.run(*inputs))
        _assert_on(device, outputs)
        if grad:
            _backward(outputs, [inputs[i] for i in case.grad_inputs])


@pytest.mark.parametrize("device,grad", FAKE_DEVICES)
def test_girl_default_partition_on_fake_device(device, grad):
    """GIRL's own permutation (global RNG, no generator) is drawn on the features' device."""
    with fake_mode():
        features = torch.empty(12, 6, device=device).requires_grad_(grad)
        labels = torch.zeros(12, dtype=torch.int64, device=device)
        with backends.use_backend("reference"):
            loss, details = piumr_kernels.girl_loss(features, labels, num_groups=3, return_details=True)
        _assert_on(device, (loss, *details.values()))
        if grad:
            _backward((loss,), [features])


# ----------------------------------------------------------------------------- mixed devices


def _mixed_calls(make):
    """(description, call, argument names that must appear in the error) for each public
    op with several tensor arguments; `make(shape, dtype, where)` builds one tensor."""
    f32, i64 = torch.float32, torch.int64
    yield (
        "girl_loss labels",
        lambda: piumr_kernels.girl_loss(make((8, 4), f32, 0), make((8,), i64, 1), num_groups=2),
        ("features", "labels"),
    )
    yield (
        "girl_loss groups",
        lambda: piumr_kernels.girl_loss(make((8, 4), f32, 0), make((8,), i64, 0), groups=make((8,), i64, 1)),
        ("features", "groups"),
    )
    yield (
        "tfam_combine temporal_scale",
        lambda: piumr_kernels.tfam_combine(
            make((2, 3, 4, 5, 6), f32, 0), make((2, 4), f32, 1), make((2, 5, 6), f32, 0)
        ),
        ("x", "temporal_scale"),
    )
    yield (
        "tfam_combine spatial_scale",
        lambda: piumr_kernels.tfam_combine(
            make((2, 3, 4, 5, 6), f32, 0), make((2, 4), f32, 0), make((2, 5, 6), f32, 1)
        ),
        ("x", "spatial_scale"),
    )


def _maker(devices):
    def make(shape, dtype, where):
        if dtype.is_floating_point:
            return torch.randn(shape, dtype=dtype, device=devices[where])
        return torch.randint(0, 2, shape, dtype=dtype, device=devices[where])

    return make


@pytest.mark.parametrize("backend", H.BACKENDS)
@pytest.mark.parametrize("pair", ["meta+cpu", "fake-cuda+fake-cpu"])
def test_mixed_devices_error_names_the_arguments(backend, pair):
    failures = []
    context = FakeTensorMode(allow_non_fake_inputs=False) if pair.startswith("fake") else torch.no_grad()
    devices = ("meta", "cpu") if pair == "meta+cpu" else ("cuda", "cpu")
    with context, backends.use_backend(backend):
        for what, call, names in _mixed_calls(_maker(devices)):
            try:
                call()
            except (ValueError, RuntimeError, TypeError) as error:
                message = str(error)
                if not all(name in message for name in names) or "device" not in message:
                    failures.append(f"{what}: error does not name {names} and their devices: {message!r}")
            else:
                failures.append(f"{what}: no error for inputs on {devices[0]} and {devices[1]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend", H.FUSED_BACKENDS)
def test_fused_op_call_with_mixed_devices_names_the_arguments(backend):
    """FusedOp.__call__ (the library-op entry of the op layer) checks devices: every fused op
    with two or more tensor inputs, called with its first input on meta and the rest on cpu."""
    if not backends.backend_available(backend):
        pytest.skip(f"{backend} backend unavailable")
    calls = {
        # girl_cpp(features, labels, order, offsets, tau, eta, lambda_var, var_grad, detach_weights, need_grad)
        "girl": lambda: (
            torch.randn(8, 4, device="meta"),
            torch.zeros(8, dtype=torch.int64),
            torch.arange(8),
            torch.tensor([0, 4, 8]),
            0.1,
            0.3,
            1.0,
            True,
            True,
            False,
        ),
        "tfam_combine": lambda: (torch.randn(2, 3, 4, 5, 6, device="meta"), torch.randn(2, 4), torch.randn(2, 5, 6)),
    }
    ops = H.fused_ops()
    if not ops:
        pytest.skip("no FusedOp declared yet (the op layer refactor is in progress)")
    checked = []
    for name, make in calls.items():
        if name not in ops:
            continue
        op = ops[name]
        library_op = H.library_op(f"{name}_{backend}")
        if library_op is None:
            continue
        schema = [argument.name for argument in library_op.default._schema.arguments]
        args = make()
        if len(args) != len(schema):
            continue  # the op's schema changed since this test was written: see test_opcheck
        first, second = schema[0], schema[1]
        with pytest.raises(ValueError, match=rf"(?s){first} on meta.*{second} on cpu"):
            op(backend, *args)
        checked.append(name)
    assert checked, f"no FusedOp with several tensor inputs found for {backend}"
