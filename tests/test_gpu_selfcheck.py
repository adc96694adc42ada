"""tools/gpu_selfcheck.py: its CPU smoke mode end to end (as CI runs it), and the helpers
that do not need a GPU (bandwidth, byte counting, pytest summaries, the error check, the report)."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import piumr_kernels

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_selfcheck.py"
OPS = ("sinkhorn", "dct", "girl", "tfam_statistics", "tfam_combine")
PART_TITLES = (
    "## 1. Test suite",
    "## 2. Host synchronizations",
    "## 3. PIUmr training step in a CUDA graph",
    "## 4. Correctness against the float64 references",
    "## 5. Timing and bandwidth",
)


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_selfcheck", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


selfcheck = _load_tool()


def _section_of(report: str, title: str) -> str:
    """The text of one `## ` section of the report."""
    start = report.index(title)
    end = report.find("\n## ", start + 1)
    return report[start:] if end < 0 else report[start:end]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The CPU smoke mode, run as CI runs it: (completed process, report text, seconds).
    On the reference backend, so that this tests the tool whether or not the C++ extension
    is built (the kernels have their own tests)."""
    out = tmp_path_factory.mktemp("selfcheck") / "report.md"
    started = time.monotonic()
    completed = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--device",
            "cpu",
            "--dry-run",
            "--quick",
            "--backend",
            "reference",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed, out.read_text(), elapsed


def test_dry_run_finishes_within_a_minute(dry_run):
    _, _, elapsed = dry_run
    assert elapsed < 60, f"the CPU smoke mode took {elapsed:.0f} s"


def test_dry_run_report_has_every_part_and_the_environment(dry_run):
    completed, report, _ = dry_run
    assert report.startswith("# piumr_kernels GPU self-check")
    assert "**Result: PASS**" in report
    for line in (
        "- device: cpu",
        f"- torch: {torch.__version__}",
        "- triton: ",
        "- fused backend: reference",
        "- mode: dry run (tiny shapes), --quick",
    ):
        assert line in report
    positions = [report.index(title) for title in PART_TITLES]
    assert positions == sorted(positions), "the parts must appear in order"
    assert "## Totals" in report
    assert report.strip() in completed.stdout  # the same report is printed


def test_dry_run_skips_the_cuda_only_parts_explicitly(dry_run):
    _, report, _ = dry_run
    assert "skipped: --quick" in _section_of(report, PART_TITLES[0])
    for title in PART_TITLES[1:3] + PART_TITLES[4:]:
        assert "skipped: no CUDA" in _section_of(report, title), title
    assert "the step ran eagerly on cpu" in _section_of(report, PART_TITLES[2])


def test_dry_run_compares_every_op_in_both_dtypes(dry_run):
    _, report, _ = dry_run
    rows = [line for line in _section_of(report, PART_TITLES[3]).splitlines() if line.startswith("| ")][2:]
    seen = {(row.split(" | ")[0].lstrip("| "), row.split(" | ")[2]) for row in rows}
    assert seen == {(op, dtype) for op in OPS for dtype in ("fp32", "bf16")}
    assert all(row.rstrip(" |").endswith("pass") for row in rows), rows
    assert any("groups= details" in row for row in rows)


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    with pytest.raises(SystemExit, match="--device cpu --dry-run"):
        selfcheck.resolve_device("cuda")


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "name, tbps",
    [
        ("NVIDIA H100 80GB HBM3", 3.35),
        ("NVIDIA H100 PCIe", 2.0),
        ("NVIDIA H200", 4.8),
        ("NVIDIA A100-SXM4-80GB", 2.04),
        ("NVIDIA A100-SXM4-40GB", 1.56),
        ("NVIDIA A100-PCIE-40GB", 1.56),
    ],
)
def test_known_peak_bandwidths(name, tbps):
    peak, source = selfcheck.peak_bandwidth(name)
    assert peak == pytest.approx(tbps * 1e12)
    assert f"{tbps} TB/s" in source


def test_unknown_device_peak_comes_from_memory_clock_and_bus_width():
    properties = SimpleNamespace(memory_clock_rate=1_500_000, memory_bus_width=384)  # kHz, bits
    peak, source = selfcheck.peak_bandwidth("Some GPU", properties)
    assert peak == pytest.approx(2 * 1.5e9 * 384 / 8)
    assert "384-bit" in source
    assert selfcheck.peak_bandwidth("Some GPU", SimpleNamespace())[0] is None
    assert selfcheck.peak_bandwidth("Some GPU")[1].startswith("n/a")
    assert selfcheck.peak_bandwidth("NVIDIA GH200 480GB")[0] is None  # not an H200


def test_bandwidth_formatting():
    assert selfcheck.format_bandwidth(2_000_000_000, 1.0) == "2000 GB/s"
    assert selfcheck.format_bandwidth(12_345_000, 1.0) == "12.3 GB/s"
    assert selfcheck.format_fraction_of_peak(2_000_000_000, 1.0, 4e12) == "50%"
    assert selfcheck.format_fraction_of_peak(2_000_000_000, 1.0, None) == "n/a"


def test_stored_bytes_counts_an_expanded_view_once():
    base = torch.zeros(2, 1, 3)
    assert selfcheck.stored_bytes(base) == 24
    assert selfcheck.stored_bytes(base.expand(2, 5, 3)) == 24
    assert selfcheck.stored_bytes(torch.zeros(10, dtype=torch.bfloat16)[:4]) == 8


def test_step_bytes_are_inputs_and_outputs_then_their_gradients():
    inputs = selfcheck.Inputs((torch.rand(3, 4, 5) + 0.1,), (0,))
    run = selfcheck.on_backend(lambda K: (piumr_kernels.sinkhorn(K, 2),), "reference")
    numel_bytes = 3 * 4 * 5 * 4
    assert selfcheck.prepare_step(run, inputs, backward=False).bytes_moved == 2 * numel_bytes
    assert selfcheck.prepare_step(run, inputs, backward=True).bytes_moved == 4 * numel_bytes


def test_benchmark_shapes_are_read_from_the_benchmark_files():
    cases = selfcheck.op_cases(dry_run=False)
    for op, bench in (("sinkhorn", "sinkhorn"), ("dct", "dct"), ("tfam_statistics", "tfam"), ("tfam_combine", "tfam")):
        expected = len(selfcheck.benchmark_constant(f"bench_{bench}.py", "SHAPES"))
        assert sum(case.op == op for case in cases) == expected, op
    girl_shapes = selfcheck.benchmark_constant("bench_girl.py", "SHAPES")
    girl = [case for case in cases if case.op == "girl"]
    assert len(girl) == 2 * len(girl_shapes)  # random pseudo-groups, and groups= with details
    assert sum("groups=" in case.shape for case in girl) == len(girl_shapes)


def test_benchmark_constant_names_the_file_when_missing():
    with pytest.raises(RuntimeError, match="bench_dct.py.*NO_SUCH_NAME"):
        selfcheck.benchmark_constant("bench_dct.py", "NO_SUCH_NAME")


def test_correctness_check_catches_a_wrong_op():
    good = selfcheck.sinkhorn_case(4, 5, 6, 3)

    def off_by_ten_percent_below_float64(K):  # so only the run under test is wrong, not the reference
        return (piumr_kernels.sinkhorn(K, 3) * (1.0 if K.dtype == torch.float64 else 1.1),)

    wrong = selfcheck.OpCase(
        "sinkhorn", "wrong", good.make_inputs, off_by_ten_percent_below_float64, output_names=("P",), input_names=("K",)
    )
    section = selfcheck.check_correctness(
        [good, wrong], torch.device("cpu"), "reference", (torch.float32, torch.bfloat16)
    )
    assert (section.passed, section.failed) == (2, 2)
    assert [row[-1] for row in section.rows] == ["pass", "pass", "**FAIL**", "**FAIL**"]
    assert section.rows[2][3] in ("P", "dK")


def test_timing_rows_with_stubbed_benchmarking(monkeypatch):
    """Part 5's rows, with do_bench and torch.compile stubbed (both need more than this CPU)."""
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, return_mode: (fn(), 0.5)[1])
    monkeypatch.setattr(selfcheck, "compiled", lambda fn: fn)
    cases = [selfcheck.sinkhorn_case(4, 5, 6, 3), selfcheck.sinkhorn_case(2, 3, 3, 1)]
    timings = selfcheck.time_all(cases, torch.device("cpu"), "reference", selfcheck.Deadline(60), reserve_s=0)
    assert [(t.case.shape, t.mode) for t in timings] == [
        ("4x5x6 it3", "fwd"),
        ("4x5x6 it3", "fwd+bwd"),
        ("2x3x3 it1", "fwd"),
        ("2x3x3 it1", "fwd+bwd"),
    ]
    # K, P, dP and dK: 4 x 120 float32 = 1920 bytes in 0.5 ms = 3.84 MB/s, 96% of a 4 MB/s peak
    assert selfcheck.timing_row(timings[1], peak=4e6) == [
        "sinkhorn",
        "4x5x6 it3",
        "fwd+bwd",
        "0.0",
        "0.500 ms (0.00384 GB/s)",
        "96%",
        "0.500 ms (0.00384 GB/s)",
        "0.500 ms (0.00384 GB/s)",
        "1.00x",
        "1.00x",
    ]


def test_compiles_are_skipped_past_the_budget_every_op_first_shape_first(monkeypatch):
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, return_mode: 1.0)
    cases = [
        selfcheck.sinkhorn_case(4, 5, 6, 3),
        selfcheck.sinkhorn_case(2, 3, 3, 1),
        selfcheck.tfam_combine_case((1, 2, 3, 4, 5)),
    ]
    timings = [selfcheck.Timing(case, backward) for case in cases for backward in (False, True)]
    assert [(t.case.shape, t.mode) for t in selfcheck.compile_order(timings)] == [
        ("4x5x6 it3", "fwd"),
        ("4x5x6 it3", "fwd+bwd"),
        ("1x2x3x4x5", "fwd"),
        ("1x2x3x4x5", "fwd+bwd"),
        ("2x3x3 it1", "fwd"),
        ("2x3x3 it1", "fwd+bwd"),
    ]
    timings = selfcheck.time_all(cases, torch.device("cpu"), "reference", selfcheck.Deadline(0), reserve_s=1)
    assert all(t.results["compiled"] == "skipped: time budget" for t in timings)
    assert selfcheck.timing_row(timings[0], peak=None)[5:] == [
        "n/a",
        "1.000 ms (0.00096 GB/s)",
        "skipped: time budget",
        "1.00x",
        "-",
    ]


def test_describe_error_names_the_project_line_and_the_error_it_replaced():
    def failing_op():
        raise ValueError("the cause\nsecond line")

    try:
        try:
            failing_op()
        except ValueError:
            raise RuntimeError("raised while handling it")  # noqa: B904 (the implicit chain is under test)
    except RuntimeError as error:
        text = selfcheck.describe_error(error)
    here = "tests/test_gpu_selfcheck.py"
    assert text.startswith(f"RuntimeError: raised while handling it at {here}:")
    assert f"; while handling ValueError: the cause at {here}:" in text
    assert text.endswith("(failing_op)") and "second line" not in text


def test_project_sources_exclude_a_virtual_environment_in_the_repository():
    assert selfcheck.is_project_source(ROOT / "piumr_kernels" / "girl" / "op.py")
    assert not selfcheck.is_project_source(ROOT / ".venv" / "lib" / "site-packages" / "torch" / "_ops.py")
    assert not selfcheck.is_project_source(Path("/usr/lib/python3/some_module.py"))


def test_scaled_error():
    expected = torch.tensor([1.0, -4.0], dtype=torch.float64)
    assert selfcheck.scaled_error(torch.tensor([1.0, -3.0]), expected) == (1.0, 0.25)
    assert selfcheck.scaled_error(torch.tensor([float("nan"), 0.0]), expected) == (float("inf"), float("inf"))
    zero = torch.zeros(1, dtype=torch.float64)
    assert selfcheck.scaled_error(torch.tensor([1e-9]), zero) == pytest.approx((1e-9, 1e-6))  # floor 1e-3
    assert selfcheck.scaled_error(torch.zeros(0), torch.zeros(0, dtype=torch.float64)) == (0.0, 0.0)


PYTEST_FINISHED = """\
tests/test_a.py::test_one PASSED                                          [ 33%]
tests/test_a.py::test_two[cuda-x] FAILED                                  [ 66%]
tests/test_a.py::test_three SKIPPED (no cpp)                              [100%]
=========================== short test summary info ============================
FAILED tests/test_a.py::test_two[cuda-x] - AssertionError: boom
============= 1 failed, 1 passed, 1 skipped, 2 deselected in 75.20s (0:01:15) =============
"""


def test_pytest_summary_from_the_final_line():
    summary = selfcheck.summarize_pytest_output(PYTEST_FINISHED)
    assert summary.finished
    assert summary.counts == {"failed": 1, "passed": 1, "skipped": 1, "deselected": 2}
    assert summary.failures == ["tests/test_a.py::test_two[cuda-x]"]


def test_pytest_summary_of_a_run_cut_short_counts_the_finished_tests():
    partial = "\n".join(PYTEST_FINISHED.splitlines()[:2])
    summary = selfcheck.summarize_pytest_output(partial)
    assert not summary.finished
    assert summary.counts == {"passed": 1, "failed": 1}


def test_default_pytest_run_puts_the_kernel_tests_first_and_leaves_out_its_own():
    args = selfcheck.default_pytest_args()
    files = [arg for arg in args if arg.startswith("tests/")]
    assert sorted(files) == sorted(
        f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py") if path.name != "test_gpu_selfcheck.py"
    )
    assert files[0] == "tests/test_sinkhorn.py"
    assert files.index("tests/test_tfam_pooling.py") < files.index("tests/test_cmake_build.py")
    assert args[len(files) :] == ["-v", "-m", "not slow", "--maxfail=10", "-p", "no:cacheprovider"]


def test_run_test_suite_reports_counts_failures_and_timeouts(tmp_path):
    (tmp_path / "test_tiny.py").write_text(
        "import time, pytest\n"
        "def test_pass(): pass\n"
        "def test_fail(): assert False\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_skip(): pass\n"
    )
    section = selfcheck.run_test_suite([str(tmp_path), "-v", "-p", "no:cacheprovider"], timeout_s=60)
    assert (section.passed, section.failed, section.skipped) == (1, 1, 1)
    assert any("test_tiny.py::test_fail" in note for note in section.notes)
    assert not any("incomplete" in note for note in section.notes)

    section = selfcheck.run_test_suite([str(tmp_path), "-v", "-x", "-p", "no:cacheprovider"], timeout_s=60)
    assert any("--maxfail limit" in note for note in section.notes)

    (tmp_path / "test_tiny.py").write_text("import time\ndef test_slow(): time.sleep(60)\n")
    section = selfcheck.run_test_suite([str(tmp_path), "-v", "-p", "no:cacheprovider"], timeout_s=5)
    assert any("**incomplete**" in note for note in section.notes)
    assert section.failed == 0


def test_report_rendering_and_exit_status():
    passing = selfcheck.Section("4. Correctness", headers=["op", "note"], rows=[["a|b", "ok"]], passed=1)
    timing = selfcheck.Section("5. Timing and bandwidth", failed=1, gates_exit=False)
    environment = {"device": "test"}
    report = selfcheck.render_report(environment, [passing, timing])
    assert "**Result: PASS**" in report  # a failed timing never fails the run
    assert "| a\\|b | ok |" in report
    assert "fail (informational)" in report
    failing = selfcheck.Section("2. Host synchronizations", failed=1)
    assert "**Result: FAIL**" in selfcheck.render_report(environment, [passing, failing])
    assert selfcheck.overall_failed([passing, failing]) and not selfcheck.overall_failed([passing, timing])
    assert failing.status == "FAIL" and passing.status == "PASS" and selfcheck.Section("x").status == "SKIPPED"
