"""MA-52 metrics (models/evaluation/metrics.py) against values computed by hand, and the label space.

Exact comparisons (tolerance 1e-12): every metric is a ratio of small integer counts."""

import csv

import numpy as np
import pytest
import torch

from models.data.labels import ACTION_TO_BODY, BODY_FIRST_ACTION, NUM_ACTIONS, actions_of_body, body_of_action
from models.evaluation.metrics import compute_metrics, top_k_actions, write_prediction_csv


def scores_with_ranking(rankings):
    """(N, 52) scores whose descending order starts with each row's given action ids."""
    scores = torch.zeros(len(rankings), NUM_ACTIONS)
    for row, ranking in enumerate(rankings):
        for position, action in enumerate(ranking):
            scores[row, action] = 10.0 - position
    return scores


# Labels, and each row's top-5 actions (first = prediction).
LABELS = [0, 5, 11, 11, 24, 48]
RANKINGS = [
    [0, 1, 2, 3, 4],  # correct
    [6, 5, 7, 8, 9],  # wrong (same body), label second: action top-5 hit
    [11, 12, 13, 14, 15],  # correct
    [12, 30, 31, 40, 41],  # wrong (same body), label absent; body 2 only from action 12
    [24, 25, 26, 27, 28],  # correct
    [0, 1, 2, 3, 4],  # wrong body; class 48 is never predicted by anyone
]


def test_metrics_match_hand_computed_values():
    result = compute_metrics(scores_with_ranking(RANKINGS), torch.tensor(LABELS))
    # Actions: predictions 0, 6, 11, 12, 24, 0 -> 3 of 6 right.
    # Per-class F1 over the 7 classes seen (0, 5, 6, 11, 12, 24, 48):
    # 0: tp 1 fp 1 -> 2/3; 5: fn 1 -> 0; 6: fp 1 -> 0; 11: tp 1 fn 1 -> 2/3; 12: 0;
    # 24: 1; 48 (never predicted): 0  -> macro 7/3 / 7 = 1/3.
    # Bodies: labels 0 1 2 2 3 6, predictions 0 1 2 2 3 0 -> 5 of 6 right;
    # 0: tp 1 fp 1 -> 2/3; 1, 2, 3: 1; 6: 0 -> macro (2/3 + 3) / 5 = 11/15.
    expected = {
        "action_top1": 3 / 6,
        "action_top5": 4 / 6,
        "body_top1": 5 / 6,
        "body_top5": 5 / 6,
        "action_f1_macro": 1 / 3,
        "action_f1_micro": 3 / 6,
        "body_f1_macro": 11 / 15,
        "body_f1_micro": 5 / 6,
        "f1_mean": (1 / 3 + 1 / 2 + 11 / 15 + 5 / 6) / 4,
        "num_samples": 6,
    }
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def test_metrics_accept_numpy_and_probabilities():
    scores = scores_with_ranking(RANKINGS)
    from_tensor = compute_metrics(scores, torch.tensor(LABELS))
    from_numpy = compute_metrics(torch.softmax(scores, 1).numpy(), np.array(LABELS))
    assert from_numpy == pytest.approx(from_tensor)


def test_perfect_and_single_class_predictions():
    labels = torch.arange(NUM_ACTIONS)
    perfect = compute_metrics(torch.eye(NUM_ACTIONS), labels)
    assert all(perfect[key] == 1.0 for key in perfect if key != "num_samples")
    # Everyone predicted as action 0: 1 of 52 right; macro F1 over 52 classes: only
    # class 0 scores (tp 1, fp 51: F1 = 2 / 53).
    constant = compute_metrics(scores_with_ranking([[0, 1, 2, 3, 4]] * NUM_ACTIONS), labels)
    assert constant["action_top1"] == pytest.approx(1 / 52)
    assert constant["action_top5"] == pytest.approx(5 / 52)
    assert constant["action_f1_macro"] == pytest.approx(2 / 53 / 52)
    assert constant["body_top1"] == pytest.approx(5 / 52)  # the 5 actions of body 0


def test_ties_go_to_the_lower_action_id():
    scores = torch.zeros(2, NUM_ACTIONS)
    scores[1, [7, 3, 40]] = 1.0
    assert top_k_actions(scores, 5).tolist() == [[0, 1, 2, 3, 4], [3, 7, 40, 0, 1]]
    assert compute_metrics(scores, torch.tensor([0, 3]))["action_top1"] == 1.0


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        (torch.zeros(3, 51), torch.zeros(3, dtype=torch.long), "action_scores"),
        (torch.zeros(3, 52), torch.zeros(4, dtype=torch.long), "labels"),
        (torch.zeros(0, 52), torch.zeros(0, dtype=torch.long), "at least one"),
        (torch.zeros(2, 52), torch.tensor([0, 52]), "action_ids"),
        (torch.full((2, 52), float("nan")), torch.tensor([0, 1]), "finite"),
    ],
)
def test_metrics_reject_bad_input(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(scores, labels)


def test_prediction_csv_is_in_challenge_format(tmp_path):
    names = [f"test{index:04d}.mp4" for index in range(len(RANKINGS))]
    path = tmp_path / "prediction.csv"
    write_prediction_csv(path, names, scores_with_ranking(RANKINGS))
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == (["vid"] + [f"action_pred_{i}" for i in range(1, 6)] + [f"body_pred_{i}" for i in range(1, 6)])
    assert [row[0] for row in rows[1:]] == names
    for row, ranking in zip(rows[1:], RANKINGS):
        assert [int(value) for value in row[1:6]] == ranking
        assert [int(value) for value in row[6:]] == [ACTION_TO_BODY[action] for action in ranking]
    assert not (tmp_path / "prediction.csv.tmp").exists()
    with pytest.raises(ValueError, match="names"):
        write_prediction_csv(path, names[:-1], scores_with_ranking(RANKINGS))


def test_body_of_action_ranges():
    # SPEC §6: 0 body 0-4, 1 head 5-10, 2 upper limb 11-23, 3 lower limb 24-31,
    # 4 body-hand 32-37, 5 head-hand 38-47, 6 leg-hand 48-51.
    ranges = [(0, 4), (5, 10), (11, 23), (24, 31), (32, 37), (38, 47), (48, 51)]
    expected = [body for body, (first, last) in enumerate(ranges) for _ in range(first, last + 1)]
    assert list(ACTION_TO_BODY) == expected
    assert [actions_of_body(body) for body in range(7)] == [range(a, b + 1) for a, b in ranges]
    assert list(BODY_FIRST_ACTION) == [first for first, _ in ranges]
    ids = torch.tensor([[0, 4, 5], [10, 11, 51]])
    assert body_of_action(ids).tolist() == [[0, 0, 1], [1, 2, 6]]
    assert body_of_action(np.array([23, 24, 31, 32])).tolist() == [2, 3, 3, 4]
    assert body_of_action(47) == 5 and body_of_action(48) == 6
    for bad in (-1, 52, torch.tensor([3, 52])):
        with pytest.raises(ValueError, match="action_ids"):
            body_of_action(bad)
    with pytest.raises(TypeError, match="action_ids"):
        body_of_action(torch.tensor([1.0]))
