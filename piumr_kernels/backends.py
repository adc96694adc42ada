"""Backend selection shared by every op: reference (PyTorch), cpp (csrc/ extension), triton.

`auto` sends CUDA tensors to triton and CPU tensors to cpp when the extension is built,
else to the reference. `PIUMR_KERNELS_BACKEND` or `use_backend(name)` forces one; a forced
backend that cannot run raises `BackendUnavailableError` instead of falling back.
Under `torch.compile` the backend is resolved while tracing.
"""

from __future__ import annotations

import contextlib
import os
import platform
import warnings

import torch

from . import _extension

BACKENDS = ("reference", "cpp", "triton")
_CHOICES = ("auto",) + BACKENDS
_ENV_BACKEND = "PIUMR_KERNELS_BACKEND"
_ENV_VALIDATE = "PIUMR_KERNELS_VALIDATE"

# A plain module global (not a ContextVar) so torch.compile can read and guard on it.
_forced: list[str] = []


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run here."""


# Compiles csrc/ on the first import after installing or after a source change (a message
# says so while it runs); see _extension.py for where builds live and which one loads.
_LIBRARY, _LIBRARY_KIND, _EXTENSION_ERROR = _extension.load()
if _LIBRARY is None:
    warnings.warn(
        f"piumr_kernels: the cpp backend is unavailable, CPU tensors run on the slower reference: {_EXTENSION_ERROR}",
        stacklevel=2,
    )


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return False, f"triton is not installed ({error})"
    return True, ""


_TRITON_OK, _TRITON_ERROR = _triton_status()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _availability(backend: str, device: torch.device) -> str:
    """Empty string when `backend` can run on `device`, else the reason it cannot."""
    if backend == "reference":
        return ""
    if backend == "cpp":
        if _LIBRARY is None:
            return _EXTENSION_ERROR
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors only, got a tensor on {device}"
        return ""
    if not _TRITON_OK:
        return _TRITON_ERROR
    if device.type == "cuda":
        return ""
    if device.type == "cpu" and triton_interpreting():
        return ""
    return (
        f"the triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a tensor on {device}"
    )


def backend_available(backend: str) -> bool:
    """Whether `backend` can run on some device here (its ops get registered)."""
    if backend == "cpp":
        return _LIBRARY is not None
    if backend == "triton":
        return _TRITON_OK
    return backend == "reference"


def cpp_op_built(name: str) -> bool:
    """Whether the built extension has the op `name` (False when it was built from an older
    checkout that predates the op)."""
    return _LIBRARY is not None and hasattr(torch.ops.piumr_kernels, name)


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend`, else the environment, else auto."""
    if _forced:
        return _forced[-1]
    name = os.environ.get(_ENV_BACKEND, "auto").strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"{_ENV_BACKEND} must be one of {', '.join(_CHOICES)}, got {name!r}")
    return name


def resolve_backend(tensor: torch.Tensor, cpp_op: str | None = None) -> str:
    """The backend that will run an op whose main input is `tensor`; `cpp_op` names the op's
    C++ kernel, so a stale extension gives a clear error instead of a missing attribute."""
    name = requested_backend()
    if name == "auto":
        if tensor.is_cuda:
            name = "triton" if _TRITON_OK else "reference"
        elif tensor.is_cpu and _LIBRARY is not None:
            name = "cpp"
        else:
            name = "reference"
    elif not (name == "cpp" and tensor.is_cpu and _LIBRARY is not None):
        reason = _availability(name, tensor.device)
        if reason:
            raise BackendUnavailableError(f"backend {name!r} was requested but {reason}")
    if name == "cpp" and cpp_op is not None and not cpp_op_built(cpp_op):
        raise BackendUnavailableError(
            f"backend 'cpp' was selected but the C++ extension {_LIBRARY} has no {cpp_op} (it "
            f"was built from other sources); delete it, or rebuild it with `{_extension.AOT_COMMAND}`"
        )
    return name


class use_backend(contextlib.ContextDecorator):
    """Force every op inside the block (or decorated function) onto one backend (`auto`
    restores the default)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        if name not in _CHOICES:
            raise ValueError(f"backend must be one of {', '.join(_CHOICES)}, got {name!r}")
        self._name = name

    def __enter__(self) -> None:
        _forced.append(self._name)

    def __exit__(self, *exc_info: object) -> None:
        _forced.pop()


def validation_enabled(validate: bool | None) -> bool:
    """Value checks (a pass over the data) run when asked for or when PIUMR_KERNELS_VALIDATE=1."""
    if validate is not None:
        return bool(validate)
    return os.environ.get(_ENV_VALIDATE, "0") == "1"


class Info(dict):
    """`info()`'s result: a plain dict for programs, printed as a readable summary."""

    def __str__(self) -> str:
        def state(name: str) -> str:
            entry = self["backends"][name]
            return "available" if entry["available"] else f"unavailable: {entry['reason']}"

        cpp = state("cpp")
        if self["cpp_library"]:
            cpp += f", {self['cpu_isa']} kernels, {self['cpp_build']} build {self['cpp_library']}"
        chosen = ", ".join(f"{device} -> {backend}" for device, backend in self["chosen"].items())
        interpreter = "on" if self["triton_interpret"] else "off"
        lines = [
            f"piumr_kernels {self['version']}",
            (
                f"  torch      {self['torch']} (CUDA {self['cuda'] or 'none'}), Python {self['python']}, "
                f"{self['cpu_threads']} CPU threads"
            ),
            f"  triton     {self['triton'] or 'not installed'}, interpreter {interpreter} (TRITON_INTERPRET)",
            f"  requested  {self['requested']}: {chosen}",
            f"  reference  {state('reference')}",
            f"  cpp        {cpp}",
            f"  triton     {state('triton')}",
        ]
        return "\n".join(lines)

    __repr__ = __str__


def _chosen(device: str) -> str:
    """The backend an op on `device` runs with now, or why none can."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    try:
        return resolve_backend(torch.empty(0, device=device))
    except BackendUnavailableError as error:
        return f"error ({error})"


def info() -> Info:
    """Which backends can run here, why the others cannot, which one each device gets, and the
    versions and build in use: a dict; `print(info())` (or `python -m piumr_kernels`) shows it
    as a summary."""
    if not _TRITON_OK:
        triton_reason = _TRITON_ERROR
    elif torch.cuda.is_available() or triton_interpreting():
        triton_reason = ""
    else:
        triton_reason = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    backends = {
        "reference": {"available": True, "reason": ""},
        "cpp": {"available": _LIBRARY is not None, "reason": _EXTENSION_ERROR},
        "triton": {"available": not triton_reason, "reason": triton_reason},
    }
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import __version__

    return Info(
        version=__version__,
        backends=backends,
        requested=requested_backend(),
        chosen={device: _chosen(device) for device in ("cpu", "cuda")},
        triton_interpret=triton_interpreting(),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        cpu_threads=torch.get_num_threads(),
        # The instruction set the cpp kernels run with (PIUMR_KERNELS_CPU_ISA can lower it).
        cpu_isa=torch.ops.piumr_kernels.cpu_isa() if _LIBRARY is not None else None,
        cpp_library=str(_LIBRARY) if _LIBRARY is not None else None,
        cpp_build=_LIBRARY_KIND or None,
    )
