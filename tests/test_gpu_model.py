"""The counted quantities of tools/gpu_model.py (not its modelled times), at small shapes under
triton's interpreter: the counters are exact on hand-checkable kernels, the launches each op
makes per forward and forward+backward, that counts extrapolate exactly in the batch where
the tool extrapolates, and that a forward without gradient writes nothing only a backward needs."""

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the counters instrument triton's interpreter (TRITON_INTERPRET=1)",
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

FP32 = 4


@pytest.fixture(scope="module")
def gpu_model():
    import gpu_model  # sets TRITON_INTERPRET=1 itself: imported only when the module is not skipped

    return gpu_model


@pytest.fixture(scope="module")
def counters():
    import interpreter_counters

    return interpreter_counters


@triton.jit
def _scaled_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=inside) * 2.0 + 1.0, mask=inside)


@triton.jit
def _square_product(a_ptr, c_ptr, PRECISION: tl.constexpr):
    index = tl.arange(0, 16)
    tile = index[:, None] * 16 + index[None, :]
    transposed = index[None, :] * 16 + index[:, None]
    a = tl.load(a_ptr + tile)
    tl.store(c_ptr + tile, tl.dot(a, tl.load(a_ptr + transposed), input_precision=PRECISION))


def test_masked_copy_counts_only_active_lanes(counters):
    x, y = torch.randn(100), torch.empty(100)
    with counters.count_launches() as log:
        _scaled_copy[(triton.cdiv(100, 64),)](x, y, 100, BLOCK=64)
    (launch,) = log.launches
    assert torch.equal(y, x * 2.0 + 1.0)
    assert launch.programs == 2
    assert (launch.loaded_bytes, launch.stored_bytes) == (400, 400)  # 800 bytes, not 2 x 64 lanes
    assert (launch.distinct_loaded_bytes, launch.distinct_stored_bytes) == (400, 400)
    assert launch.flops == 2 * 2 * 64  # a mul and an add on every lane of both blocks, masked or not


@pytest.mark.parametrize(
    "dtype, precision, path",
    [
        (torch.float32, "ieee", "fma_dot_macs"),
        (torch.float32, "tf32", "tf32_macs"),
        (torch.bfloat16, "ieee", "fp16_macs"),
    ],
)
def test_dot_counts_multiply_accumulates_per_pipe(counters, dtype, precision, path):
    a, c = torch.randn(16, 16).to(dtype), torch.empty(16, 16)
    with counters.count_launches() as log:
        _square_product[(1,)](a, c, precision)
    (launch,) = log.launches
    macs = {name: getattr(launch, name) for name in ("fma_dot_macs", "tf32_macs", "fp16_macs")}
    assert macs == {name: 16 * 16 * 16 if name == path else 0 for name in macs}
    # `a` is loaded twice (as is and transposed) but is one 16x16 tile of distinct bytes.
    assert launch.loaded_bytes == 2 * launch.distinct_loaded_bytes == 2 * 256 * a.element_size()


# (op, shape, Triton launches fwd, torch ops fwd, Triton launches fwd+bwd, torch ops fwd+bwd),
# counted on the current kernels at small shapes.
LAUNCHES = [
    ("sinkhorn", (64, 4, 4, 2), 1, 0, 2, 0),  # packed tier
    ("sinkhorn", (1, 16, 16, 2), 1, 0, 2, 0),  # one_matrix tier
    ("sinkhorn", (1, 65, 64, 2), 1, 0, 2, 0),  # streaming tier (GPU tiles)
    ("girl", (12, 16, 2), 1, 1, 2, 1),  # torch: the permutation (offsets and program table kept)
    ("tfam_statistics", (1, 2, 2, 8, 8), 1, 0, 2, 0),  # after the first call (test_tfam_allocates_its_tickets_once)
    ("tfam_combine", (1, 2, 2, 8, 8), 1, 0, 2, 0),
]


def _op(gpu_model, name):
    return next(op for op in gpu_model.OPS if op.name == name)


@functools.cache
def _count(name, shape, backward):
    """One op call's count, shared by the tests (the interpreter is slow)."""
    import gpu_model

    op = _op(gpu_model, name)
    gpu_model.warm_up(op, shape)
    return gpu_model.count_call(op.prepare(shape, backward))


@pytest.mark.parametrize(
    "name, shape, fwd, fwd_torch, both, both_torch", LAUNCHES, ids=[f"{case[0]}-{case[1]}" for case in LAUNCHES]
)
def test_launches_per_call(gpu_model, name, shape, fwd, fwd_torch, both, both_torch):
    forward, forward_backward = _count(name, shape, False), _count(name, shape, True)
    assert (len(forward.launches), len(forward.torch_ops)) == (fwd, fwd_torch), [o.name for o in forward.torch_ops]
    assert (len(forward_backward.launches), len(forward_backward.torch_ops)) == (both, both_torch), [
        o.name for o in forward_backward.torch_ops
    ]


def test_dct_builds_its_basis_once(gpu_model):
    """DCT is not in LAUNCHES: its first call in a process builds the 1-D basis and the filter
    indices on the device (13 torch ops), every later forward and backward reuses them."""
    from piumr_kernels.dct import triton_kernels

    _allocate_tickets()
    triton_kernels._bank_tables.cache_clear()
    calls = [
        gpu_model.count_call(_op(gpu_model, "dct").prepare((1, 2, 2, 8, 8), backward))
        for backward in (False, False, True)
    ]
    assert [(len(call.launches), len(call.torch_ops)) for call in calls] == [(2, 13), (2, 0), (4, 0)], [
        [op.name for op in call.torch_ops] for call in calls
    ]


def _allocate_tickets():
    """The split reductions' ticket buffer, allocated once per process (see test_tfam_allocates_its_tickets_once)."""
    from piumr_kernels.launch_state import zeroed_tickets

    zeroed_tickets(torch.empty(0), 1)


def test_tfam_allocates_its_tickets_once(gpu_model):
    """TFAM's reductions finish in their last program per clip, counted with int32 tickets
    that each launch leaves at zero: the first call in a process allocates them zeroed (one
    fill), every later forward and backward reuses them."""
    from piumr_kernels import launch_state

    launch_state._tickets.clear()
    calls = [
        gpu_model.count_call(_op(gpu_model, name).prepare((1, 2, 2, 8, 8), backward))
        for name, backward in (("tfam_statistics", False), ("tfam_combine", True), ("tfam_statistics", True))
    ]
    assert [(len(call.launches), len(call.torch_ops)) for call in calls] == [(1, 1), (2, 0), (2, 0)], [
        [op.name for op in call.torch_ops] for call in calls
    ]
    assert not any(launch_state._tickets[(torch.device("cpu"), None)])


def test_tfam_linked_backward_reads_x_once_and_writes_dx_once(gpu_model):
    """TFAM's shape of call (scales made from the statistics of the same x, linked): the
    combine backward reads dout and x and writes only small partials; the statistics backward
    reads dout and writes dx; no other launch or torch op touches an x-sized tensor."""
    import piumr_kernels

    _allocate_tickets()
    shape = (1, 3, 2, 8, 8)
    x = torch.randn(shape).requires_grad_()
    grad = torch.randn(shape)

    def step():
        frame_mean, frame_max, spatial, link = piumr_kernels.tfam_statistics(x, link=True)
        temporal = torch.sigmoid(frame_mean.mean(1) + frame_max.mean(1))
        out = piumr_kernels.tfam_combine(x, temporal, torch.sigmoid(spatial), link=link)
        return torch.autograd.grad(out, x, grad)

    count = gpu_model.count_call(step)
    x_bytes = x.numel() * FP32
    assert [launch.kernel for launch in count.launches] == [
        "_statistics_kernel",
        "_combine_kernel",
        "_combine_backward_kernel",
        "_statistics_backward_kernel",
    ]
    assert all(op.bytes < x_bytes for op in count.torch_ops), [(op.name, op.bytes) for op in count.torch_ops]
    _, _, combine_backward, statistics_backward = count.launches
    assert combine_backward.constexprs["WRITE_DX"] is False
    assert 2 * x_bytes <= combine_backward.distinct_loaded_bytes < 2.5 * x_bytes
    assert combine_backward.distinct_stored_bytes < 0.5 * x_bytes
    assert statistics_backward.constexprs["COMBINE"] is True
    assert x_bytes <= statistics_backward.distinct_loaded_bytes < 1.5 * x_bytes
    assert statistics_backward.stored_bytes == statistics_backward.distinct_stored_bytes == x_bytes


# Shapes whose counts at n and 2n batch items extrapolate to 3n: whole packed programs (64
# 4x4 matrices) for Sinkhorn's packed tier, matrices for its other tiers (the tool
# extrapolates Sinkhorn only), clips for TFAM.
LINEAR = [
    ("sinkhorn", (64, 4, 4, 2), 64),
    ("sinkhorn", (1, 16, 16, 2), 1),
    ("sinkhorn", (1, 65, 64, 2), 1),
    ("tfam_statistics", (1, 2, 2, 8, 8), 1),
    ("tfam_combine", (1, 2, 2, 8, 8), 1),
]


def _numbers(count, gpu_model) -> list:
    return [
        (launch.kernel, launch.programs) + tuple(getattr(launch, name) for name in gpu_model.COUNTED_FIELDS)
        for launch in count.launches
    ] + [(op.name, op.bytes) for op in count.torch_ops]


@pytest.mark.parametrize("name, shape, items", LINEAR, ids=[f"{case[0]}-{case[1]}" for case in LINEAR])
def test_extrapolation_from_n_and_2n_items_equals_the_count_at_3n(gpu_model, name, shape, items):
    at_n, at_2n, at_3n = (_count(name, gpu_model.with_batch(shape, k * items), True) for k in (1, 2, 3))
    extrapolated = gpu_model.extrapolate(at_n, at_2n, 3)
    assert extrapolated is not None
    assert _numbers(extrapolated, gpu_model) == _numbers(at_3n, gpu_model)


@pytest.mark.parametrize("name, shape", [case[:2] for case in LINEAR], ids=[f"{case[0]}-{case[1]}" for case in LINEAR])
def test_launch_plan_without_running_programs_matches_the_real_run(gpu_model, name, shape):
    gpu_model.warm_up(_op(gpu_model, name), shape)
    plan = gpu_model.count_call(_op(gpu_model, name).prepare(shape, True), run_programs=False)
    assert gpu_model.launch_plan_of(plan) == gpu_model.launch_plan_of(_count(name, shape, True))
    assert all(launch.bytes == 0 for launch in plan.launches)


@pytest.mark.parametrize("shape", [(64, 4, 4, 2), (1, 16, 16, 2)], ids=["packed", "one_matrix"])
def test_sinkhorn_forward_without_grad_writes_only_P(gpu_model, shape):
    batch, rows, cols, _ = shape
    (launch,) = _count("sinkhorn", shape, False).launches
    assert launch.stored_bytes == launch.distinct_stored_bytes == batch * rows * cols * FP32


def test_sinkhorn_streaming_forward_without_grad_writes_P_scales_and_slice_partials(gpu_model):
    """The streaming forward splits each matrix into row slices: per iteration each slice
    rewrites its rows of U and its column-sum partial, the last slice V; no per-iteration
    stats."""
    from piumr_kernels.sinkhorn_knopp import triton_kernels

    batch, rows, cols, iters = shape = (1, 65, 64, 2)
    slices, _ = triton_kernels.stream_slices(triton_kernels.launch_plan(rows, cols), batch, rows, torch.device("cpu"))
    assert slices == 5  # 16-row tiles, one per slice
    (launch,) = _count("sinkhorn", shape, False).launches
    vectors = batch * (rows + cols + slices * cols) * FP32
    # int32 ticket resets: the arrival count after each of the iters + 1 stages, the queue once.
    resets, tickets = (iters + 2) * 4, 2 * 4
    assert launch.programs == batch * slices
    assert launch.stored_bytes == batch * rows * cols * FP32 + iters * vectors + resets
    assert launch.distinct_stored_bytes == batch * rows * cols * FP32 + vectors + tickets


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_sinkhorn_streaming_launches_fill_an_h100(gpu_model, backward):
    """32 128x128 matrices: each streaming launch splits them into row slices for at least 2
    programs per SM of an H100 (counted from the grids alone)."""
    step = _op(gpu_model, "sinkhorn").prepare((32, 128, 128, 3), backward)
    launches = gpu_model.count_call(step, run_programs=False).launches
    assert [launch.kernel for launch in launches] == ["_forward_rows_kernel", "_backward_streaming_kernel"][
        : 1 + backward
    ]
    assert all(launch.programs == 256 and -(-launch.programs // gpu_model.H100.sms) >= 2 for launch in launches)


def test_sinkhorn_streaming_wide_forward_without_grad_writes_P_and_running_scales_only(gpu_model):
    """Past 1024 padded rows or columns the running scales U, V live in global memory."""
    batch, rows, cols, iters = shape = (1, 3, 1100, 2)
    (launch,) = _count("sinkhorn", shape, False).launches
    matrices, scales = batch * rows * cols * FP32, batch * (rows + cols) * FP32
    assert launch.stored_bytes == matrices + iters * scales  # no per-iteration stats
    assert launch.distinct_stored_bytes == matrices + scales


def test_sinkhorn_forward_with_grad_writes_per_iteration_stats(gpu_model):
    batch, rows, cols, iters = shape = (1, 16, 16, 2)
    forward = _count("sinkhorn", shape, True).launches[0]
    stats = batch * iters * (rows + cols) * FP32
    assert forward.stored_bytes == batch * rows * cols * FP32 + stats


def test_sinkhorn_packed_backward_replays_the_forward(gpu_model):
    """Packed matrices store no stats even for a gradient: the backward reads K and dP once
    and writes dK once."""
    batch, rows, cols, _ = shape = (64, 4, 4, 2)
    forward, backward = _count("sinkhorn", shape, True).launches
    matrices = batch * rows * cols * FP32
    assert forward.stored_bytes == forward.distinct_stored_bytes == matrices
    assert backward.loaded_bytes == backward.distinct_loaded_bytes == 2 * matrices
    assert backward.stored_bytes == matrices


@pytest.mark.parametrize(
    "shape", [(64, 4, 4, 2), (1, 16, 16, 2), (1, 65, 64, 2)], ids=["packed", "one_matrix", "streaming"]
)
def test_sinkhorn_moves_at_most_the_target_bytes(gpu_model, shape):
    """Every tier within 1.3x of the op's minimum bytes forward and 2x forward+backward
    (statistics, the streaming slices' partials and running vectors included)."""
    op = _op(gpu_model, "sinkhorn")
    assert _count("sinkhorn", shape, False).bytes <= 1.3 * op.minimum_bytes(shape, False)
    assert _count("sinkhorn", shape, True).bytes <= 2 * op.minimum_bytes(shape, True)


def test_girl_moves_at_most_the_target_bytes(gpu_model):
    """GIRL's forward reads the features once (within 1.3x of the op's minimum, labels and
    the loss included); the forward+backward stays within 2x: the backward reads the features
    once more and writes each gradient element once, no direction buffer in between."""
    shape = (16, 512, 2)
    op = _op(gpu_model, "girl")
    forward, forward_backward = _count("girl", shape, False), _count("girl", shape, True)
    assert forward.bytes <= 1.3 * op.minimum_bytes(shape, False)
    assert forward_backward.bytes <= 2 * op.minimum_bytes(shape, True)
    gradient = forward_backward.launches[-1]
    assert gradient.stored_bytes == gradient.distinct_stored_bytes == shape[0] * shape[1] * FP32


@pytest.mark.parametrize(
    "name, shape",
    [
        ("dct", (1, 2, 2, 8, 8)),
        ("girl", (12, 16, 2)),
        ("tfam_statistics", (1, 2, 2, 8, 8)),
        ("tfam_combine", (1, 2, 2, 8, 8)),
    ],
)
def test_forward_without_grad_writes_no_more_than_with_grad(gpu_model, name, shape):
    without = _count(name, shape, False).launches
    kernels = {launch.kernel for launch in without}
    # The same kernels lead the forward+backward (the backward's launches follow them).
    with_grad = [launch for launch in _count(name, shape, True).launches if launch.kernel in kernels][: len(without)]
    assert [launch.kernel for launch in without] == [launch.kernel for launch in with_grad]
    assert sum(launch.stored_bytes for launch in without) <= sum(launch.stored_bytes for launch in with_grad)


def test_markdown_with_a_filter_replaces_only_the_matching_ops_rows(gpu_model, tmp_path):
    def block(rows_by_op):
        tables = []
        for header in ("| op, shape | mode | x |", "| op, shape | launch |"):
            rows = [f"| {op} {shape} | {value} |" for op, shape, value in rows_by_op]
            tables.append("\n".join([header, "|---|---|", *rows]))
        return "\n".join(
            [gpu_model.BEGIN_MARKER, "text", "", tables[0], "", "### launches", "", tables[1], gpu_model.END_MARKER]
        )

    path = tmp_path / "model.md"
    old = [("sinkhorn", "8x8", "s1"), ("dct", "8x24", "d1"), ("girl", "B=80", "g1"), ("tfam_combine", "4x24", "t1")]
    path.write_text("prose before\n" + block(old) + "\nprose after\n")
    gpu_model.write_markdown(path, block([("dct", "8x24", "d2"), ("dct", "8x48", "d3")]), "dct")
    expected = [old[0], ("dct", "8x24", "d2"), ("dct", "8x48", "d3"), *old[2:]]
    assert path.read_text() == "prose before\n" + block(expected) + "\nprose after\n"
