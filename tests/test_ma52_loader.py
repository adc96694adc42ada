"""The MA-52 loader on a small tree in the official format: real H.264 files written with
PyAV, CRLF lists (the test list without a final newline), both folder layouts, a corrupt
file, a missing list.

Frame sampling is checked by encoding each frame's index in its intensity
(8 + 8 * index, flat grey): after H.264 and the YUV round trip a frame's mean is within
+-3 of its code, so rounding recovers the index exactly."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.data.clips import collate_clips, sample_frame_indices
from models.data.labels import ACTION_NAMES, ACTION_TO_BODY
from models.data.ma52 import MA52Dataset, read_video_list, write_h264_mp4

OFFICIAL_LABEL_NAMES = Path(__file__).parent / "data" / "ma52_label_name.txt"  # MA-52's label_name.txt
HEIGHT, WIDTH = 32, 24  # portrait, like MA-52's 1080x1296 clips

# name, label, number of frames. The second name's body field (02) disagrees with its
# label's body (5): labels and bodies must come from the list, never from the name.
TRAIN = [("0003_01_0001.mp4", 9, 10), ("0012_02_0003.mp4", 40, 30), ("0042_03_0004.mp4", 25, 16)]
CORRUPT = ("0042_03_0005.mp4", 26)
VAL = [("0007_06_0001.mp4", 50, 20)]
TEST = [("test0000.mp4", 0, 12), ("test0001.mp4", 0, 5)]


def index_coded_frames(num_frames):
    frames = np.empty((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    for index in range(num_frames):
        frames[index] = 8 + 8 * index
    return frames


def decoded_indices(clip):
    """Frame index coded in each frame of a uint8 (T, H, W, 3) clip."""
    means = clip.float().mean(dim=(1, 2, 3))
    return ((means - 8) / 8).round().long().tolist()


def write_list(path, entries, final_newline=True):
    text = "\r\n".join(f"{name} {label}" for name, label, *_ in entries) + ("\r\n" if final_newline else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())


@pytest.fixture(scope="module")
def ma52_root(tmp_path_factory):
    """train: lists in the root, videos in train/; val: annotations/ and videos_val/;
    test: root list without final newline, videos in test/."""
    root = tmp_path_factory.mktemp("ma52")
    for folder, entries in (("train", TRAIN), ("videos_val", VAL), ("test", TEST)):
        (root / folder).mkdir()
        for name, _, num_frames in entries:
            write_h264_mp4(root / folder / name, index_coded_frames(num_frames))
    (root / "train" / CORRUPT[0]).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    write_list(root / "train_list_videos.txt", TRAIN + [CORRUPT])
    write_list(root / "annotations" / "val_list_videos.txt", VAL)
    write_list(root / "test_list_videos.txt", TEST, final_newline=False)
    return root


def test_label_names_match_the_official_file():
    rows = [line.split("\t") for line in OFFICIAL_LABEL_NAMES.read_text().splitlines() if line.strip()]
    assert [(int(index), name) for index, name in rows] == list(enumerate(ACTION_NAMES))


def test_lists_labels_bodies_and_subjects(ma52_root):
    train = MA52Dataset(ma52_root, "train", num_frames=4, size=16, short_side=24)
    assert train.list_path == ma52_root / "train_list_videos.txt"
    assert train.video_dir == ma52_root / "train"
    assert train.names == [name for name, *_ in TRAIN] + [CORRUPT[0]]
    assert train.labels == [9, 40, 25, 26]
    assert train.bodies == [1, 5, 3, 3]
    assert train.subjects == [3, 12, 42, 42]

    val = MA52Dataset(ma52_root, "val", num_frames=4, size=16, short_side=24)
    assert val.list_path == ma52_root / "annotations" / "val_list_videos.txt"
    assert val.video_dir == ma52_root / "videos_val"
    assert (val.labels, val.bodies, val.subjects) == ([50], [6], [7])

    test = MA52Dataset(ma52_root, "test", num_frames=4, size=16, short_side=24)
    assert test.names == ["test0000.mp4", "test0001.mp4"]  # no final newline: last row kept
    assert test.subjects == [-1, -1]


def test_item_fields_and_uint8_frames(ma52_root):
    dataset = MA52Dataset(ma52_root, "train", num_frames=16, size=16, short_side=24)
    assert dataset.prepared is None and dataset.source.startswith("original MA-52 videos")
    item = dataset[1]
    assert item["clip"].shape == (16, 16, 16, 3) and item["clip"].dtype == torch.uint8
    assert (item["label"], item["body"], item["subject"], item["index"]) == (40, ACTION_TO_BODY[40], 12, 1)
    assert item["clip"][0].float().mean().item() == pytest.approx(8 + 8 * sample_frame_indices(30, 16)[0], abs=3)


@pytest.mark.parametrize("position, num_frames", [(0, 10), (1, 30), (2, 16)])
def test_frames_sampled_uniformly_over_the_whole_clip(ma52_root, position, num_frames):
    dataset = MA52Dataset(ma52_root, "train", num_frames=16, size=16, short_side=24)
    # Centre of each of 16 equal segments: floor((i + 0.5) * L / 16).
    expected = [int((i + 0.5) * num_frames / 16) for i in range(16)]
    assert decoded_indices(dataset[position]["clip"]) == expected
    assert sample_frame_indices(num_frames, 16).tolist() == expected
    if num_frames < 16:
        assert len(set(expected)) == num_frames  # a short clip repeats frames, skips none


def test_resize_crop_and_flip(tmp_path):
    # One clip whose columns get brighter from left to right (landscape 48x32).
    frames = np.broadcast_to(np.linspace(20, 230, 48).astype(np.uint8)[None, None, :, None], (6, 32, 48, 3))
    (tmp_path / "train").mkdir()
    write_h264_mp4(tmp_path / "train" / "0001_00_0001.mp4", np.ascontiguousarray(frames))
    write_list(tmp_path / "train_list_videos.txt", [("0001_00_0001.mp4", 0)])

    evaluation = MA52Dataset(tmp_path, "train", num_frames=2, size=8, short_side=16)
    clip = evaluation[0]["clip"].float()  # (T, 8, 8, 3)
    assert clip.shape == (2, 8, 8, 3)
    # Short side 32 -> 16 gives 24x16; the centre crop keeps columns 8..15 of 24,
    # i.e. the middle third of the ramp: about 90..160.
    column_means = clip.mean(dim=(0, 1, 3))
    assert column_means[0] == pytest.approx(20 + 210 * 8.5 / 24, abs=12)
    assert column_means[-1] == pytest.approx(20 + 210 * 15.5 / 24, abs=12)
    assert torch.equal(evaluation[0]["clip"], evaluation[0]["clip"])  # centre crop: deterministic

    training = MA52Dataset(tmp_path, "train", num_frames=2, size=8, short_side=16, training=True)
    torch.manual_seed(0)
    slopes, lefts = set(), set()
    for _ in range(24):
        crop = training[0]["clip"].float().mean(dim=(0, 1, 3))
        slopes.add(bool(crop[-1] > crop[0]))  # False: flipped
        lefts.add(round(float(crop.min()) / 10))
    assert slopes == {True, False}  # flipped and unflipped crops both occur
    assert len(lefts) > 2  # the crop position varies


def test_corrupt_video_is_skipped_counted_and_dropped(ma52_root):
    dataset = MA52Dataset(ma52_root, "train", num_frames=4, size=16, short_side=24)
    with pytest.warns(UserWarning, match=CORRUPT[0]):
        assert dataset[3] is None
    assert dataset.failed == [CORRUPT[0]]
    batch = collate_clips([dataset[index] for index in range(3)] + [None])
    assert batch["num_dropped"] == 1
    assert batch["clip"].shape == (3, 4, 16, 16, 3) and batch["clip"].dtype == torch.uint8
    assert batch["label"].tolist() == [9, 40, 25] and batch["subject"].tolist() == [3, 12, 42]
    assert batch["index"].tolist() == [0, 1, 2] and batch["body"].tolist() == [1, 5, 3]
    empty = collate_clips([None, None])
    assert empty["num_dropped"] == 2 and empty["clip"].shape[0] == 0 and empty["label"].numel() == 0


def test_dataloader_runs_through_a_corrupt_file(ma52_root):
    dataset = MA52Dataset(ma52_root, "train", num_frames=4, size=16, short_side=24)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_clips)
    with pytest.warns(UserWarning, match="unreadable"):
        batches = list(loader)
    assert sum(batch["num_dropped"] for batch in batches) == 1
    assert sum(batch["clip"].shape[0] for batch in batches) == 3


def test_missing_list_names_every_path_tried(ma52_root, tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        MA52Dataset(tmp_path, "train")
    message = str(error.value)
    assert str(tmp_path / "train_list_videos.txt") in message
    assert str(tmp_path / "annotations" / "train_list_videos.txt") in message


def test_missing_video_folder_names_every_path_tried(tmp_path):
    write_list(tmp_path / "val_list_videos.txt", VAL)
    with pytest.raises(FileNotFoundError) as error:
        MA52Dataset(tmp_path, "val")
    assert str(tmp_path / "val") in str(error.value) and str(tmp_path / "videos_val") in str(error.value)


def test_missing_videos(tmp_path):
    (tmp_path / "val").mkdir()
    write_list(tmp_path / "val_list_videos.txt", VAL)
    with pytest.raises(FileNotFoundError, match="none of the 1 videos"):
        MA52Dataset(tmp_path, "val")
    write_h264_mp4(tmp_path / "val" / VAL[0][0], index_coded_frames(3))
    write_list(tmp_path / "val_list_videos.txt", VAL + [("0007_06_0002.mp4", 51)])
    with pytest.warns(UserWarning, match="1 of 2 listed videos are missing"):
        dataset = MA52Dataset(tmp_path, "val", num_frames=2, size=16, short_side=24)
    assert dataset.missing == ["0007_06_0002.mp4"]
    with pytest.warns(UserWarning, match="0007_06_0002.mp4"):
        assert dataset[1] is None
    assert dataset[0] is not None


def test_list_parsing(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(b"a.mp4 3\r\n\r\nb.mp4\t51\r\nc.mp4 0")
    assert read_video_list(path) == (["a.mp4", "b.mp4", "c.mp4"], [3, 51, 0])
    path.write_bytes(b"a.mp4 3\nb.mp4\n")
    with pytest.raises(ValueError, match=r"list.txt:2"):
        read_video_list(path)
    path.write_bytes(b"a.mp4 52\n")
    with pytest.raises(ValueError, match="action id"):
        read_video_list(path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "training"}, "split"),
        ({"split": "train", "num_frames": 0}, "num_frames"),
        ({"split": "train", "size": 224, "short_side": 200}, "short_side"),
    ],
)
def test_bad_arguments(ma52_root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MA52Dataset(ma52_root, **kwargs)
