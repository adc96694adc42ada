"""The DFEW loader on a small tree in the release format: `EmoLabel_DataSplit/{train,test}
(single-labeled)/set_N.csv` split files (header `video_name,label`, labels 1..7) and H.264
clips named by their clip number in `Clip/clip_224x224/part_N/`, written with PyAV.

Frame sampling is checked as in test_ma52_loader: each frame's index is coded in its flat
grey intensity (8 + 8 * index), which survives H.264 within +-3."""

from __future__ import annotations

import pytest
import torch
from test_ma52_loader import decoded_indices, index_coded_frames

from models.data.clips import collate_clips, sample_frame_indices
from models.data.dfew import LABELS, DFEWDataset, read_split_file
from models.data.ma52 import write_h264_mp4
from models.errors import DatasetError, InputNotFound

# clip number -> (DFEW label 1..7, frames); clips 1-3 in part_1, 4-5 in part_2.
CLIPS = {1: (1, 10), 2: (7, 20), 3: (3, 16), 4: (4, 12), 5: (2, 18)}
FOLDS = {1: ([1, 2, 3], [4, 5]), 2: ([3, 4, 5], [1, 2])}


def write_split(path, clips):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("video_name,label\n" + "".join(f"{number},{CLIPS[number][0]}\n" for number in clips))


@pytest.fixture(scope="module")
def dfew_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dfew")
    for number, (_, frames) in CLIPS.items():
        folder = root / "Clip" / "clip_224x224" / f"part_{1 + (number > 3)}"
        folder.mkdir(parents=True, exist_ok=True)
        write_h264_mp4(folder / f"{number:05d}.mp4", index_coded_frames(frames))
    for fold, (train, test) in FOLDS.items():
        write_split(root / "EmoLabel_DataSplit" / "train(single-labeled)" / f"set_{fold}.csv", train)
        write_split(root / "EmoLabel_DataSplit" / "test(single-labeled)" / f"set_{fold}.csv", test)
    return root


@pytest.mark.parametrize("fold", [1, 2])
def test_folds_list_their_clips_and_labels(dfew_root, fold):
    train, test = FOLDS[fold]
    for split, numbers in (("train", train), ("val", test), ("test", test)):
        dataset = DFEWDataset(dfew_root, split, fold, num_frames=4, size=16)
        assert dataset.clips == numbers
        assert dataset.labels == [CLIPS[number][0] - 1 for number in numbers]
        assert not dataset.missing
    assert len(LABELS) == 7


def test_items_sample_frames_uniformly_and_crop(dfew_root):
    dataset = DFEWDataset(dfew_root, "train", 1, num_frames=8, size=16)
    for index, number in enumerate(dataset.clips):
        item = dataset[index]
        assert item["clip"].shape == (8, 16, 16, 3) and item["clip"].dtype == torch.uint8
        assert decoded_indices(item["clip"]) == sample_frame_indices(CLIPS[number][1], 8).tolist()
        assert (item["label"], item["body"], item["subject"], item["index"]) == (CLIPS[number][0] - 1, -1, -1, index)
    training = DFEWDataset(dfew_root, "train", 1, num_frames=4, size=16, training=True, repeats=2)
    batch = collate_clips([training[(0, 11)], training[(1, 12)]])
    assert batch["clip"].shape == (4, 4, 16, 16, 3)
    assert batch["label"].tolist() == [0, 0, 6, 6]


def test_missing_inputs_name_what_was_tried(dfew_root, tmp_path):
    with pytest.raises(InputNotFound, match=r"fold 3 train file not found; tried .*set_3\.csv"):
        DFEWDataset(dfew_root, "train", 3)
    with pytest.raises(InputNotFound, match="DFEW root"):
        DFEWDataset(tmp_path / "absent", "train", 1)
    with pytest.raises(ValueError, match=r"fold: expected an int in 1..5, got 6"):
        DFEWDataset(dfew_root, "train", 6)
    lonely = tmp_path / "lonely"
    write_split(lonely / "train(single-labeled)" / "set_1.csv", [1])
    with pytest.raises(InputNotFound, match="none of the 1 clips"):
        DFEWDataset(lonely, "train", 1)


def test_a_listed_clip_without_video_warns_and_is_dropped(tmp_path):
    root = tmp_path / "partial"
    (root / "Clip").mkdir(parents=True)
    for number in (1, 2):
        write_h264_mp4(root / "Clip" / f"{number}.mp4", index_coded_frames(CLIPS[number][1]))  # unpadded names
    write_split(root / "EmoLabel_DataSplit" / "train(single-labeled)" / "set_1.csv", [1, 2])
    path = root / "EmoLabel_DataSplit" / "train(single-labeled)" / "set_1.csv"
    path.write_text(path.read_text() + "9,5\n")
    with pytest.warns(UserWarning, match=r"1 of 3 listed clips have no video"):
        dataset = DFEWDataset(root, "train", 1, num_frames=4, size=16)
    with pytest.warns(UserWarning, match="skipping clip 9"):
        assert dataset[2] is None
    assert dataset.failed == [9]


@pytest.mark.parametrize(
    "text,message",
    [
        ("name,label\n1,1\n", "expected the header 'video_name,label'"),
        ("video_name,label\n1,8\n", r":2: expected a label in 1..7, got 8"),
        ("video_name,label\n\n1\n", r":3: expected '<clip number>,<label 1-7>'"),
        ("video_name,label\n", "lists no clip"),
    ],
)
def test_malformed_split_files_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "set_1.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_split_file(path)


def test_split_file_with_bom_and_crlf(tmp_path):
    path = tmp_path / "set_1.csv"
    path.write_bytes("\ufeffvideo_name,label\r\n12,2\r\n7,7".encode())
    assert read_split_file(path) == ([12, 7], [1, 6])


def test_two_videos_for_one_clip_are_refused(tmp_path):
    root = tmp_path / "twice"
    for folder, name in (("part_1", "00004.mp4"), ("part_2", "4.avi")):
        (root / "Clip" / folder).mkdir(parents=True)
        (root / "Clip" / folder / name).write_bytes(b"")
    write_split(root / "train(single-labeled)" / "set_1.csv", [4])
    with pytest.raises(DatasetError, match="DFEW clip 4 has two videos"):
        DFEWDataset(root, "train", 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expression_metrics_match_scikit_learn(seed):
    import warnings

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

    from models.evaluation.expression import expression_metrics

    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 6, (40,), generator=generator)  # class 6 never true, sometimes predicted
    scores = torch.randn(40, 7, generator=generator)
    scores[torch.arange(20), labels[:20]] += 3  # half the clips lean to their class
    metrics = expression_metrics(scores, labels, 7)
    predicted = scores.argmax(dim=1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about predicted classes absent from the labels
        expected_uar = balanced_accuracy_score(labels.numpy(), predicted)
    assert metrics["war"] == pytest.approx(accuracy_score(labels.numpy(), predicted), abs=1e-12)
    assert metrics["uar"] == pytest.approx(expected_uar, abs=1e-12)
    assert metrics["confusion"].tolist() == confusion_matrix(labels.numpy(), predicted, labels=range(7)).tolist()
    with pytest.raises(ValueError, match=r"expected \(N, 7\) and \(N,\)"):
        expression_metrics(scores[:, :5], labels, 7)


def test_trains_hdf_on_a_dfew_fold(dfew_root, tmp_path):
    """`--dataset dfew` takes HDF's recipe (configs/hdf_dfew.json) with tiny overrides; runs on
    DFEW report WAR and UAR and keep the best checkpoint by UAR."""
    from models import train
    from models.training.checkpointing import load_checkpoint

    summary = train.main(
        [
            "--dataset",
            "dfew",
            "--data-root",
            str(dfew_root),
            "--dfew-fold",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--preset",
            '{"name": "test", "depth_factor": 0.2}',
            "--num-frames",
            "4",
            "--crop-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--no-progress",
            "--warmup-epochs",
            "0",
        ]
    )
    assert set(summary["test"]) == {"war", "uar"} and 0 <= summary["test"]["uar"] <= 1
    assert summary["best"] == {"epoch": 1, "val_uar": summary["history"][0]["val_uar"]}
    config = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert (config["model"], config["optimizer"], config["dfew_fold"], config["label_smoothing"]) == (
        "hdf",
        "sam_adamw",
        2,
        0.1,
    )
    from models import evaluate
    from models.errors import CheckpointError

    with pytest.raises(CheckpointError, match="a DFEW run"):
        evaluate.main([str(tmp_path / "run" / "best.pt")])
