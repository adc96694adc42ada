"""The shared op layer (piumr_kernels/fused_op.py): registration, the dtype rule, the device
guard, and no materialized gradients for outputs that take none."""

import pytest
import torch
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

import piumr_kernels
from piumr_kernels import backends, fused_op
from piumr_kernels.dct.op import DCT_FILTER_BANK
from piumr_kernels.sinkhorn_knopp.op import SINKHORN
from piumr_kernels.tfam_pooling.op import TFAM_COMBINE, TFAM_STATISTICS

FUSED_OPS = [SINKHORN, DCT_FILTER_BANK, TFAM_STATISTICS, TFAM_COMBINE]


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_accumulation_dtype_rule(dtype, expected):
    assert fused_op.accumulation_dtype(dtype) == expected


@pytest.mark.parametrize("op", FUSED_OPS, ids=lambda op: op.name)
def test_every_available_backend_is_registered_under_the_naming_rule(op):
    for backend in fused_op.FUSED_BACKENDS:
        if not backends.backend_available(backend):
            continue
        for backward in (False, True):
            name = op.op_name(backend, backward).split("::")[1]
            assert hasattr(torch.ops.piumr_kernels, name), name


class _RecordDevice:
    entered: list = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _RecordDevice.entered.append(self.device)

    def __exit__(self, *exc):
        return False


def test_device_guard_selects_the_inputs_device(monkeypatch):
    """With several GPUs the launch runs under the first CUDA input's device (fake CUDA
    tensors: no GPU needed); CPU inputs and a single GPU need no guard."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "device", _RecordDevice)
    _RecordDevice.entered = []
    with FakeTensorMode():
        on_second_gpu = torch.empty(2, device="cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with fused_op.device_guard([3, on_second_gpu]):
        pass
    assert _RecordDevice.entered == [torch.device("cuda:1")]
    with fused_op.device_guard([torch.empty(2)]):
        pass
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with fused_op.device_guard([on_second_gpu]):
        pass
    assert _RecordDevice.entered == [torch.device("cuda:1")]


def test_inputs_on_two_devices_are_a_clear_error():
    fused = [name for name in fused_op.FUSED_BACKENDS if backends.backend_available(name)]
    if not fused:
        pytest.skip("no fused backend here")
    x = torch.rand(1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"x on cpu, temporal_scale on meta"):
        TFAM_COMBINE(fused[0], x, torch.rand(1, 2, device="meta"), torch.rand(1, 3, 3))


class _CountFills(TorchDispatchMode):
    """Counts the kernels that write zeros (what autograd uses to materialize a gradient)."""

    def __init__(self):
        super().__init__()
        self.fills = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (
            torch.ops.aten.zeros,
            torch.ops.aten.zero_,
            torch.ops.aten.fill_,
            torch.ops.aten.zeros_like,
            torch.ops.aten.new_zeros,
        ):
            self.fills.append(func)
        return func(*args, **(kwargs or {}))


def test_outputs_without_gradient_get_no_zero_gradient(backend):
    """Sinkhorn's per-iteration statistics and TFAM's argmax are op outputs that take no
    gradient: the backward must not fill zero tensors for them."""
    if backend == "reference":
        pytest.skip("the reference has no fused op outputs")
    K = torch.rand(64, 4, 4, device=DEVICE, requires_grad=True)
    P = piumr_kernels.sinkhorn(K, 20)
    x = torch.rand(2, 3, 2, 5, 5, device=DEVICE, requires_grad=True)
    mean, peak, spatial = piumr_kernels.tfam_statistics(x)
    loss = P.square().sum() + mean.sum() + peak.sum() + spatial.sum()
    with _CountFills() as counter:
        loss.backward()
    assert counter.fills == []
