"""Checkpoint files and random-number state of a training run.

Checkpoints are written atomically (a temporary file `.<name>.<random>.tmp` in the same
folder, flushed and fsync'ed, then os.replace), so a crash or Ctrl-C while saving leaves the
previous file intact; temporary files of that naming left by a kill are removed by the next
save of the same name (`remove_stale_temporaries`). A save can keep the file it replaces
under another name (the run keeps `previous.pt` beside `last.pt`).

They hold plain tensors, numbers and strings only and are read back with
torch.load(weights_only=True). Each stores the sha256 of its content (`payload_digest`),
verified on load: a damaged, foreign or hostile file is a CheckpointError naming it, never a
silently wrong weight. `load_resume_checkpoint` falls back from a bad `last.pt` to the
`previous.pt` beside it.

Exact resume: every epoch re-seeds Python, NumPy and torch (and the DataLoader and sampler
generators) from (seed, epoch, rank), so data order, augmentation, TFAM noise and GIRL
pseudo-groups of an epoch depend only on those three numbers. A run stopped after epoch e
and resumed therefore repeats epochs e+1... exactly as an uninterrupted run would (on CPU;
GPU kernels may be non-deterministic). The RNG states are saved as well, for inspection and
for code that draws random numbers between epochs.
"""

import hashlib
import os
import random
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from models.errors import CheckpointError, InputNotFound

# v2 stores CHECKSUM_KEY; v1 files (written before checksums) still load, unverified.
CHECKPOINT_FORMAT = "piumr-train-v2"
UNVERIFIED_FORMATS = ("piumr-train-v1",)
CHECKSUM_KEY = "sha256"
LAST_NAME, PREVIOUS_NAME = "last.pt", "previous.pt"
TRAINING_KEYS = (
    "config",
    "epoch",
    "global_step",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "history",
    "best",
)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed that is a function of (seed, epoch, rank) only."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states, as weights_only-loadable values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.setstate needs tuples; a round trip through some serializers gives lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def payload_digest(payload: dict) -> str:
    """sha256 of a checkpoint's content, every key but CHECKSUM_KEY: tensors by dtype, shape
    and bytes, containers in order, other values by type and repr. It hashes the values, not
    the file's bytes, so it is the same after a torch.save / torch.load round trip."""
    digest = hashlib.sha256()
    _digest_update(digest, {key: value for key, value in payload.items() if key != CHECKSUM_KEY})
    return digest.hexdigest()


def _digest_update(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _digest_update(digest, key)
            _digest_update(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _digest_update(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


def remove_stale_temporaries(path) -> list[Path]:
    """Delete the temporary files `save_atomic` names for `path` (`.<name>.<random>.tmp`),
    left behind when a process was killed while saving; no other file. Returns them.
    Only one process may save to a given path (rank 0 does)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]+\.tmp")
    stale = [entry for entry in path.parent.glob(f".{path.name}.*.tmp") if pattern.fullmatch(entry.name)]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale


def save_atomic(payload: dict, path, previous: str | None = None) -> None:
    """torch.save `payload` plus its CHECKSUM_KEY to `path` via a temporary file +
    os.replace: never a half-written file. With `previous`, the file being replaced is kept
    under that name in the same folder (a kill between the two renames leaves it there and
    no `path`, which `load_resume_checkpoint` handles)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**payload, CHECKSUM_KEY: payload_digest(payload)}, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, path.with_name(previous))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by `save_atomic`, its checksum verified. CheckpointError (naming
    `path`) for a file torch.load(weights_only=True) cannot read, one that is not a dict, or
    one whose content does not match its checksum; InputNotFound when there is no file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a damaged or foreign file fails in many ways (EOFError, UnpicklingError, ...)
        raise CheckpointError(
            f"{path}: not a checkpoint torch.load(weights_only=True) can read (damaged or "
            f"foreign file): {_load_failure(error)}"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(payload).__name__}")
    if CHECKSUM_KEY in payload:
        if payload[CHECKSUM_KEY] != payload_digest(payload):
            raise CheckpointError(f"{path}: the content does not match its stored sha256: the file is damaged")
    elif payload.get("format") in UNVERIFIED_FORMATS:
        warnings.warn(f"{path}: a {payload['format']} checkpoint has no checksum; loaded unverified", stacklevel=2)
    else:
        raise CheckpointError(
            f"{path}: expected a checkpoint with a '{CHECKSUM_KEY}' checksum (written by "
            f"models/train.py), found keys {sorted(map(str, payload))[:8]}"
        )
    return payload


def _load_failure(error: Exception) -> str:
    """The gist of a torch.load failure. Its weights_only refusal is a page of advice on
    loading the file anyway; only the reason in it is kept."""
    lines = [line.strip() for line in str(error).splitlines()]
    refusal = next((line for line in lines if line.startswith("WeightsUnpickler error:")), None)
    if refusal is not None:
        reason = refusal.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
        return f"it holds more than tensors and plain values ({reason}); nothing in it was run"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def check_training_checkpoint(ckpt: dict, path) -> None:
    """CheckpointError unless `ckpt` is a full training checkpoint (last.pt / previous.pt)."""
    if ckpt.get("format") not in (CHECKPOINT_FORMAT, *UNVERIFIED_FORMATS):
        raise CheckpointError(
            f"{path}: expected a {CHECKPOINT_FORMAT} training checkpoint, got format {ckpt.get('format')!r}"
        )
    missing = [key for key in TRAINING_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a full training checkpoint (use last.pt of a run): no {missing}")


def load_resume_checkpoint(path) -> tuple[dict, Path, list[str]]:
    """The training checkpoint to continue from: `path`, or, when `path` is a last.pt that is
    missing or unusable, the previous.pt beside it. Returns `(checkpoint, the file used,
    the problems of the files passed over)`; CheckpointError listing each file's problem when
    none is usable."""
    path = Path(path)
    candidates = [path, path.with_name(PREVIOUS_NAME)] if path.name == LAST_NAME else [path]
    problems = []
    for candidate in candidates:
        try:
            ckpt = load_checkpoint(candidate)
            check_training_checkpoint(ckpt, candidate)
            return ckpt, candidate, problems
        except (CheckpointError, InputNotFound) as error:
            problems.append(str(error))
    raise CheckpointError(f"no usable checkpoint to resume from: {'; '.join(problems)}")
