"""A training run under bad data and damaged checkpoints (issue 26): unreadable clips are
dropped and reported while the run goes on (GIRL on a short batch uses fewer groups, a
batch with no readable clip is skipped), checkpoints carry a checksum that catches a
flipped byte, --resume falls back from a damaged last.pt to previous.pt, hostile and
foreign files give a CheckpointError naming them, and temporaries of killed saves are
removed."""

import math
import zipfile

import pytest
import torch
from torch.utils.data import Dataset

from models import train
from models.errors import CheckpointError, exit_on_input_error
from models.training import run as run_module
from models.training.checkpointing import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    load_resume_checkpoint,
    remove_stale_temporaries,
    save_atomic,
)
from tests.train_helpers import one_thread, tiny_args  # noqa: F401


class UnreadableAt(Dataset):
    """A dataset whose items at `bad` indices are None, as for unreadable videos."""

    def __init__(self, dataset, bad: set[int]):
        self.dataset, self.bad = dataset, bad

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return None if index in self.bad else self.dataset[key]

    def __len__(self) -> int:
        return len(self.dataset)


class BatchSizes(torch.nn.Module):
    """Wraps the training loss and records each call's batch size and GIRL value."""

    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn, self.calls = loss_fn, []

    def forward(self, logits, features, labels, **groups):
        loss, parts = self.loss_fn(logits, features, labels, **groups)
        self.calls.append((labels.numel(), float(parts["girl"])))
        return loss, parts


@pytest.fixture
def unreadable_train_clips(monkeypatch):
    """`bad(indices)` makes those training clips unreadable; returns the loss recorder."""
    build_dataset, build_loss = run_module.build_dataset, run_module.build_loss
    recorder = {}

    def bad(indices):
        monkeypatch.setattr(
            run_module,
            "build_dataset",
            lambda cfg, split, train: (
                UnreadableAt(build_dataset(cfg, split, train), set(indices))
                if split == "train"
                else build_dataset(cfg, split, train)
            ),
        )
        monkeypatch.setattr(
            run_module, "build_loss", lambda cfg: recorder.setdefault("loss", BatchSizes(build_loss(cfg)))
        )
        return recorder

    return bad


@pytest.mark.parametrize("batch_size", [8, 16, 80])
def test_one_bad_clip_with_four_groups_drops_the_clip_and_trains_on(
    tmp_path, capsys, unreadable_train_clips, batch_size
):
    recorder = unreadable_train_clips([5])
    args = tiny_args(tmp_path, epochs=1, train_clips=batch_size, eval_clips=4) + [
        "--batch-size",
        str(batch_size),
        "--girl-num-groups",
        "4",
        "--no-test",
    ]
    summary = train.main(args)
    record = summary["history"][0]
    assert record["train_dropped"] == 1 and record["train_empty_steps"] == 0
    assert [size for size, _ in recorder["loss"].calls] == [batch_size - 1]
    assert all(math.isfinite(girl) for _, girl in recorder["loss"].calls)
    assert math.isfinite(record["train_loss"])
    assert "warning: epoch 1: 1 unreadable clip(s) skipped in train" in capsys.readouterr().out


def test_a_batch_without_a_readable_clip_is_skipped_and_reported(tmp_path, capsys, unreadable_train_clips):
    # 16 clips in batches of 8, only clip 0 readable: one batch of a single clip, one empty batch.
    recorder = unreadable_train_clips(range(1, 16))
    summary = train.main(
        tiny_args(tmp_path, epochs=1, train_clips=16, eval_clips=4) + ["--girl-num-groups", "4", "--no-test"]
    )
    record = summary["history"][0]
    assert record["train_dropped"] == 15 and record["train_empty_steps"] == 1
    assert [size for size, _ in recorder["loss"].calls] == [1]
    assert recorder["loss"].calls[0][1] == 0.0  # a lone clip has no GIRL partner
    assert math.isfinite(record["train_loss"])
    out = capsys.readouterr().out
    assert "warning: epoch 1: 1 step(s) skipped: no readable clip in the batch" in out
    assert "warning: epoch 1: 15 unreadable clip(s) skipped in train" in out
    assert load_checkpoint(tmp_path / "last.pt")["global_step"] == 1  # the empty batch was no step


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-epoch run: last.pt (epoch 2) and previous.pt (epoch 1)."""
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    train.main(tiny_args(out, epochs=2, train_clips=8, eval_clips=4) + ["--no-test"])
    return out


def _copy_run(finished_run, tmp_path):
    for name in ("last.pt", "previous.pt"):
        (tmp_path / name).write_bytes((finished_run / name).read_bytes())
    return tmp_path


def _flip_a_weight_byte(path) -> None:
    """Flip one byte in the middle of the largest tensor's data (a zip member stored
    uncompressed), which torch.load alone would not notice."""
    with zipfile.ZipFile(path) as archive:
        member = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
        header = archive.fp
        header.seek(member.header_offset + 26)
        name_length, extra_length = int.from_bytes(header.read(2), "little"), int.from_bytes(header.read(2), "little")
        offset = member.header_offset + 30 + name_length + extra_length + member.file_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_checkpoints_keep_the_previous_one_and_verify_their_checksum(finished_run):
    last, previous = load_checkpoint(finished_run / "last.pt"), load_checkpoint(finished_run / "previous.pt")
    assert (last["epoch"], previous["epoch"]) == (2, 1)
    assert len(last["sha256"]) == 64 and last["format"] == CHECKPOINT_FORMAT
    assert load_checkpoint(finished_run / "best.pt")["sha256"]


def test_a_flipped_weight_byte_is_caught_and_resume_falls_back_to_previous(finished_run, tmp_path, capsys):
    run_dir = _copy_run(finished_run, tmp_path)
    _flip_a_weight_byte(run_dir / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt: the content does not match its stored sha256"):
        load_checkpoint(run_dir / "last.pt")
    summary = train.main(["--out", str(run_dir), "--resume", "--no-progress"])
    out = capsys.readouterr().out
    assert (
        f"warning: {run_dir / 'last.pt'}: the content does not match its stored sha256: the file is damaged; "
        f"resuming from {run_dir / 'previous.pt'} (epoch 1) instead" in out
    )
    assert summary["epochs_done"] == 2 and [r["epoch"] for r in summary["history"]] == [1, 2]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2  # rewritten, valid again


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "missing"])
def test_a_damaged_last_checkpoint_falls_back_to_previous(finished_run, tmp_path, damage):
    run_dir = _copy_run(finished_run, tmp_path)
    last = run_dir / "last.pt"
    content = last.read_bytes()
    if damage == "missing":
        last.unlink()  # a kill between the two renames of a save
    else:
        last.write_bytes({"truncated": content[: len(content) // 2], "empty": b"", "garbage": b"\x00" * 4096}[damage])
    ckpt, used, problems = load_resume_checkpoint(last)
    assert used == run_dir / "previous.pt" and ckpt["epoch"] == 1
    assert len(problems) == 1 and str(last) in problems[0]


class _Hostile:
    def __reduce__(self):
        return (print, ("code ran while loading",))


@pytest.mark.parametrize("content", ["hostile pickle", "foreign state dict", "both damaged"])
def test_unusable_checkpoints_are_a_clear_error_naming_the_file(finished_run, tmp_path, content, capsys):
    path = tmp_path / "last.pt"
    if content == "hostile pickle":
        torch.save({"config": _Hostile()}, path)
    elif content == "foreign state dict":
        torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    else:
        _flip_a_weight_byte(_copy_run(finished_run, tmp_path) / "last.pt")
        (tmp_path / "previous.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        exit_on_input_error(lambda: train.main(["--out", str(tmp_path), "--resume", "--no-progress"]), "train.py")
    message = exit_info.value.code
    assert message.startswith("train.py: error: no usable checkpoint to resume from: ") and "\n" not in message
    assert str(path) in message and str(tmp_path / "previous.pt") in message
    assert "code ran" not in capsys.readouterr().out
    if content == "hostile pickle":
        assert "it holds more than tensors and plain values (Unsupported global: GLOBAL print" in message


def test_an_evaluation_checkpoint_is_not_resumed(finished_run):
    with pytest.raises(CheckpointError, match="best.pt: not a full training checkpoint"):
        load_resume_checkpoint(finished_run / "best.pt")


def test_temporaries_of_a_killed_save_are_removed_and_nothing_else(tmp_path):
    stale = [tmp_path / ".last.pt.k2j4h_x8.tmp", tmp_path / ".best.pt.abc12345.tmp"]
    kept = [
        tmp_path / "notes.tmp",
        tmp_path / ".last.pt.notes.txt",
        tmp_path / ".last.pt..tmp",
        tmp_path / "x.last.pt.abcdefgh.tmp",
        tmp_path / ".last.pt.a-b.tmp",
    ]
    for path in stale + kept:
        path.write_bytes(b"partial")
    save_atomic({"epoch": 1}, tmp_path / "last.pt")
    assert not stale[0].exists() and stale[1].exists()  # a save cleans up after its own name only
    assert remove_stale_temporaries(tmp_path / "best.pt") == [stale[1]]
    assert all(path.exists() for path in kept)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_a_run_removes_temporaries_left_by_a_kill_when_it_starts(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path)
    leftover = run_dir / ".last.pt.q1w2e3r4.tmp"
    leftover.write_bytes(b"half a checkpoint")
    train.main(["--out", str(run_dir), "--resume", "--no-progress"])  # nothing left to train: starts and ends
    assert not leftover.exists()
