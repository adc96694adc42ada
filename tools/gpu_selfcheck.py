#!/usr/bin/env python
"""One-command GPU self-check of piumr_kernels and PIUmr (see docs/gpu_selfcheck.md).

    python tools/gpu_selfcheck.py                         # all five parts, budgeted for 5 min
    python tools/gpu_selfcheck.py --quick                 # without the pytest run
    python tools/gpu_selfcheck.py --device cpu --dry-run  # CPU smoke mode for CI (tiny shapes)

Parts (one markdown section each):
  1. the test suite (pytest over tests/; the tests put their tensors on CUDA when it is there);
  2. host synchronizations: one forward+backward of every op at its benchmark shapes under
     `torch.cuda.set_sync_debug_mode("error")`, after a warm-up call;
  3. one PIUmr training step (forward, CE + GIRL, backward, clipping, AdamW) captured in a
     CUDA graph and replayed;
  4. every op against its float64 reference, run on the same device, forward and backward
     with non-uniform upstream gradients, in float32 and bfloat16;
  5. fused (triton) vs eager (reference) vs torch.compile(reference) times from
     `triton.testing.do_bench`, with achieved bandwidth against the device's peak.

"The reference" is the public op on the reference backend (`use_backend("reference")`),
which runs the plain-PyTorch functions of piumr_kernels/<op>/reference.py; going through
the public op keeps this tool independent of those functions' signatures.

The report goes to stdout and to `--out`; the exit status is 1 when a test, a
synchronization check, the graph check or a correctness check failed (timings never fail).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import math
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # models/ and the in-tree piumr_kernels

import torch  # noqa: E402

import piumr_kernels  # noqa: E402

BENCHMARK_DIR = ROOT / "benchmarks"
NUM_CLASSES = 52  # MA-52, as in the benchmarks

# Largest error allowed, as a fraction of the reference tensor's largest magnitude (the
# tests' scaled-error criterion, at their loosest per-dtype setting).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-2}
# Smallest magnitude the errors are measured against, as in the tests (tests/op_harness.py):
# an analytically zero result (e.g. the risk variance of a single group) is not asked for
# relative accuracy on rounding noise.
SCALE_FLOOR = 1e-3
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

# Peak memory bandwidth in TB/s by device name: every listed word must start a word of the
# name (case-insensitive), so "H200" does not match a GH200, whose memory differs.
KNOWN_PEAK_TBPS = [
    (("H100", "PCIE"), 2.0),
    (("H100", "HBM3"), 3.35),  # H100 SXM reports itself as "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 3.35),
    (("H200",), 4.8),
    (("A100", "SXM", "80GB"), 2.04),
    (("A100", "40GB"), 1.56),
]

# Shapes of the CPU smoke mode (--dry-run), one per op, in the benchmark files' layouts.
DRY_RUN_SHAPES = {
    "sinkhorn": [(4, 5, 6, 3)],
    "dct": [(2, 3, 4, 9, 9)],
    "girl": [(16, 8, 2)],
    "tfam": [(2, 3, 4, 5, 6)],
}

# Part 5 starts no torch.compile (seconds each) with less than this left of --budget-s.
COMPILE_RESERVE_S = 15.0

PYTEST_FLAGS = "-v -m 'not slow' --maxfail=10 -p no:cacheprovider"
# Test files run first, so that a run cut short by the time limit has covered the kernels and the model.
FIRST_TEST_FILES = (
    "test_sinkhorn",
    "test_dct",
    "test_girl",
    "test_tfam",
    "test_op_contract",
    "test_no_host_sync",
    "test_devices",
    "test_piumr",
)

# Bytes each op's bandwidth figure counts (s: bytes per element of the main input;
# statistics and scales are float32). Every tensor is counted once, at its stored size.
BYTE_FORMULAS = {
    "sinkhorn": "fwd: K + P = 2·B·N·M·s; fwd+bwd adds dP + dK: 4·B·N·M·s",
    "dct": "fwd: x + E + mean + var = (B·C·T·H·W + B·D·H·W + 2·B·D)·s; fwd+bwd adds dE, dmean, dvar and dx "
    "(B·C·T·H·W·s, or B·H·W·s where the backend returns dx as an expanded view)",
    "girl": "fwd: features B·C·s + labels B·8 + loss; fwd+bwd adds dloss + dfeatures B·C·s "
    "(compute-bound: about B²·C/G multiply-adds, so far below the bandwidth peak by nature)",
    "tfam_statistics": "fwd: x B·C·T·H·W·s + frame_mean, frame_max 2·B·C·T·4 + spatial B·H·W·4; "
    "fwd+bwd adds their three gradients + dx B·C·T·H·W·s",
    "tfam_combine": "fwd: x + out 2·B·C·T·H·W·s + temporal_scale B·T·4 + spatial_scale B·H·W·4; "
    "fwd+bwd adds dout + dx 2·B·C·T·H·W·s + dtemporal_scale + dspatial_scale",
}


# --------------------------------------------------------------------------- results


@dataclass
class Section:
    """One part of the report: a table, free-text notes, and pass/fail/skip counts."""

    title: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    gates_exit: bool = True  # whether a failure here makes the exit status non-zero
    seconds: float = 0.0  # how long the part took

    def count(self, status: str) -> None:
        if status == "pass":
            self.passed += 1
        elif status == "fail":
            self.failed += 1
        else:
            self.skipped += 1

    @property
    def status(self) -> str:
        if self.failed:
            return "FAIL"
        if self.passed:
            return "PASS"
        return "SKIPPED"


class Deadline:
    """The time left of the run's budget, so the optional parts stop before it runs out."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


# --------------------------------------------------------------------------- op cases


@dataclass
class Inputs:
    args: tuple  # positional arguments of the op (tensors)
    grad_index: tuple[int, ...]  # which args get gradients


@dataclass
class OpCase:
    """One op at one shape: how to make its inputs, and the public op returning a tuple."""

    op: str
    shape: str
    make_inputs: Callable[[torch.dtype, torch.device], Inputs]
    call: Callable[..., tuple]
    output_names: tuple[str, ...]
    input_names: tuple[str, ...]
    compare: bool = True  # part 4 (needs the same numbers on every backend: no random partition)
    time: bool = True  # part 5


def benchmark_constant(bench_file: str, name: str):
    """The literal value assigned to `name` at module level in benchmarks/<bench_file>, read
    without importing the benchmark (so its imports cannot break the self-check)."""
    path = BENCHMARK_DIR / bench_file
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{path}: no module-level literal `{name} = ...`; the self-check reads its shapes from there")


def seeded_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sinkhorn_case(batch: int, n: int, m: int, n_iters: int) -> OpCase:
    def make_inputs(dtype, device):
        K = torch.rand(batch, n, m, generator=seeded_generator(), dtype=torch.float64).add_(0.05)
        return Inputs((K.to(device, dtype),), (0,))

    return OpCase(
        "sinkhorn",
        f"{batch}x{n}x{m} it{n_iters}",
        make_inputs,
        call=lambda K: (piumr_kernels.sinkhorn(K, n_iters),),
        output_names=("P",),
        input_names=("K",),
    )


def dct_case(shape: tuple[int, ...], kernel_size: int) -> OpCase:
    def make_inputs(dtype, device):
        return Inputs((video(shape, dtype, device),), (0,))

    return OpCase(
        "dct",
        "x".join(map(str, shape)) + f" k{kernel_size}",
        make_inputs,
        call=lambda x: piumr_kernels.dct_filter_bank(x, kernel_size, return_stats=True),
        output_names=("E", "mean", "var"),
        input_names=("x",),
    )


def girl_features(batch: int, width: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels; few enough classes that every group holds positive pairs (with
    none, the loss and its gradient are exactly zero and a comparison proves nothing)."""
    generator = seeded_generator()
    features = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, min(NUM_CLASSES, max(2, batch // 8)), (batch,), generator=generator)
    return features.to(device, dtype), labels.to(device)


def girl_random_groups_case(batch: int, width: int, num_groups: int) -> OpCase:
    """GIRL as training and the benchmark call it: fresh random pseudo-groups per call."""

    def make_inputs(dtype, device):
        return Inputs(girl_features(batch, width, dtype, device), (0,))

    return OpCase(
        "girl",
        f"B{batch} C{width} G{num_groups}",
        make_inputs,
        call=lambda features, labels: (piumr_kernels.girl_loss(features, labels, num_groups),),
        output_names=("loss",),
        input_names=("features", "labels"),
        compare=False,
    )


def girl_explicit_groups_case(batch: int, width: int, num_groups: int) -> OpCase:
    """GIRL with `groups=` ids and `return_details=True` (subject groups in training)."""

    def make_inputs(dtype, device):
        features, labels = girl_features(batch, width, dtype, device)
        shuffle = torch.randperm(batch, generator=seeded_generator())
        groups = (torch.arange(batch) % num_groups)[shuffle].to(device)
        return Inputs((features, labels, groups), (0,))

    def call(features, labels, groups):
        loss, details = piumr_kernels.girl_loss(features, labels, groups=groups, return_details=True)
        return loss, details["group_risks"], details["risk_var"]

    return OpCase(
        "girl",
        f"B{batch} C{width} G{num_groups} groups= details",
        make_inputs,
        call,
        output_names=("loss", "group_risks", "risk_var"),
        input_names=("features", "labels", "groups"),
        time=False,
    )


def video(shape: tuple[int, ...], dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=seeded_generator(), dtype=torch.float64).to(device, dtype)


def tfam_statistics_case(shape: tuple[int, ...]) -> OpCase:
    return OpCase(
        "tfam_statistics",
        "x".join(map(str, shape)),
        lambda dtype, device: Inputs((video(shape, dtype, device),), (0,)),
        call=piumr_kernels.tfam_statistics,
        output_names=("frame_mean", "frame_max", "spatial"),
        input_names=("x",),
    )


def tfam_combine_case(shape: tuple[int, ...]) -> OpCase:
    batch, _, frames, height, width = shape

    def make_inputs(dtype, device):
        generator = seeded_generator(1)
        temporal = 1 + 0.1 * torch.randn(batch, frames, generator=generator, dtype=torch.float64)
        spatial = 1 + 0.1 * torch.randn(batch, height, width, generator=generator, dtype=torch.float64)
        scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return Inputs(
            (video(shape, dtype, device), temporal.to(device, scale_dtype), spatial.to(device, scale_dtype)), (0, 1, 2)
        )

    return OpCase(
        "tfam_combine",
        "x".join(map(str, shape)),
        make_inputs,
        call=lambda x, t, s: (piumr_kernels.tfam_combine(x, t, s),),
        output_names=("out",),
        input_names=("x", "temporal_scale", "spatial_scale"),
    )


def op_cases(dry_run: bool) -> list[OpCase]:
    """Every op at its benchmark shapes (benchmarks/bench_*.py), or at tiny shapes for --dry-run."""
    if dry_run:
        shapes, kernel_size = DRY_RUN_SHAPES, 7
    else:
        shapes = {
            op: [tuple(s) for s in benchmark_constant(f"bench_{op}.py", "SHAPES")]
            for op in ("sinkhorn", "dct", "girl", "tfam")
        }
        kernel_size = benchmark_constant("bench_dct.py", "KERNEL_SIZE")
    cases = [sinkhorn_case(*shape) for shape in shapes["sinkhorn"]]
    cases += [dct_case(shape, kernel_size) for shape in shapes["dct"]]
    for shape in shapes["girl"]:
        cases += [girl_random_groups_case(*shape), girl_explicit_groups_case(*shape)]
    cases += [tfam_statistics_case(shape) for shape in shapes["tfam"]]
    cases += [tfam_combine_case(shape) for shape in shapes["tfam"]]
    return cases


# --------------------------------------------------------------------------- running an op


def upstream_gradients(outputs: tuple, dtype_of: Callable[[torch.Tensor], torch.dtype]) -> list[torch.Tensor]:
    """Non-uniform gradients (standard normal, seeded) for every output that carries one."""
    generator = torch.Generator().manual_seed(2)
    return [
        torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, dtype_of(out))
        for out in outputs
        if out.requires_grad
    ]


def input_gradients(outputs: tuple, args: tuple, grad_index: tuple[int, ...], upstream: list) -> tuple:
    """Gradients of `args[grad_index]` for `upstream`, one per output that carries a
    gradient (cast to that output's dtype)."""
    differentiable = [out for out in outputs if out.requires_grad]
    grads = [grad.to(out.dtype) for grad, out in zip(upstream, differentiable)]
    return torch.autograd.grad(differentiable, [args[i] for i in grad_index], grads)


def forward_backward(fn: Callable[..., tuple], args: tuple, grad_index: tuple[int, ...], upstream: list) -> tuple:
    """`fn(*args)`, then the gradients of `args[grad_index]` for `upstream`."""
    outputs = fn(*args)
    return outputs, input_gradients(outputs, args, grad_index, upstream)


def with_grad(inputs: Inputs) -> tuple:
    """The args, the differentiable ones detached and requiring grad."""
    return tuple(
        arg.detach().requires_grad_(i in inputs.grad_index) if arg.is_floating_point() else arg
        for i, arg in enumerate(inputs.args)
    )


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies in memory: an expanded view counts its storage, not its numel."""
    return min(tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes())


@dataclass
class Step:
    """A ready-to-time call of one implementation of an op, and the bytes it must move."""

    run: Callable[[], object]
    bytes_moved: int


def prepare_step(fn: Callable[..., tuple], inputs: Inputs, backward: bool) -> Step:
    """A closure running `fn` once (forward, or forward+backward with fixed upstream
    gradients). Building it calls `fn` (once for the forward, twice with the backward: the
    first call gives the outputs' shapes), which is also the warm-up."""
    if not backward:

        def run():
            with torch.no_grad():
                return fn(*inputs.args)

        outputs = run()
        return Step(run, sum(map(stored_bytes, inputs.args)) + sum(map(stored_bytes, outputs)))

    args = with_grad(inputs)
    probe = fn(*args)
    grads = upstream_gradients(probe, lambda out: out.dtype)
    outputs, input_grads = forward_backward(fn, args, inputs.grad_index, grads)
    moved = sum(map(stored_bytes, (*args, *outputs, *grads, *input_grads)))
    return Step(lambda: forward_backward(fn, args, inputs.grad_index, grads), moved)


def on_backend(fn: Callable[..., tuple], backend: str) -> Callable[..., tuple]:
    def run(*args):
        with piumr_kernels.use_backend(backend):
            return fn(*args)

    return run


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def project_location(error: BaseException) -> str:
    """`path:line (function)` of the innermost traceback frame in the project outside this
    tool (where an op synchronized or failed), or "" when there is none."""
    this_tool = Path(__file__).resolve()
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename).resolve()
        if path.is_file() and path != this_tool and is_project_source(path):
            return f"{path.relative_to(ROOT)}:{frame.lineno} ({frame.name})"
    return ""


def is_project_source(path: Path) -> bool:
    """In the repository, but not in an installed package (a virtual environment there)."""
    if not path.is_relative_to(ROOT):
        return False
    parts = path.relative_to(ROOT).parts
    return not parts[0].startswith(".") and "site-packages" not in parts


def describe_error(error: BaseException) -> str:
    """The error's first line and where in the project it was raised; with the error it
    replaced (an exception raised while handling another, e.g. when ending a failed graph
    capture), that one too, as it is usually the cause."""
    location = project_location(error)
    text = first_line(error) + (f" at {location}" if location else "")
    cause = error.__cause__ or error.__context__
    return text if cause is None else f"{text}; while handling {describe_error(cause)}"


# --------------------------------------------------------------------------- part 1: test suite


@dataclass
class PytestSummary:
    counts: dict[str, int]
    failures: list[str]
    finished: bool  # pytest printed its final summary line (did not time out or crash)


_FINAL_LINE = re.compile(r"^=+ (.+) in [\d.]+s.*=+$")
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")
_VERBOSE_RESULT = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_VERBOSE_COUNT_KEY = {
    "PASSED": "passed",
    "FAILED": "failed",
    "ERROR": "error",
    "SKIPPED": "skipped",
    "XFAIL": "xfailed",
    "XPASS": "xpassed",
}


def summarize_pytest_output(text: str) -> PytestSummary:
    """Counts and failing test ids from pytest's output: from its final summary line when it
    got there, else (timed out) from the per-test lines of `-v` printed so far."""
    lines = text.splitlines()
    per_test: dict[str, int] = {}
    failures = []
    for line in lines:
        match = _VERBOSE_RESULT.match(line)
        if match:
            key = _VERBOSE_COUNT_KEY[match.group(2)]
            per_test[key] = per_test.get(key, 0) + 1
            if key in ("failed", "error"):
                failures.append(match.group(1))
    for line in reversed(lines):
        match = _FINAL_LINE.match(line.strip())
        if match:
            counts = {}
            for number, kind in _COUNT.findall(match.group(1)):
                key = "error" if kind.startswith("error") else kind
                counts[key] = int(number)
            return PytestSummary(counts, failures, finished=True)
    return PytestSummary(per_test, failures, finished=False)


def default_pytest_args() -> list[str]:
    """Every tests/test_*.py but this tool's own (CPU) tests, the kernel and model tests
    first, with PYTEST_FLAGS."""
    names = sorted(path.name for path in (ROOT / "tests").glob("test_*.py") if path.name != "test_gpu_selfcheck.py")
    first = sorted(
        (name for name in names if name.startswith(FIRST_TEST_FILES)),
        key=lambda name: next(i for i, prefix in enumerate(FIRST_TEST_FILES) if name.startswith(prefix)),
    )
    ordered = first + [name for name in names if name not in first]
    return [f"tests/{name}" for name in ordered] + shlex.split(PYTEST_FLAGS)


def run_test_suite(pytest_args: list[str], timeout_s: float) -> Section:
    section = Section("1. Test suite")
    command = [sys.executable, "-m", "pytest", *pytest_args]
    section.notes.append(
        f"`{shlex.join(['python', '-m', 'pytest', *pytest_args])}` from the repository root, "
        f"time limit {timeout_s:.0f} s; tests run on CUDA when it is available (tests/conftest.py)"
    )
    started = time.monotonic()
    try:
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        output, return_code = completed.stdout + completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as expired:
        output, return_code = decode(expired.stdout) + decode(expired.stderr), None
    summary = summarize_pytest_output(output)
    elapsed = time.monotonic() - started
    section.headers = ["passed", "failed", "errors", "skipped", "xfailed", "time"]
    section.rows.append(
        [str(summary.counts.get(key, 0)) for key in ("passed", "failed", "error", "skipped", "xfailed")]
        + [f"{elapsed:.0f} s"]
    )
    section.passed = summary.counts.get("passed", 0)
    section.failed = summary.counts.get("failed", 0) + summary.counts.get("error", 0)
    section.skipped = summary.counts.get("skipped", 0)
    if return_code is None:
        section.notes.append(
            f"**incomplete**: stopped after the {timeout_s:.0f} s limit; the counts are the tests "
            "finished by then (raise --pytest-timeout or narrow --pytest-args)"
        )
    elif re.search(r"^!+ stopping after \d+ failures", output, re.MULTILINE):
        section.notes.append("**incomplete**: pytest stopped at its --maxfail limit; the later tests did not run")
    elif not summary.finished:
        section.failed += 1
        section.notes.append(f"**pytest ended without a summary** (exit status {return_code}); last lines:")
        section.notes.append(fenced("\n".join(output.strip().splitlines()[-15:])))
    if summary.failures:
        shown = summary.failures[:20]
        more = f" (and {len(summary.failures) - len(shown)} more)" if len(summary.failures) > len(shown) else ""
        section.notes.append("Failing tests" + more + ":\n" + "\n".join(f"- `{name}`" for name in shown))
    return section


def decode(output: bytes | str | None) -> str:
    """Text of what a timed-out subprocess printed (bytes, even with text=True)."""
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


def skipped_section(title: str, reason: str, gates_exit: bool = True) -> Section:
    return Section(title, notes=[f"skipped: {reason}"], gates_exit=gates_exit)


# --------------------------------------------------------------------------- part 2: host syncs


def check_synchronizations(cases: list[OpCase], device: torch.device, backend: str) -> Section:
    section = Section('2. Host synchronizations (torch.cuda.set_sync_debug_mode("error"))')
    if device.type != "cuda":
        section.notes.append("skipped: no CUDA (sync debug mode is a CUDA feature)")
        return section
    section.notes.append(
        f"One forward+backward per case on the {backend} backend in float32, after a warm-up; "
        "a case fails when any call in it synchronizes with the host."
    )
    section.headers = ["op", "shape", "result"]
    for case in cases:
        status, detail = sync_status(case, device, backend)
        section.count(status)
        section.rows.append([case.op, case.shape, detail])
    return section


def sync_status(case: OpCase, device: torch.device, backend: str) -> tuple[str, str]:
    """("pass" or "fail", what happened) for one forward+backward under sync debug mode."""
    try:
        step = prepare_step(on_backend(case.call, backend), case.make_inputs(torch.float32, device), backward=True)
        torch.cuda.synchronize(device)
    except Exception as error:
        return "fail", f"error before the check: {describe_error(error)}"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step.run()
    except Exception as error:
        if "synchroniz" in str(error):
            return "fail", f"**synchronizes**: {describe_error(error)}"
        return "fail", f"error: {describe_error(error)}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return "pass", "no synchronization"


# --------------------------------------------------------------------------- part 3: training step graph


@dataclass
class TrainingSetup:
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    clip: torch.Tensor  # static input
    labels: torch.Tensor  # static input
    amp_dtype: torch.dtype | None
    description: str


def build_training_setup(device: torch.device, dry_run: bool) -> TrainingSetup:
    """A small PIUmr (TFAM after every stage), CE + GIRL on random pseudo-groups, AdamW and
    the autocast dtype a training run would pick; the clip and labels are static tensors."""
    from models.modelling.piumr import PIUmrLoss, build_piumr
    from models.modelling.x3d import X3DPreset
    from models.training.precision import resolve_amp

    if dry_run:
        preset, batch = X3DPreset("selfcheck-tiny", depth_factor=0.2, num_frames=4, crop_size=32), 4
    else:
        preset, batch = X3DPreset("selfcheck-XS-8f", depth_factor=2.2, num_frames=8, crop_size=112), 8
    torch.manual_seed(0)
    model = build_piumr(preset, NUM_CLASSES).to(device).train()
    criterion = PIUmrLoss(num_groups=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, capturable=device.type == "cuda")
    clip = torch.randn(batch, *preset.clip_shape, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    amp_dtype = resolve_amp("auto", device)
    description = (
        f"PIUmr on X3D depth factor {preset.depth_factor}, batch {batch} x {preset.num_frames}x"
        f"{preset.crop_size}x{preset.crop_size}, CE + GIRL (2 random groups), grad clip 1.0, AdamW"
        f"{' (capturable)' if device.type == 'cuda' else ''}, autocast {amp_dtype or 'off'}"
    )
    return TrainingSetup(model, criterion, optimizer, clip, labels, amp_dtype, description)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """models/training/precision.py's autocast, without the weight-cast cache (not allowed in a CUDA graph)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def training_step(setup: TrainingSetup) -> torch.Tensor:
    """One step as models/training/loop.py composes it, without its host reads (loss.item(), the
    float gradient norm), which a CUDA graph cannot hold: returns the loss tensor."""
    setup.optimizer.zero_grad(set_to_none=False)  # zeroed in place: the gradients keep their memory in a graph
    with autocast(setup.clip.device, setup.amp_dtype):
        logits, features = setup.model(setup.clip)
    loss, _ = setup.criterion(logits.float(), features.float(), setup.labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(setup.model.parameters(), 1.0)
    setup.optimizer.step()
    return loss.detach()


def check_training_step_graph(device: torch.device, backend: str, dry_run: bool) -> Section:
    section = Section("3. PIUmr training step in a CUDA graph")
    try:
        setup = build_training_setup(device, dry_run)
    except Exception as error:
        status, note = "fail", f"**failed to build the model**: {describe_error(error)}"
    else:
        section.notes.append(setup.description + f"; TFAM and GIRL on the {backend} backend.")
        with piumr_kernels.use_backend(backend):
            status, note = graph_status(setup) if device.type == "cuda" else eager_step_status(setup)
    section.count(status)
    section.notes.append(note)
    return section


def graph_status(setup: TrainingSetup) -> tuple[str, str]:
    try:
        detail = capture_and_replay(setup)
    except Exception as error:
        return "fail", f"**capture or replay failed**: {describe_error(error)}"
    return "pass", f"captured and replayed: {detail}"


def eager_step_status(setup: TrainingSetup) -> tuple[str, str]:
    """Without CUDA: the same step, run eagerly twice, to check how it is composed."""
    try:
        losses = [float(training_step(setup)) for _ in range(2)]
    except Exception as error:
        return "fail", f"**the eager training step failed**: {describe_error(error)}"
    return "skip", (
        f"skipped: no CUDA (the step ran eagerly on cpu instead: losses {', '.join(f'{loss:.4f}' for loss in losses)})"
    )


def capture_and_replay(setup: TrainingSetup, replays: int = 5) -> str:
    """Warm up on a side stream, capture one step, replay it on new data in the static
    inputs; raises when the loss is not finite or the weights did not change."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # optimizer state, autotuning, lazy initialization
            training_step(setup)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = training_step(setup)

    batches = [(torch.randn_like(setup.clip), torch.randint_like(setup.labels, NUM_CLASSES)) for _ in range(replays)]
    weights_before = [p.detach().clone() for p in setup.model.parameters()]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    losses = []
    for clip, labels in batches:
        setup.clip.copy_(clip)
        setup.labels.copy_(labels)
        graph.replay()
        losses.append(static_loss.clone())
    end.record()
    torch.cuda.synchronize()
    values = torch.stack(losses).tolist()
    if not all(math.isfinite(value) for value in values):
        raise RuntimeError(f"non-finite loss in a replay: {values}")
    changed = any(not torch.equal(before, after) for before, after in zip(weights_before, setup.model.parameters()))
    if not changed:
        raise RuntimeError("the replays did not change any weight (the optimizer step was not captured)")
    return (
        f"{replays} replays, {start.elapsed_time(end) / replays:.2f} ms per step, losses "
        f"{', '.join(f'{value:.4f}' for value in values)}, weights updated"
    )


# --------------------------------------------------------------------------- part 4: correctness


@dataclass
class Comparison:
    worst_tensor: str  # the output or input gradient with the largest relative error
    max_abs: float  # its max |got - expected|
    max_rel: float  # its max |got - expected| / max |expected|


def scaled_error(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max absolute error, that error relative to the reference's largest magnitude, at
    least SCALE_FLOOR); NaN or inf anywhere in the difference counts as an infinite error."""
    if expected.numel() == 0:
        return 0.0, 0.0
    max_abs = float((got.double() - expected).abs().max())
    if not math.isfinite(max_abs):
        return math.inf, math.inf
    return max_abs, max_abs / max(float(expected.abs().max()), SCALE_FLOOR)


def compare_with_reference(case: OpCase, dtype: torch.dtype, device: torch.device, backend: str) -> Comparison:
    """The public op in `dtype` on `backend` vs the same op on the reference backend in
    float64 on the same device: outputs and input gradients, for the same non-uniform
    upstream gradients."""
    inputs = case.make_inputs(dtype, device)
    args = with_grad(inputs)
    reference_args = with_grad(
        Inputs(tuple(a.double() if a.is_floating_point() else a for a in inputs.args), inputs.grad_index)
    )
    with piumr_kernels.use_backend("reference"):
        expected_outputs = case.call(*reference_args)
        upstream = upstream_gradients(expected_outputs, lambda out: torch.float64)
        expected_grads = input_gradients(expected_outputs, reference_args, inputs.grad_index, upstream)
    with piumr_kernels.use_backend(backend):
        outputs = case.call(*args)
        grads = input_gradients(outputs, args, inputs.grad_index, upstream)
    names = list(case.output_names) + [f"d{case.input_names[i]}" for i in inputs.grad_index]
    pairs = list(zip(outputs, expected_outputs)) + list(zip(grads, expected_grads))
    errors = [scaled_error(got.detach(), expected.detach()) for got, expected in pairs]
    worst = max(range(len(errors)), key=lambda k: errors[k][1])
    return Comparison(names[worst], *errors[worst])


def check_correctness(
    cases: list[OpCase], device: torch.device, backend: str, dtypes: tuple[torch.dtype, ...]
) -> Section:
    section = Section("4. Correctness against the float64 references")
    section.notes.append(
        f"The public op on the {backend} backend vs the same op on the reference backend (the functions of "
        f"piumr_kernels/<op>/reference.py) in float64 on {device.type}, on the same (rounded) inputs; outputs "
        "and input gradients, with standard normal upstream gradients. rel = max |error| / "
        f"max(max |reference|, {SCALE_FLOOR:g}) of the worst tensor; tolerance: "
        + ", ".join(f"{DTYPE_NAMES[d]} {TOLERANCE[d]:g}" for d in dtypes)
        + ". GIRL is compared with `groups=` (the random pseudo-groups are not reproducible across backends)."
    )
    section.headers = ["op", "shape", "dtype", "worst tensor", "max abs err", "max rel err", "tolerance", "result"]
    for case in (c for c in cases if c.compare):
        for dtype in dtypes:
            status, row = correctness_row(case, dtype, device, backend)
            section.count(status)
            section.rows.append(row)
    return section


def correctness_row(case: OpCase, dtype: torch.dtype, device: torch.device, backend: str) -> tuple[str, list[str]]:
    """("pass" or "fail", the table row) of one case in one dtype."""
    label = [case.op, case.shape, DTYPE_NAMES[dtype]]
    tolerance = TOLERANCE[dtype]
    try:
        comparison = compare_with_reference(case, dtype, device, backend)
    except Exception as error:
        return "fail", label + ["-", "-", "-", f"{tolerance:g}", f"**error**: {describe_error(error)}"]
    passed = comparison.max_rel <= tolerance
    return ("pass" if passed else "fail"), label + [
        comparison.worst_tensor,
        f"{comparison.max_abs:.2e}",
        f"{comparison.max_rel:.2e}",
        f"{tolerance:g}",
        "pass" if passed else "**FAIL**",
    ]


# --------------------------------------------------------------------------- part 5: timing


def peak_bandwidth(name: str, properties: object | None = None) -> tuple[float | None, str]:
    """(peak memory bandwidth in bytes/s or None, where it came from) for a device name;
    unknown names fall back to the memory clock and bus width the driver reports."""
    upper = name.upper()
    for words, tbps in KNOWN_PEAK_TBPS:
        if all(re.search(rf"(?<![A-Z0-9]){word}", upper) for word in words):
            return tbps * 1e12, f"{tbps} TB/s (known peak of {' '.join(words)})"
    clock_khz = getattr(properties, "memory_clock_rate", None)
    bus_bits = getattr(properties, "memory_bus_width", None)
    if clock_khz and bus_bits:
        peak = 2 * clock_khz * 1e3 * bus_bits / 8  # double data rate
        return peak, f"{peak / 1e12:.2f} TB/s (2 x memory clock {clock_khz / 1e6:.2f} GHz x {bus_bits}-bit bus)"
    return None, "n/a (unknown device, and the driver reports no memory clock or bus width)"


def format_bandwidth(bytes_moved: int, milliseconds: float) -> str:
    gigabytes_per_s = bytes_moved / (milliseconds * 1e-3) / 1e9
    return f"{gigabytes_per_s:.0f} GB/s" if gigabytes_per_s >= 100 else f"{gigabytes_per_s:.3g} GB/s"


def format_fraction_of_peak(bytes_moved: int, milliseconds: float, peak: float | None) -> str:
    if peak is None:
        return "n/a"
    return f"{100 * bytes_moved / (milliseconds * 1e-3) / peak:.0f}%"


@dataclass
class Timing:
    """One (case, mode) row of part 5: bytes moved and each implementation's median ms,
    or the text of why it has none."""

    case: OpCase
    backward: bool
    bytes_moved: int = 0
    results: dict[str, float | str] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"


def bench(fn: Callable[..., tuple], inputs: Inputs, backward: bool) -> tuple[int, float | str]:
    """(bytes moved, median ms from do_bench), or (0, the error) when `fn` fails."""
    from triton.testing import do_bench

    try:
        step = prepare_step(fn, inputs, backward)
        return step.bytes_moved, do_bench(step.run, return_mode="median")
    except Exception as error:
        return 0, f"error: {describe_error(error)}"


def compiled(fn: Callable) -> Callable:
    torch._dynamo.reset()  # each case compiles afresh: no recompile limit across shapes
    return torch.compile(fn, dynamic=False)


def compile_order(timings: list[Timing]) -> list[Timing]:
    """Every op's first shape before any op's second one, so that a short time budget still
    compiles each op at least once."""
    shapes_seen: dict[tuple[str, bool], int] = {}
    position = []
    for timing in timings:
        key = (timing.case.op, timing.backward)
        position.append(shapes_seen.get(key, 0))
        shapes_seen[key] = position[-1] + 1
    return [timing for _, timing in sorted(zip(position, timings), key=lambda pair: pair[0])]


def time_all(
    cases: list[OpCase], device: torch.device, backend: str, deadline: Deadline, reserve_s: float
) -> list[Timing]:
    """fused and eager for every case and mode (cheap), then torch.compile(eager) for as
    many as the time budget allows (each compiles for seconds)."""
    timings = [Timing(case, backward) for case in cases if case.time for backward in (False, True)]
    for timing in timings:
        inputs = timing.case.make_inputs(torch.float32, device)
        timing.bytes_moved, timing.results["fused"] = bench(
            on_backend(timing.case.call, backend), inputs, timing.backward
        )
        _, timing.results["eager"] = bench(on_backend(timing.case.call, "reference"), inputs, timing.backward)
    for timing in compile_order(timings):
        if deadline.left() < reserve_s:
            timing.results["compiled"] = "skipped: time budget"
            continue
        inputs = timing.case.make_inputs(torch.float32, device)
        _, timing.results["compiled"] = bench(
            on_backend(compiled(timing.case.call), "reference"), inputs, timing.backward
        )
    return timings


def timing_cell(result: str | float, bytes_moved: int) -> str:
    if isinstance(result, str):
        return result
    return f"{result:.3f} ms ({format_bandwidth(bytes_moved, result)})"


def speedup(result: str | float, fused_ms: float | str) -> str:
    both_timed = isinstance(result, float) and isinstance(fused_ms, float)
    return f"{result / fused_ms:.2f}x" if both_timed else "-"


def timing_row(timing: Timing, peak: float | None) -> list[str]:
    fused_ms = timing.results["fused"]
    share = format_fraction_of_peak(timing.bytes_moved, fused_ms, peak) if isinstance(fused_ms, float) else "-"
    return [
        timing.case.op,
        timing.case.shape,
        timing.mode,
        f"{timing.bytes_moved / 1e6:.1f}",
        timing_cell(fused_ms, timing.bytes_moved),
        share,
        timing_cell(timing.results["eager"], timing.bytes_moved),
        timing_cell(timing.results["compiled"], timing.bytes_moved),
        speedup(timing.results["eager"], fused_ms),
        speedup(timing.results["compiled"], fused_ms),
    ]


def measure_timings(
    cases: list[OpCase], device: torch.device, backend: str, deadline: Deadline, reserve_s: float
) -> Section:
    section = Section("5. Timing and bandwidth", gates_exit=False)
    if device.type != "cuda":
        section.notes.append("skipped: no CUDA (triton.testing.do_bench times CUDA kernels)")
        return section
    properties = torch.cuda.get_device_properties(device)
    peak, source = peak_bandwidth(properties.name, properties)
    section.notes.append(
        f"Median of `triton.testing.do_bench` (L2 flushed between runs), float32. fused: the public op on the "
        f"{backend} backend; eager: the public op on the reference backend; compiled: `torch.compile` "
        f"(dynamic=False) of the public op on the reference backend, for as many cases as the time budget "
        f"allows. GB/s = bytes / time; peak: {source}. Speedups are eager/fused and compiled/fused time."
    )
    section.notes.append(
        "Bytes counted (inputs read once + outputs written once):\n"
        + "\n".join(f"- {op}: {text}" for op, text in BYTE_FORMULAS.items())
    )
    section.headers = [
        "op",
        "shape",
        "mode",
        "MB",
        "fused",
        "% of peak",
        "eager",
        "compiled",
        "vs eager",
        "vs compiled",
    ]
    for timing in time_all(cases, device, backend, deadline, reserve_s):
        section.count("fail" if isinstance(timing.results["fused"], str) else "pass")
        section.rows.append(timing_row(timing, peak))
    return section


# --------------------------------------------------------------------------- report


def fenced(text: str) -> str:
    return f"```\n{text}\n```"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers))] + [line(row) for row in rows])


def overall_failed(sections: list[Section]) -> bool:
    return any(section.failed and section.gates_exit for section in sections)


def render_report(environment: dict[str, str], sections: list[Section]) -> str:
    """The whole report: environment, totals, then one section per part in part order."""
    failed = overall_failed(sections)
    parts = ["# piumr_kernels GPU self-check", "", f"**Result: {'FAIL' if failed else 'PASS'}**", ""]
    parts += [f"- {key}: {value}" for key, value in environment.items()]
    parts += [
        "",
        "## Totals",
        "",
        markdown_table(
            ["part", "status", "passed", "failed", "skipped", "time"],
            [
                [
                    s.title,
                    s.status if s.gates_exit else s.status.lower() + " (informational)",
                    s.passed,
                    s.failed,
                    s.skipped,
                    f"{s.seconds:.0f} s",
                ]
                for s in sections
            ],
        ),
        "",
    ]
    for section in sections:
        parts += [f"## {section.title}", ""]
        for note in section.notes:
            parts += [note, ""]
        if section.rows:
            parts += [markdown_table(section.headers, section.rows), ""]
    return "\n".join(parts)


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def describe_environment(device: torch.device, backend: str, args: argparse.Namespace, elapsed_s: float) -> dict:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        memory_gib = properties.total_memory / 2**30
        device_text = f"{properties.name} ({memory_gib:.0f} GiB, sm_{properties.major}{properties.minor})"
    else:
        device_text = "cpu"
    mode = ["dry run (tiny shapes)" if args.dry_run else "benchmark shapes"]
    mode += [flag for flag, on in (("--quick", args.quick), ("--skip-timing", args.skip_timing)) if on]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_text,
        "fused backend": backend,
        "mode": ", ".join(mode),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU-only build'})",
        "triton": triton_version(),
        "piumr_kernels": piumr_kernels.__version__,
        "elapsed": f"{elapsed_s:.0f} s",
    }


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_selfcheck.md", help="report file (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="skip part 1 (the pytest run)")
    parser.add_argument("--skip-timing", action="store_true", help="skip part 5 (timings)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default: %(default)s")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes instead of the benchmark shapes (with --device cpu: the CI smoke mode)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "reference", "cpp", "triton"),
        default="auto",
        help="the fused backend under test; auto: triton on CUDA, else cpp when built, else reference",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=285.0,
        help="time budget of the whole run in seconds: part 1 gets at most what is left of it, "
        f"and part 5 starts no torch.compile within {COMPILE_RESERVE_S:.0f} s of its end "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--pytest-timeout", type=float, default=150.0, help="time limit of part 1 in seconds (default: %(default)s)"
    )
    parser.add_argument(
        "--pytest-args",
        default=None,
        help=f"pytest arguments (default: every tests/test_*.py but the self-check's own, the kernel "
        f"and model tests first, with {PYTEST_FLAGS})",
    )
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_selfcheck: no CUDA device is available; for the CPU smoke mode run "
            "`python tools/gpu_selfcheck.py --device cpu --dry-run`"
        )
    return torch.device(name)


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "triton"
    return "cpp" if piumr_kernels.info()["backends"]["cpp"]["available"] else "reference"


def timed(name: str, part: Callable[[], Section]) -> Section:
    """Run one part, saying so on stderr (the run takes minutes), and record its duration."""
    print(f"gpu_selfcheck: {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    section = part()
    section.seconds = time.monotonic() - started
    return section


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = Deadline(args.budget_s)
    device = resolve_device(args.device)
    backend = resolve_backend(args.backend, device)
    cases = op_cases(args.dry_run)

    if args.quick:
        tests = skipped_section("1. Test suite", "--quick")
    else:
        pytest_timeout = min(args.pytest_timeout, deadline.left())
        pytest_args = default_pytest_args() if args.pytest_args is None else shlex.split(args.pytest_args)
        tests = timed("1. test suite", lambda: run_test_suite(pytest_args, pytest_timeout))
    correctness = timed(
        "4. correctness", lambda: check_correctness(cases, device, backend, (torch.float32, torch.bfloat16))
    )
    synchronizations = timed("2. host synchronizations", lambda: check_synchronizations(cases, device, backend))
    # After parts 2 and 4: a failed capture can leave the device unusable for later work.
    graph = timed("3. training step graph", lambda: check_training_step_graph(device, backend, args.dry_run))
    if args.skip_timing:
        timings = skipped_section("5. Timing and bandwidth", "--skip-timing", gates_exit=False)
    else:
        timings = timed("5. timing", lambda: measure_timings(cases, device, backend, deadline, COMPILE_RESERVE_S))

    sections = [tests, synchronizations, graph, correctness, timings]
    report = render_report(describe_environment(device, backend, args, time.monotonic() - started), sections)
    Path(args.out).write_text(report)
    print(report)
    print(f"\nreport written to {args.out}")
    return 1 if overall_failed(sections) else 0


if __name__ == "__main__":
    sys.exit(main())
