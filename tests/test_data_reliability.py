"""Hostile and broken MA-52 inputs (issue 26): every bad file is reported and skipped, every
bad list line is refused with an error naming the file and line, nothing outside the data
root is ever opened, and the command line prints one error line instead of a traceback."""

import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from models import train
from models.data import decode
from models.data.clips import collate_clips
from models.data.ma52 import MA52Dataset, write_h264_mp4
from models.errors import DatasetError, InputNotFound, exit_on_input_error
from tests.train_helpers import REPO_ROOT, TRAIN_SCRIPT

GOOD = "0001_01_0001.mp4"
# name -> how the file is made; each must give a warning naming it and a None item.
BAD_FILES = {
    "0001_01_0002.mp4": "0-byte file",
    "0001_01_0003.mp4": "text file",
    "0001_01_0004.mp4": "2x1024 (aspect 512:1)",
    "0001_01_0005.mp4": "8448x4352 (over H.264's largest frame)",
}
ONE_FRAME = "0001_01_0006.mp4"


def write_blank_h264(path, width: int, height: int) -> None:
    """One black frame of any size, encoded without building it as RGB (cheap at 8K)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame(width, height, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "ma52"
    videos = root / "train"
    videos.mkdir(parents=True)
    write_h264_mp4(videos / GOOD, np.full((8, 32, 24, 3), 100, np.uint8))
    write_h264_mp4(videos / ONE_FRAME, np.full((1, 32, 24, 3), 60, np.uint8))
    bad = iter(BAD_FILES)
    (videos / next(bad)).write_bytes(b"")
    (videos / next(bad)).write_text("this is not a video\n" * 20)
    write_h264_mp4(videos / next(bad), np.full((16, 1024, 2, 3), 128, np.uint8))
    write_blank_h264(videos / next(bad), 8448, 4352)
    names = [GOOD, *BAD_FILES, ONE_FRAME]
    (root / "train_list_videos.txt").write_text("".join(f"{name} {i}\n" for i, name in enumerate(names)))
    return root


def test_every_bad_file_is_reported_and_skipped(hostile_root):
    dataset = MA52Dataset(hostile_root, "train", num_frames=4, size=16, short_side=24)
    items = []
    for index, name in enumerate(dataset.names):
        if name in BAD_FILES:
            with pytest.warns(UserWarning, match=f"skipping unreadable video .*{name}"):
                items.append(dataset[index])
            assert items[-1] is None, BAD_FILES[name]
        else:
            items.append(dataset[index])
    assert dataset.failed == list(BAD_FILES)
    one_frame = items[dataset.names.index(ONE_FRAME)]
    assert one_frame["clip"].shape == (4, 16, 16, 3)  # the single frame, repeated
    batch = collate_clips(items)
    assert batch["num_dropped"] == len(BAD_FILES) and batch["clip"].shape[0] == 2


def test_odd_frame_sizes_are_refused_before_any_large_allocation(hostile_root):
    for name, size in (("0001_01_0004.mp4", "2x1024"), ("0001_01_0005.mp4", "8448x4352")):
        with pytest.raises(decode.UnreadableVideo, match=f"frame size {size}"):
            decode.read_sampled_frames(hostile_root / "train" / name, 16, 256)
    assert decode.resized_shape(1296, 1080, 256) == (307, 256)  # MA-52's own clips pass the checks
    decode.check_frame_size(1296, 1080)


@pytest.mark.parametrize(
    "line, expected",
    [
        (f"{GOOD}", "expected '<name>.mp4 <action_id>'"),
        (f"{GOOD} 52", r"expected an action id in \[0, 52\), got 52"),
        (f"{GOOD} three", "expected '<name>.mp4 <action_id>'"),
        (f"{GOOD} 1.5", "expected '<name>.mp4 <action_id>'"),
        ("../../outside.mp4 1", "expected a video name inside the split's folder, got '../../outside.mp4'"),
        ("sub/../../outside.mp4 1", "expected a video name inside the split's folder"),
        ("/etc/passwd 1", "expected a video name inside the split's folder, got '/etc/passwd'"),
    ],
)
def test_a_bad_list_line_is_refused_naming_file_and_line(tmp_path, line, expected):
    root = tmp_path / "ma52"
    (root / "train").mkdir(parents=True)
    write_h264_mp4(root / "train" / GOOD, np.full((2, 32, 24, 3), 100, np.uint8))
    write_h264_mp4(tmp_path / "outside.mp4", np.full((2, 32, 24, 3), 200, np.uint8))  # what '../../' would reach
    (root / "train_list_videos.txt").write_text(f"{GOOD} 3\n{line}\n")
    with pytest.raises(DatasetError, match=rf"train_list_videos.txt:2: {expected}"):
        MA52Dataset(root, "train", num_frames=2, size=16, short_side=24)


def test_a_list_that_is_not_text_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train_list_videos.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="expected a UTF-8 text list"):
        MA52Dataset(tmp_path, "train")


def test_missing_root_and_missing_list_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(InputNotFound, match="does not exist"):
        MA52Dataset(tmp_path / "nowhere", "train")
    (tmp_path / "train").mkdir()
    args = ["--data-root", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        exit_on_input_error(lambda: train.main(args), "train.py")
    message = exit_info.value.code
    assert message.startswith("train.py: error: MA-52 train list not found; tried ") and "\n" not in message
    assert str(tmp_path / "annotations" / "train_list_videos.txt") in message


def test_the_train_script_prints_one_line_and_exits_nonzero_for_a_missing_root(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN_SCRIPT),
            "--data-root",
            str(missing),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"train.py: error: MA-52 root: expected a folder holding the lists and videos, but {missing} does not exist"
    ]


def test_a_loader_worker_survives_every_bad_file(hostile_root):
    dataset = MA52Dataset(hostile_root, "train", num_frames=4, size=16, short_side=24)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_clips)
    batches = list(loader)
    assert sum(batch["num_dropped"] for batch in batches) == len(BAD_FILES)
    assert sum(batch["clip"].shape[0] for batch in batches) == 2
