"""models/prepare_ma52.py on a small generated MA-52 tree (both folder layouts, CRLF lists,
the test list without a final newline, a corrupt clip), and the prepared copy read back
by MA52Dataset against the original videos.

Each frame is a diagonal ramp plus 8 * its index, so the frame a clip item shows can be
told from its mean (the ramp's mean is known) and the pixels compared between the copy and
the original."""

import os

import numpy as np
import pytest

from models.data.decode import decoded_frames
from models.data.ma52 import MA52Dataset, write_h264_mp4
from models.data.prepare import main, prepare

HEIGHT, WIDTH = 64, 48  # portrait, like MA-52's 1080x1296; short side 24 halves it
SHORT_SIDE = 24
# split -> (folder, list folder, [(name, label, frames)])
TREE = {
    "train": ("train", "", [("0003_01_0001.mp4", 9, 10), ("0012_02_0003.mp4", 40, 21)]),
    "val": ("videos_val", "annotations", [("0007_06_0001.mp4", 50, 7)]),
    "test": ("test", "", [("test0000.mp4", 0, 12)]),
}
CORRUPT = "0042_03_0005.mp4"
RAMP = np.add.outer(np.arange(HEIGHT), np.arange(WIDTH)) * (60 / (HEIGHT + WIDTH))


def coded_frames(num_frames):
    frames = RAMP[None, :, :, None] + 8 * np.arange(num_frames)[:, None, None, None] + 10
    return np.broadcast_to(frames, (num_frames, HEIGHT, WIDTH, 3)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ma52_raw")
    for split, (folder, list_folder, entries) in TREE.items():
        (root / folder).mkdir()
        for name, _, num_frames in entries:
            write_h264_mp4(root / folder / name, coded_frames(num_frames))
        if split == "train":
            entries = entries + [(CORRUPT, 26, 0)]
        lines = "\r\n".join(f"{name} {label}" for name, label, _ in entries) + ("" if split == "test" else "\r\n")
        (root / list_folder).mkdir(exist_ok=True)
        (root / list_folder / f"{split}_list_videos.txt").write_bytes(lines.encode())
    (root / "train" / CORRUPT).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return root


@pytest.fixture(scope="module")
def prepared(raw_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ma52_prepared")
    return out, prepare(raw_root, out, short_side=SHORT_SIDE, workers=2, progress=False)


def test_outputs_lists_and_report(raw_root, prepared):
    out, manifest = prepared
    assert manifest["written"] == 4 and manifest["skipped_existing"] == 0
    assert list(manifest["failed"]) == [f"train/{CORRUPT}"]  # reported, the others still written
    assert manifest["listed"] == {"train": 3, "val": 1, "test": 1}
    assert manifest["bytes"] == sum(path.stat().st_size for path in out.glob("*/*.mp4")) > 0
    for split, (_folder, list_folder, entries) in TREE.items():
        name = f"{split}_list_videos.txt"
        assert (out / name).read_bytes() == (raw_root / list_folder / name).read_bytes()  # CRLF kept
        for video, _, num_frames in entries:
            frames = list(decoded_frames(out / split / video))
            assert len(frames) == num_frames  # every frame kept, in order
            # Timestamps number the frames at 30 fps, so timestamp-based readers see the same order.
            assert [frame.time for frame in frames] == pytest.approx([index / 30 for index in range(num_frames)])
            assert (frames[0].width, frames[0].height) == (SHORT_SIDE, 32)
    assert not (out / "train" / CORRUPT).exists()
    assert not list(out.glob("*/.*"))  # no partial files left


def test_rerun_skips_finished_clips(raw_root, prepared):
    out, _ = prepared
    stamps = {path: path.stat().st_mtime_ns for path in out.glob("*/*.mp4")}
    (out / "val" / "0007_06_0001.mp4").unlink()  # as if interrupted before this clip
    manifest = main(
        [
            "--data-root",
            str(raw_root),
            "--out",
            str(out),
            "--short-side",
            str(SHORT_SIDE),
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert (manifest["written"], manifest["skipped_existing"], len(manifest["failed"])) == (1, 3, 1)
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp or path.name == "0007_06_0001.mp4"
    with pytest.raises(ValueError, match="other settings"):
        prepare(raw_root, out, short_side=32, progress=False)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_prepared_and_native_give_the_same_items(raw_root, prepared, split):
    out, _ = prepared
    native = MA52Dataset(raw_root, split, num_frames=8, size=20, short_side=SHORT_SIDE)
    copy = MA52Dataset(out, split, num_frames=8, size=20, short_side=SHORT_SIDE)
    assert native.prepared is None and copy.prepared["short_side"] == SHORT_SIDE
    assert copy.source.startswith("prepared MA-52 copy") and native.source.startswith("original MA-52 videos")
    fields = ("names", "labels", "bodies", "subjects")
    assert [getattr(copy, f) for f in fields] == [getattr(native, f) for f in fields]
    ramp_mean = RAMP[22:42, 14:34].mean()  # what a centre 20x20 crop of the half-size ramp averages to
    for index, (_, _, num_frames) in enumerate(TREE[split][2]):
        a, b = native[index]["clip"].float(), copy[index]["clip"].float()
        expected = ((np.arange(8) + 0.5) * num_frames / 8).astype(int)
        for clip in (a, b):
            assert ((clip.mean(dim=(1, 2, 3)).numpy() - 10 - ramp_mean) / 8).round().tolist() == expected.tolist()
        # Same frames, same resize: the copy differs by its H.264 re-encoding only.
        assert (a - b).abs().mean() < 3 and (a - b).abs().max() <= 12


def test_corrupt_clip_is_missing_from_the_copy(prepared):
    out, _ = prepared
    with pytest.warns(UserWarning, match="1 of 3 listed videos are missing"):
        dataset = MA52Dataset(out, "train", num_frames=4, size=20, short_side=SHORT_SIDE)
    assert dataset.missing == [CORRUPT]


def test_bad_arguments(raw_root, prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(ValueError, match="short_side: 32 is larger than the prepared copy's 24"):
        MA52Dataset(out, "val", num_frames=4, size=28, short_side=32)
    with pytest.raises(ValueError, match="short_side"):
        prepare(raw_root, tmp_path / "odd", short_side=25)
    with pytest.raises(ValueError, match="workers"):
        prepare(raw_root, tmp_path / "none", workers=0)
    with pytest.raises(ValueError, match="already a prepared copy"):
        prepare(out, tmp_path / "again")
    with pytest.raises(SystemExit):
        main(["--data-root", str(raw_root), "--out", str(tmp_path / "x"), "--splits", "training"])
    assert not os.path.exists(tmp_path / "x")
