"""Finds, or compiles on first use, the C++ extension (csrc/) against the torch that loads it.

Two kinds of build are loaded, in this order:

1. an ahead-of-time build next to this file, `piumr_kernels/_C.<python-suffix>.so`
   (`PIUMR_BUILD_AOT=1 pip install --no-build-isolation -e .`), when it is newer than every
   file in csrc/ and imports;
2. otherwise the just-in-time build: `torch.utils.cpp_extension.load` compiles csrc/ with
   ninja into `build/jit/<python>-torch<version>-<flags hash>/` of the source checkout
   (`PIUMR_KERNELS_BUILD_DIR` replaces `build/jit`). The directory is keyed by what makes
   object files incompatible (Python, torch version and commit, compiler, flags); inside it
   ninja recompiles only the sources that changed. `sources.sha256` records the csrc/
   content of the last good build, so an unchanged checkout loads the library without
   running ninja at all.

This module imports nothing outside the standard library at module level: setup.py reads
the sources and flags from it without torch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import os
import shutil
import sys
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR.parent / "csrc"
# -fno-math-errno lets the compiler vectorize sqrt/exp without errno bookkeeping.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
LD_FLAGS = ["-fopenmp"]
ENV_BUILD_DIR = "PIUMR_KERNELS_BUILD_DIR"
LIBRARY_NAME = "_C"  # csrc/module.cpp's PYBIND11_MODULE name
AOT_COMMAND = "PIUMR_BUILD_AOT=1 pip install --no-build-isolation -e ."


def source_files(source_dir: Path | None = None) -> list[Path]:
    """Every file of the extension (headers too: a changed header must rebuild)."""
    return sorted(p for p in (source_dir or SOURCE_DIR).iterdir() if p.suffix in (".cpp", ".h"))


def compiled_sources(source_dir: Path | None = None) -> list[Path]:
    return [p for p in source_files(source_dir) if p.suffix == ".cpp"]


def source_digest(source_dir: Path | None = None) -> str:
    """sha256 over the names and contents of csrc/'s files."""
    digest = hashlib.sha256()
    for path in source_files(source_dir):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def compiler() -> str:
    """The C++ compiler torch's build runs: $CXX, else c++."""
    return os.environ.get("CXX", "c++")


def build_directory() -> Path:
    """The JIT build directory for this interpreter, torch, compiler and flags."""
    import torch

    root = Path(os.environ.get(ENV_BUILD_DIR) or PACKAGE_DIR.parent / "build" / "jit")
    flags = "\0".join([torch.version.git_version or "", compiler(), *CXX_FLAGS, "|", *LD_FLAGS])
    flags_hash = hashlib.sha256(flags.encode()).hexdigest()[:10]
    return root / f"{sys.implementation.cache_tag}-torch{torch.__version__}-{flags_hash}"


def aot_library() -> Path | None:
    """The ahead-of-time build next to this file, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = PACKAGE_DIR / f"{LIBRARY_NAME}{suffix}"
        if path.is_file():
            return path
    return None


def aot_is_current(library: Path) -> bool:
    """An ahead-of-time build is current when no source file is newer than it (an install
    without csrc/ has nothing to compare with and keeps its build)."""
    if not SOURCE_DIR.is_dir():
        return True
    newest = max((p.stat().st_mtime for p in source_files()), default=0.0)
    return library.stat().st_mtime >= newest


def jit_is_current(directory: Path, digest: str) -> bool:
    """Whether `directory` holds a good build of sources whose digest is `digest`."""
    stamp = directory / "sources.sha256"
    return (directory / f"{LIBRARY_NAME}.so").is_file() and stamp.is_file() and stamp.read_text() == digest


def jit_failed_before(directory: Path, digest: str) -> bool:
    """Whether the last build of these very sources failed (so importing does not retry a
    build that takes minutes only to fail again)."""
    stamp = directory / "failed.sha256"
    return stamp.is_file() and stamp.read_text() == digest


def _write(path: Path, text: str) -> None:
    """Atomically: concurrent importers read either the old or the new stamp."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def _say(message: str) -> None:
    print(f"piumr_kernels: {message}", file=sys.stderr, flush=True)


def _ninja_directory() -> str | None:
    """Where a ninja executable is: PATH, else the `ninja` package's (a dependency), whose
    bin directory is not on PATH when the environment's python is run without activating it."""
    found = shutil.which("ninja")
    if found:
        return str(Path(found).parent)
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


def _compile(directory: Path, digest: str) -> None:
    """Runs torch's ninja build of csrc/ in `directory` and loads the library; raises with
    the cause and the fix."""
    from torch.utils import cpp_extension

    if shutil.which(compiler()) is None:
        raise RuntimeError(
            f"no C++ compiler was found (looked for {compiler()!r}, from $CXX or the default "
            "c++): install a C++ compiler with OpenMP (e.g. `apt install g++`) or point CXX at one"
        )
    ninja_dir = _ninja_directory()
    if ninja_dir is None:
        raise RuntimeError("ninja was not found: `pip install ninja` (a dependency of piumr_kernels)")
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "lock").exists():
        _say(
            f"waiting for another process that is compiling in {directory} "
            "(delete its 'lock' file if no such process runs)"
        )
    _say(
        f"compiling the C++ CPU kernels into {directory}: a full build takes minutes on a "
        "small machine, after a csrc/ change only what changed is recompiled..."
    )
    started = time.perf_counter()
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja_dir, path]) if path else ninja_dir
    try:
        cpp_extension.load(
            name=LIBRARY_NAME,
            sources=[str(p) for p in compiled_sources()],
            extra_cflags=CXX_FLAGS,
            extra_ldflags=LD_FLAGS,
            build_directory=str(directory),
            is_python_module=False,
        )
    except (RuntimeError, OSError) as error:  # a failed compile; a library that does not load
        log = directory / "build.log"
        log.write_text(str(error))
        _write(directory / "failed.sha256", digest)
        tail = "\n".join(str(error).splitlines()[-20:])
        raise RuntimeError(
            f"compiling the C++ extension failed (full output: {log}; delete "
            f"{directory / 'failed.sha256'} to retry):\n{tail}"
        ) from None
    finally:
        os.environ["PATH"] = path
    _write(directory / "sources.sha256", digest)
    (directory / "failed.sha256").unlink(missing_ok=True)
    _say(f"C++ extension built in {time.perf_counter() - started:.0f} s")


def load() -> tuple[Path | None, str, str]:
    """Loads the extension (compiling it first when needed): (library, kind, reason).
    `kind` is 'ahead-of-time' or 'just-in-time'; on failure the library is None and `reason`
    says why and what to do."""
    import torch

    library = aot_library()
    stale = ""
    if library is not None:
        if aot_is_current(library):
            try:
                importlib.import_module(f"{__package__}.{LIBRARY_NAME}")
                return library, "ahead-of-time", ""
            except ImportError as error:
                stale = f"{library.name} does not load ({error})"
        else:
            stale = f"{library.name} is older than csrc/"
    if not SOURCE_DIR.is_dir():
        return (
            None,
            "",
            (
                f"the C++ sources are not installed ({SOURCE_DIR} is missing){'; ' + stale if stale else ''}: "
                f"install from a source checkout with `pip install -e .`, or compile at install "
                f"time with `{AOT_COMMAND}`"
            ),
        )
    if stale:
        _say(f"{stale}; using the just-in-time build instead")
    directory = build_directory()
    digest = source_digest()
    library = directory / f"{LIBRARY_NAME}.so"
    if not jit_is_current(directory, digest):
        if jit_failed_before(directory, digest):
            return (
                None,
                "",
                (
                    f"the last build of these sources failed (output: {directory / 'build.log'}); "
                    f"fix it, or delete {directory / 'failed.sha256'} to retry"
                ),
            )
        try:
            _compile(directory, digest)
        except RuntimeError as error:
            return None, "", str(error)
        return library, "just-in-time", ""
    torch.ops.load_library(str(library))
    return library, "just-in-time", ""
