"""No op reads device memory on the host: every op's forward and backward, every argument
combination, runs under `no_host_sync()`, which fails on any device-to-host read made by
piumr_kernels' own Python code.

The guard patches, for the duration of the call, `torch.Tensor.item`, `.tolist`, `.cpu`,
`.numpy`, `__bool__`, `__int__`, `__float__`, `__index__` and `torch.cuda.synchronize`, and
runs a TorchDispatchMode that sees the dispatcher-level reads Python patches cannot (the
scalar read `aten._local_scalar_dense` behind them all, and ops whose output size depends on
the data: `torch.unique`, `nonzero`, boolean masks, `repeat_interleave` without
`output_size`, ...). A read is flagged when the Python frame making it is in piumr_kernels/
and is not a `@triton.jit` kernel body (or helper) run by Triton's interpreter (a jit
function's name with Triton's frames among its callers): without a GPU, the interpreter
itself copies tensors to NumPy to run kernels, from its own frames, which is not the op's
doing. On CPU tensors these reads cost nothing, but the same Python code syncs the stream
on a GPU, so they are caught here on every backend (triton through its interpreter, cpp,
reference).

The negative controls prove the guard fires: a helper compiled with a piumr_kernels file
name (and a real op path with such a helper patched in) that reads a value must be flagged
with its file and line; the same read from test code must not.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import op_harness as H
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import piumr_kernels
from piumr_kernels import backends

PACKAGE_DIR = os.path.dirname(os.path.abspath(piumr_kernels.__file__)) + os.sep
TRITON_DIR = None
try:
    import triton

    TRITON_DIR = os.path.dirname(os.path.abspath(triton.__file__)) + os.sep
except ImportError:  # pragma: no cover - triton cases are skipped then
    pass

PATCHED_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _in_package(filename: str) -> bool:
    return os.path.abspath(filename).startswith(PACKAGE_DIR)


def _jit_function_names() -> set[str]:
    """Names of the @triton.jit functions (kernels and helpers) defined in piumr_kernels."""
    import importlib
    import types

    names = set()
    for package in ("sinkhorn_knopp", "dct", "girl", "tfam_pooling"):
        try:
            module = importlib.import_module(f"piumr_kernels.{package}.triton_kernels")
        except ImportError:
            continue
        for value in vars(module).values():
            fn = getattr(value, "fn", None)
            while fn is not None and not isinstance(fn, types.FunctionType):
                fn = getattr(fn, "fn", None)  # an autotuner around a jit function
            if fn is not None:
                names.add(fn.__name__)
    return names


JIT_NAMES = _jit_function_names() if TRITON_DIR else set()


def _run_by_triton(frame) -> bool:
    """Whether `frame` is a @triton.jit function body executed by Triton's interpreter: a
    jit function's name, with Triton's frames among its callers (a launcher, or a grid or
    hook callback in piumr_kernels' host code, is not exempt)."""
    if TRITON_DIR is None or frame.f_code.co_name not in JIT_NAMES:
        return False
    caller = frame.f_back
    while caller is not None:
        if os.path.abspath(caller.f_code.co_filename).startswith(TRITON_DIR):
            return True
        caller = caller.f_back
    return False


def _op_frame(frame):
    """The first frame, from `frame` outward, that is not PyTorch's own code: the code that
    asked for the read (None when it is not piumr_kernels' host code)."""
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(torch_dir):
        frame = frame.f_back
    if frame is None or not _in_package(frame.f_code.co_filename) or _run_by_triton(frame):
        return None
    return frame


def _where(frame) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


class _SyncingOps(TorchDispatchMode):
    """Flags dispatcher-level host reads whose nearest non-PyTorch caller is piumr_kernels."""

    def __init__(self, guard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.aten.repeat_interleave:
            syncing = kwargs.get("output_size") is None  # with output_size it needs no read
        elif func is torch.ops.aten.index.Tensor:
            # Tagged dynamic for boolean masks only; integer indices need no read.
            syncing = any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        else:
            syncing = func is torch.ops.aten._local_scalar_dense.default or torch.Tag.dynamic_output_shape in func.tags
        if syncing:
            self.guard.check(sys._getframe(1), f"{func}")
        return func(*args, **kwargs)


class no_host_sync(contextlib.ContextDecorator):
    """Raises AssertionError, naming the call site, on a device-to-host read made by
    piumr_kernels' Python code while active. `flagged` lists what was seen (also when the
    error was swallowed by the op)."""

    def __init__(self):
        self.flagged: list[str] = []
        self._thread = threading.get_ident()

    def check(self, frame, what: str) -> None:
        if threading.get_ident() != self._thread:
            return
        site = _op_frame(frame)
        if site is not None:
            message = f"host sync: {what} at {_where(site)}"
            self.flagged.append(message)
            raise AssertionError(message)

    def _wrap(self, name, original):
        guard = self

        def patched(*args, **kwargs):
            guard.check(sys._getframe(1), f"Tensor.{name}" if name != "synchronize" else "torch.cuda.synchronize")
            return original(*args, **kwargs)

        patched.__name__ = getattr(original, "__name__", name)
        return patched

    def __enter__(self):
        # (own attribute of torch.Tensor or None when inherited from TensorBase)
        self._saved = {name: torch.Tensor.__dict__.get(name) for name in PATCHED_METHODS}
        for name in PATCHED_METHODS:
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        self._synchronize = torch.cuda.synchronize
        torch.cuda.synchronize = self._wrap("synchronize", self._synchronize)
        self._mode = _SyncingOps(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info):
        self._mode.__exit__(*exc_info)
        torch.cuda.synchronize = self._synchronize
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        return False


def _run_guarded(case, backend):
    inputs = case.inputs(torch.float32)
    with backends.use_backend(backend), no_host_sync() as guard:
        H.run_case(case, inputs)
    assert not guard.flagged, guard.flagged


# Every argument combination once: Sinkhorn's three tiers in both domains; GIRL's random
# groups with a generator, without one (global RNG), explicit groups= with return_details;
# DCT with and without return_stats, with and without a frequency subset; both TFAM passes.
SYNC_CASE_NAMES = [
    *(
        f"sinkhorn-{shape}-{domain}"
        for shape in ("packed-9x4x4", "one-matrix-3x16x16", "streaming-1x65x64")
        for domain in ("linear", "log")
    ),
    "girl_loss-random-groups-12x8-G3",
    "girl_loss-global-rng-details-20x8-G3",
    "girl_loss-explicit-groups-details-10x5",
    "dct_filter_bank-stats-subset-1x3x4x9x11",
    "dct_filter_bank-E-only-subset-1x2x2x4x4",
    "dct_filter_bank-k3-full-1x1x1x1x1",
    "dct_filter_bank-k3-E-only-full-1x2x1x3x3",
    "tfam_statistics-2x5x4x6x7",
    "tfam_combine-2x5x4x6x7",
]
SYNC_CASES = [next(case for case in H.CASES if case.name == name) for name in SYNC_CASE_NAMES]


def _params(backend_names):
    params = []
    for case in SYNC_CASES:
        dtype = torch.float32 if torch.float32 in case.dtypes else case.dtypes[0]
        for backend in backend_names:
            reason = H.backend_skip_reason(backend, dtype)
            if not reason and backend == "triton" and not case.triton:
                reason = "cpp-path shape: kept off the slow triton interpreter"
            params.append(
                pytest.param(
                    case,
                    backend,
                    marks=[pytest.mark.skip(reason=reason)] if reason else [],
                    id=f"{case.name}-{backend}",
                )
            )
    return params


@pytest.mark.parametrize("case,backend", _params(("triton", "cpp")))
def test_fused_forward_backward_do_not_sync(case, backend):
    _run_guarded(case, backend)


@pytest.mark.parametrize("case,backend", _params(("reference",)))
def test_reference_backend_does_not_sync(case, backend):
    """The public functions' own Python (checks, partitions) on the reference backend."""
    _run_guarded(case, backend)


def test_girl_without_generator_does_not_sync():
    """GIRL's default partition (global RNG, no generator) on every runnable backend."""
    features = torch.randn(12, 6).requires_grad_()
    labels = torch.randint(0, 3, (12,))
    for backend in H.BACKENDS:
        if H.backend_skip_reason(backend, torch.float32):
            continue
        with backends.use_backend(backend), no_host_sync():
            piumr_kernels.girl_loss(features, labels, num_groups=3).backward()


# ----------------------------------------------------------------------------- negative controls


def _package_helper(source: str, name: str):
    """A function whose code is attributed to a file in piumr_kernels/ (as if it were there)."""
    namespace = {"torch": torch}
    exec(compile(source, os.path.join(PACKAGE_DIR, "sinkhorn_knopp", "op.py"), "exec"), namespace)
    return namespace[name]


READS = {
    "item": "t.sum().item()",
    "tolist": "t.tolist()",
    "numpy": "t.numpy()",
    "cpu": "t.cpu()",
    "bool": "bool(t.sum() > 0)",
    "if": "1 if (t.sum() > 0) else 0",
    "int": "int(t.sum())",
    "float": "float(t.sum())",
    "index": "[0, 1, 2][t.long().sum().clamp(0, 2)]",
    "unique": "torch.unique(t)",
    "nonzero": "torch.nonzero(t)",
    "mask": "t[t > 0]",
    "repeat_interleave": "torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))",
    "cuda_synchronize": "torch.cuda.synchronize()",
}


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
def test_guard_flags_reads_from_package_code(read):
    probe = _package_helper(f"def probe(t):\n    return {read}\n", "probe")
    with pytest.raises(AssertionError, match=r"host sync: .* at .*piumr_kernels.*op\.py:2 in probe"):
        with no_host_sync():
            probe(torch.rand(3))


@pytest.mark.parametrize(
    "read", [r for k, r in READS.items() if k != "cuda_synchronize"], ids=[k for k in READS if k != "cuda_synchronize"]
)
def test_guard_ignores_reads_from_other_code(read):
    namespace = {"torch": torch}
    exec(compile(f"def probe(t):\n    return {read}\n", __file__, "exec"), namespace)
    with no_host_sync() as guard:
        namespace["probe"](torch.rand(3))
    assert not guard.flagged


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_guard_flags_a_sync_inside_a_real_op(backend, monkeypatch):
    """A read patched into the real Sinkhorn path (its argument check) is caught through the
    public function, on every backend."""
    reason = H.backend_skip_reason(backend, torch.float32)
    if reason:
        pytest.skip(reason)
    from piumr_kernels.sinkhorn_knopp import op as sinkhorn_op

    original = sinkhorn_op.check_float_tensor
    checked = _package_helper(
        "def check_float_tensor(name, value, **kwargs):\n"
        "    if value.sum() > 0:\n"
        "        original(name, value, **kwargs)\n",
        "check_float_tensor",
    )
    checked.__globals__["original"] = original
    monkeypatch.setattr(sinkhorn_op, "check_float_tensor", checked)
    with backends.use_backend(backend):
        with pytest.raises(AssertionError, match=r"host sync: Tensor.__bool__ at .*op\.py:2"):
            with no_host_sync():
                piumr_kernels.sinkhorn(torch.rand(3, 4, 4))


def test_guard_restores_everything():
    before = {name: getattr(torch.Tensor, name) for name in PATCHED_METHODS}
    synchronize = torch.cuda.synchronize
    with pytest.raises(AssertionError), no_host_sync():
        _package_helper("def probe(t):\n    return t.item()\n", "probe")(torch.ones(()))
    assert {name: getattr(torch.Tensor, name) for name in PATCHED_METHODS} == before
    assert torch.cuda.synchronize is synchronize
    assert torch.ones(()).item() == 1.0
