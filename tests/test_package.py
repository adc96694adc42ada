"""The package around the ops: which C++ build loads and when one is compiled (without
compiling: the compile step is replaced), setup.py without torch, info()'s summary, and
Dynamo tracing the ops without warnings from the package's own code."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import piumr_kernels
from piumr_kernels import _extension, backends

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A fake checkout: a package directory with no ahead-of-time build, a csrc/ with two
    files, and the JIT build root in tmp_path. Compiling and loading are recorded, not done."""
    package, sources = tmp_path / "piumr_kernels", tmp_path / "csrc"
    package.mkdir()
    sources.mkdir()
    (sources / "op.cpp").write_text("int op() { return 1; }\n")
    (sources / "op.h").write_text("int op();\n")
    monkeypatch.setattr(_extension, "PACKAGE_DIR", package)
    monkeypatch.setattr(_extension, "SOURCE_DIR", sources)
    monkeypatch.setenv(_extension.ENV_BUILD_DIR, str(tmp_path / "jit"))
    calls = {"compile": [], "load_library": []}

    def fake_compile(directory, digest):
        calls["compile"].append(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "_C.so").write_bytes(b"")
        (directory / "sources.sha256").write_text(digest)

    monkeypatch.setattr(_extension, "_compile", fake_compile)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: calls["load_library"].append(Path(path)))
    return sources, calls


def test_digest_follows_source_content_not_timestamps(checkout):
    sources, _ = checkout
    digest = _extension.source_digest(sources)
    os.utime(sources / "op.cpp", (1, 1))
    assert _extension.source_digest(sources) == digest
    (sources / "op.h").write_text("int op(int);\n")  # a header counts too
    assert _extension.source_digest(sources) != digest


def test_build_directory_is_keyed_by_python_torch_compiler_and_flags(checkout, monkeypatch, tmp_path):
    directory = _extension.build_directory()
    assert directory.parent == tmp_path / "jit"
    assert sys.implementation.cache_tag in directory.name and torch.__version__ in directory.name
    monkeypatch.setenv("CXX", "clang++")
    assert _extension.build_directory() != directory
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(_extension, "CXX_FLAGS", _extension.CXX_FLAGS + ["-DEXTRA"])
    assert _extension.build_directory() != directory


def test_first_import_compiles_then_the_cached_build_loads_without_compiling(checkout):
    _, calls = checkout
    library, kind, reason = _extension.load()
    assert (kind, reason) == ("just-in-time", "") and len(calls["compile"]) == 1
    assert library == calls["compile"][0] / "_C.so"
    assert _extension.load() == (library, "just-in-time", "")
    assert len(calls["compile"]) == 1 and calls["load_library"] == [library]


def test_changed_sources_rebuild_in_the_same_directory(checkout):
    sources, calls = checkout
    _extension.load()
    (sources / "op.cpp").write_text("int op() { return 2; }\n")
    _extension.load()
    assert len(calls["compile"]) == 2 and calls["compile"][0] == calls["compile"][1]  # incremental


def test_a_failed_build_is_not_retried_until_the_sources_change(checkout, monkeypatch):
    sources, calls = checkout
    directory = _extension.build_directory()
    directory.mkdir(parents=True)
    (directory / "failed.sha256").write_text(_extension.source_digest(sources))
    library, _, reason = _extension.load()
    assert library is None and not calls["compile"]
    assert "build.log" in reason and "failed.sha256" in reason
    (sources / "op.cpp").write_text("int op() { return 3; }\n")
    assert _extension.load()[0] is not None and len(calls["compile"]) == 1


def test_a_current_ahead_of_time_build_is_preferred(checkout, monkeypatch):
    sources, calls = checkout
    library = _extension.PACKAGE_DIR / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"")
    monkeypatch.setattr(_extension, "aot_library", lambda: library)
    imported = []
    monkeypatch.setattr(_extension.importlib, "import_module", imported.append)
    os.utime(sources / "op.cpp", (1000, 1000))
    os.utime(sources / "op.h", (1000, 1000))
    os.utime(library, (2000, 2000))
    assert _extension.load() == (library, "ahead-of-time", "")
    assert imported == ["piumr_kernels._C"] and not calls["compile"]


def test_a_stale_ahead_of_time_build_gives_way_to_the_jit_build(checkout, monkeypatch, capsys):
    sources, calls = checkout
    library = _extension.PACKAGE_DIR / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"")
    monkeypatch.setattr(_extension, "aot_library", lambda: library)
    monkeypatch.setattr(_extension.importlib, "import_module", pytest.fail)
    os.utime(library, (1000, 1000))
    os.utime(sources / "op.cpp", (2000, 2000))
    assert _extension.load()[1] == "just-in-time" and len(calls["compile"]) == 1
    assert "older than csrc/" in capsys.readouterr().err


def test_an_install_without_sources_says_how_to_get_the_cpp_backend(checkout, monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "SOURCE_DIR", tmp_path / "missing")
    library, _, reason = _extension.load()
    assert library is None and "pip install -e ." in reason and "PIUMR_BUILD_AOT=1" in reason


def test_compile_without_a_compiler_names_the_cause(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-piumr")
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler was found.*no-such-compiler-piumr"):
        _extension._compile(tmp_path / "jit", "digest")


def test_compile_records_success_and_failure(monkeypatch, tmp_path, capsys):
    """The real _compile around a stand-in for torch's build: stamps, log, message, PATH."""
    from torch.utils import cpp_extension

    path = os.environ["PATH"]
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: None)
    _extension._compile(tmp_path, "good")
    assert (tmp_path / "sources.sha256").read_text() == "good"
    assert "compiling the C++ CPU kernels into" in capsys.readouterr().err

    def broken(**kwargs):
        raise RuntimeError("Error building extension '_C': csrc/op.cpp:1: error: expected ';'")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(RuntimeError, match=r"(?s)compiling the C\+\+ extension failed.*expected "):
        _extension._compile(tmp_path, "bad")
    assert _extension.jit_failed_before(tmp_path, "bad")
    assert "expected ';'" in (tmp_path / "build.log").read_text()
    assert os.environ["PATH"] == path


def _run_setup(*args, aot: bool):
    """setup.py in an interpreter where `import torch` fails, as in pip's isolated build."""
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', *sys.argv[1:]]; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PIUMR_BUILD_AOT"}
    if aot:
        env["PIUMR_BUILD_AOT"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_setup_needs_no_torch_unless_building_ahead_of_time():
    plain = _run_setup("--name", aot=False)
    assert plain.returncode == 0, plain.stderr
    assert "piumr_kernels" in plain.stdout
    aot = _run_setup("--name", aot=True)
    assert aot.returncode != 0
    assert "isolated" in aot.stderr and "--no-build-isolation" in aot.stderr
    assert "not found" not in aot.stderr  # torch is installed; the build environment lacks it


def test_setup_declares_the_ahead_of_time_extension_from_the_loaders_sources(monkeypatch):
    import setuptools

    declared = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: declared.update(kwargs))
    monkeypatch.setenv("PIUMR_BUILD_AOT", "1")
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    (extension,) = declared["ext_modules"]
    assert extension.name == "piumr_kernels._C"
    assert [ROOT / s for s in extension.sources] == _extension.compiled_sources()
    assert extension.extra_compile_args["cxx"] == _extension.CXX_FLAGS
    assert set(_extension.LD_FLAGS) <= set(extension.extra_link_args)
    assert "build_ext" in declared["cmdclass"]


def test_info_is_a_dict_that_prints_as_a_summary():
    report = piumr_kernels.info()
    assert json.loads(json.dumps(report)) == dict(report)  # plain data for programs
    assert report["chosen"]["cpu"] == backends.resolve_backend(torch.empty(0))
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == f"piumr_kernels {piumr_kernels.__version__}"
    assert repr(report) == text and all(len(line) < 200 for line in lines if "unavailable" not in line)
    assert torch.__version__ in text and f"cpu -> {report['chosen']['cpu']}" in text
    for name in backends.BACKENDS:
        entry = report["backends"][name]
        assert any(line.split()[0] == name and (entry["available"] or entry["reason"] in line) for line in lines)
    if report["cpp_library"]:
        assert report["cpu_isa"] in text and report["cpp_library"] in text


def test_python_m_prints_the_summary_and_checks_required_backends(capsys, monkeypatch):
    from piumr_kernels import __main__ as cli

    assert cli.main([]) == 0
    assert capsys.readouterr().out == f"{piumr_kernels.info()}\n"
    monkeypatch.setattr(backends, "_TRITON_OK", False)
    monkeypatch.setattr(backends, "_TRITON_ERROR", "triton is not installed")
    assert cli.main(["--require", "reference", "--require", "triton"]) == 1
    assert "the triton backend is required but triton is not installed" in capsys.readouterr().err


def test_dynamo_traces_the_ops_without_warnings_from_the_package(monkeypatch):
    """Dynamo warns about what it cannot trace faithfully (an lru_cache it bypasses, for one)."""
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())
    torch._dynamo.reset()

    def step(K, x, z, labels):
        P = piumr_kernels.sinkhorn(K, n_iters=2)
        E = piumr_kernels.dct_filter_bank(x, 3)
        mean, peak, spatial = piumr_kernels.tfam_statistics(x)
        loss = piumr_kernels.girl_loss(z, labels, num_groups=2)
        return P.sum() + E.sum() + mean.sum() + peak.sum() + spatial.sum() + loss

    inputs = (
        torch.rand(2, 4, 4, requires_grad=True),
        torch.randn(1, 2, 2, 6, 6, requires_grad=True),
        torch.randn(8, 16, requires_grad=True),
        torch.randint(0, 3, (8,)),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(step, fullgraph=True, backend="eager")(*inputs).backward()
    package = str(ROOT / "piumr_kernels")
    ours = [str(w.message) for w in caught if w.filename.startswith(package) or "lru_cache" in str(w.message)]
    assert not ours, ours
