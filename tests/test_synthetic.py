"""The synthetic micro-action dataset: determinism, disjoint persons, class and body
coverage, person and action variation, export to MA-52 format read back by the loader,
and a cheap learnability check. Small sizes keep it fast."""

import time

import numpy as np
import pytest
import torch

from models.data.clips import collate_clips
from models.data.labels import ACTION_NAMES, ACTION_TO_BODY, NUM_ACTIONS
from models.data.ma52 import MA52Dataset
from models.data.synthetic import (
    ACTION_MOTIONS,
    SAME_PERSONS_SPLIT,
    SyntheticMicroActions,
    export_ma52,
    make_execution,
    make_person,
    render_clip,
)

SMALL = {"num_frames": 8, "size": 32}


def test_items_have_the_shared_interface():
    dataset = SyntheticMicroActions("train", persons_per_split={"train": 2}, **SMALL)
    assert len(dataset) == 2 * NUM_ACTIONS
    item = dataset[NUM_ACTIONS + 40]
    assert item["clip"].shape == (8, 32, 32, 3) and item["clip"].dtype == torch.float32
    assert (item["label"], item["body"], item["subject"], item["index"]) == (40, 5, 1, NUM_ACTIONS + 40)
    frames = dataset.frames(3)
    assert frames.shape == (8, 32, 32, 3) and frames.min() >= 0 and frames.max() <= 1
    np.testing.assert_array_equal(dataset[3]["clip"].numpy(), frames)  # the rendered frames, unnormalized
    batch = collate_clips([dataset[0], dataset[1]])
    assert batch["clip"].shape == (2, 8, 32, 32, 3) and batch["num_dropped"] == 0
    assert dataset.failed == []


def test_deterministic_from_the_seed():
    first = SyntheticMicroActions("val", seed=3, persons_per_split=2, **SMALL)
    again = SyntheticMicroActions("val", seed=3, persons_per_split=2, **SMALL)
    other = SyntheticMicroActions("val", seed=4, persons_per_split=2, **SMALL)
    for index in (0, 17, 60, 103):
        assert torch.equal(first[index]["clip"], again[index]["clip"])
        assert not torch.equal(first[index]["clip"], other[index]["clip"])
    assert torch.equal(first[5]["clip"], first[5]["clip"])  # no state carried between calls


def test_training_mode_draws_new_executions_and_flips():
    dataset = SyntheticMicroActions("train", persons_per_split=1, training=True, **SMALL)
    torch.manual_seed(0)
    draws = [dataset[7]["clip"] for _ in range(3)]
    torch.manual_seed(0)
    assert torch.equal(dataset[7]["clip"], draws[0])  # reproducible from torch's seed
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_persons_are_disjoint_across_splits():
    counts = {"train": 5, "val": 3, "test": 2}
    subjects = {
        split: set(SyntheticMicroActions(split, persons_per_split=counts, **SMALL).subjects) for split in counts
    }
    assert {split: len(persons) for split, persons in subjects.items()} == counts
    assert not subjects["train"] & subjects["val"] and not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]
    # Disjoint even when the splits are built with different person counts.
    bigger_val = set(SyntheticMicroActions("val", persons_per_split=40, **SMALL).subjects)
    assert not bigger_val & set(SyntheticMicroActions("train", persons_per_split=40, **SMALL).subjects)


def test_every_person_performs_every_class_with_its_body():
    dataset = SyntheticMicroActions("train", persons_per_split={"train": 3}, clips_per_person_class=2, **SMALL)
    assert len(dataset) == 3 * NUM_ACTIONS * 2
    for person in dataset.persons:
        labels = [label for label, subject in zip(dataset.labels, dataset.subjects) if subject == person]
        assert sorted(labels) == sorted(list(range(NUM_ACTIONS)) * 2)
    assert dataset.bodies == [ACTION_TO_BODY[label] for label in dataset.labels]
    assert len(ACTION_MOTIONS) == len(ACTION_NAMES) == NUM_ACTIONS
    # MA-52 names: SSSS_BB_CCCC.mp4 with the subject, the body and a running index.
    for name, subject, body in zip(dataset.names, dataset.subjects, dataset.bodies):
        assert name[:4] == f"{subject:04d}" and name[5:7] == f"{body:02d}" and name.endswith(".mp4")
    assert len(set(dataset.names)) == len(dataset)
    test = SyntheticMicroActions("test", persons_per_split=1, **SMALL)
    assert test.names[:2] == ["test0000.mp4", "test0001.mp4"]


def test_actions_persons_and_clips_all_look_different():
    dataset = SyntheticMicroActions("train", persons_per_split=2, clips_per_person_class=2, **SMALL)
    index = {
        (subject, label, position % 2): position
        for position, (subject, label) in enumerate(zip(dataset.subjects, dataset.labels))
    }
    person_a, person_b = dataset.persons
    actions = torch.stack(
        [torch.from_numpy(dataset.frames(index[(person_a, action, 0)])).flatten() for action in range(NUM_ACTIONS)]
    )
    distance = torch.cdist(actions, actions, p=1) / actions.shape[1]
    assert (distance + torch.eye(NUM_ACTIONS) > 1e-3).all()  # 52 distinct clips
    for action in (0, 9, 43):
        clip = dataset.frames(index[(person_a, action, 0)])
        same_person_again = np.abs(clip - dataset.frames(index[(person_a, action, 1)])).mean()
        other_person = np.abs(clip - dataset.frames(index[(person_b, action, 0)])).mean()
        assert 0 < same_person_again < other_person


@pytest.mark.parametrize("person_id", [0, 1000, 2001])
def test_every_action_is_a_visible_motion(person_id):
    """Each class differs from the same person sitting idle with the same execution (its
    sway and breathing), even the subtlest (finger movements, clenching a fist)."""
    person = make_person(0, person_id)
    execution = make_execution(person, np.random.default_rng(person_id))
    idle = render_clip(person, execution, None, 8, 32)
    assert np.abs(np.diff(idle, axis=0)).mean() > 0  # idle is not frozen
    for action in range(NUM_ACTIONS):
        change = np.abs(render_clip(person, execution, action, 8, 32) - idle).mean()
        assert change > 2e-4, ACTION_NAMES[action]


def test_generation_speed_is_reported(record_property, capsys):
    dataset = SyntheticMicroActions("train", num_frames=16, size=112, persons_per_split=1)
    dataset.frames(0)
    start = time.process_time()
    for index in range(20):
        dataset[index]
    milliseconds = (time.process_time() - start) / 20 * 1000
    record_property("synthetic_ms_per_16x112x112_clip", milliseconds)
    with capsys.disabled():
        print(f"\nsynthetic: {milliseconds:.1f} ms CPU per 16x112x112 clip")


def test_export_reads_back_through_the_ma52_loader(tmp_path):
    val = SyntheticMicroActions("val", persons_per_split=1, **SMALL)
    test = SyntheticMicroActions("test", persons_per_split=1, **SMALL)
    # 24 frames per video: MA52Dataset's 8-frame sampling picks frames 1, 4, 7, ..., the
    # same instants the dataset renders.
    export_ma52([val, test], tmp_path, frames_per_video=24, hide_test_labels=True)
    val_list = (tmp_path / "val_list_videos.txt").read_bytes()
    test_list = (tmp_path / "test_list_videos.txt").read_bytes()
    assert val_list.count(b"\r\n") == NUM_ACTIONS and val_list.endswith(b"\r\n")
    assert test_list.count(b"\r\n") == NUM_ACTIONS - 1 and test_list.endswith(b" 0")  # as the official

    loaded = MA52Dataset(tmp_path, "val", num_frames=8, size=32, short_side=32)
    assert (loaded.names, loaded.labels, loaded.subjects) == (val.names, val.labels, val.subjects)
    for index in (0, 25, 51):
        read_back = loaded[index]["clip"].float() / 255
        original = torch.from_numpy(val.frames(index))
        error = (read_back - original).abs().mean().item()
        neighbour = (read_back - torch.from_numpy(val.frames((index + 1) % NUM_ACTIONS))).abs().mean().item()
        assert error < 0.03 and error < neighbour / 2, (error, neighbour)
    loaded_test = MA52Dataset(tmp_path, "test", num_frames=8, size=32, short_side=32)
    assert loaded_test.names == test.names and set(loaded_test.labels) == {0}
    assert set(loaded_test.subjects) == {-1}


def test_export_from_keyword_arguments(tmp_path):
    export_ma52({"persons_per_split": 1, "num_frames": 2, "size": 16}, tmp_path, frames_per_video=2)
    for split in ("train", "val", "test"):
        assert len(MA52Dataset(tmp_path, split, num_frames=2, size=16, short_side=16)) == NUM_ACTIONS
    with pytest.raises(TypeError, match="source"):
        export_ma52(["not a dataset"], tmp_path)
    with pytest.raises(ValueError, match="training=False"):
        export_ma52(SyntheticMicroActions("val", persons_per_split=1, training=True, **SMALL), tmp_path)


def test_held_out_persons_are_recognizable_from_motion():
    """Learnability, cheaply: a nearest-class-mean classifier on coarse motion energy
    (|frame difference| pooled on a 4 x 8 x 8 grid), fitted on 8 persons and scored on 4
    unseen ones, reaches about 38% action and 76% body top-1 (chance: 2% and at best 25%)."""

    def motion_features(dataset):
        features = []
        for index in range(len(dataset)):
            motion = np.abs(np.diff(dataset.frames(index).mean(-1), axis=0))[:12]  # (12, 48, 48)
            features.append(motion.reshape(4, 3, 8, 6, 8, 6).mean(axis=(1, 3, 5)).ravel())
        return np.array(features), np.array(dataset.labels)

    train_x, train_y = motion_features(SyntheticMicroActions("train", num_frames=16, size=48, persons_per_split=8))
    test_x, test_y = motion_features(SyntheticMicroActions("test", num_frames=16, size=48, persons_per_split=4))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    centroids = np.stack([train_x[train_y == action].mean(0) for action in range(NUM_ACTIONS)])
    predicted = ((test_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    bodies = np.array(ACTION_TO_BODY)
    assert (predicted == test_y).mean() > 0.2
    assert (bodies[predicted] == bodies[test_y]).mean() > 0.5


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"split": "training"}, "split"),
        ({"split": "train", "persons_per_split": {"val": 3}}, "persons_per_split"),
        ({"split": "train", "persons_per_split": 1001}, "persons_per_split"),
        ({"split": "train", "clips_per_person_class": 0}, "clips_per_person_class"),
        ({"split": "train", "size": 8}, "size"),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        SyntheticMicroActions(**kwargs)


def test_same_persons_split_is_new_clips_of_training_persons():
    persons = {"train": 5, "val": 2, "test": 3}
    train = SyntheticMicroActions("train", persons_per_split=persons, **SMALL)
    same = SyntheticMicroActions(SAME_PERSONS_SPLIT, persons_per_split=persons, **SMALL)
    test = SyntheticMicroActions("test", persons_per_split=persons, **SMALL)
    assert same.persons == train.persons[:3] and len(same) == len(test)
    index = NUM_ACTIONS + 17  # both ordered by person, then action: the same person and action
    assert (same.subjects[index], same.labels[index]) == (train.subjects[index], train.labels[index])
    assert np.abs(same.frames(index) - train.frames(index)).max() > 0.1  # another execution
    again = SyntheticMicroActions(SAME_PERSONS_SPLIT, persons_per_split=persons, **SMALL)
    np.testing.assert_array_equal(same.frames(index), again.frames(index))  # fixed by the seed
