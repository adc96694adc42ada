"""models/modelling/girl_diagnostics.py against small cases counted by hand."""

import math

import pytest
import torch

from models.modelling.girl_diagnostics import girl_group_diagnostics


def test_positive_fraction_and_group_size_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 3])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    # Group 0 {0, 0, 1}: anchors 0 and 1 have a positive, anchor 2 none; group 1 {1, 2, 0}: none;
    # group 2 {3}: a single member (left out by GIRL, and no partner).
    stats = girl_group_diagnostics(labels, groups, num_groups=4)
    assert stats["positive_fraction"].item() == pytest.approx(2 / 7)
    assert stats["group_size"].item() == pytest.approx(3.0)  # groups 0 and 1; 2 (size 1) and 3 (empty) left out
    assert stats["group_size"].dtype == torch.float32 and stats["positive_fraction"].dim() == 0


def test_every_anchor_has_a_positive_when_groups_hold_pairs():
    labels = torch.tensor([5, 5, 7, 7, 5, 5])
    groups = torch.tensor([1, 1, 0, 0, 2, 2])
    stats = girl_group_diagnostics(labels, groups, num_groups=3)
    assert stats["positive_fraction"].item() == 1.0 and stats["group_size"].item() == 2.0


def test_no_group_girl_counts():
    stats = girl_group_diagnostics(torch.tensor([1, 1]), torch.tensor([0, 1]), num_groups=2)
    assert stats["positive_fraction"].item() == 0.0 and stats["group_size"].item() == 0.0


def test_random_cases_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = int(torch.randint(1, 30, (), generator=generator))
        labels = torch.randint(0, 4, (batch,), generator=generator)
        groups = torch.randint(0, 5, (batch,), generator=generator)
        with_positive = sum(
            any(labels[j] == labels[i] and groups[j] == groups[i] for j in range(batch) if j != i) for i in range(batch)
        )
        sizes = [int((groups == g).sum()) for g in range(5) if (groups == g).sum() >= 2]
        stats = girl_group_diagnostics(labels, groups, num_groups=5)
        assert stats["positive_fraction"].item() == pytest.approx(with_positive / batch)
        assert stats["group_size"].item() == pytest.approx(sum(sizes) / len(sizes) if sizes else 0.0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="labels and group_index"):
        girl_group_diagnostics(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)


def test_the_loss_reports_the_group_risk_variance_computed_by_hand():
    from models.modelling.piumr import PIUmrLoss

    tau, eta = 1.0, 0.2
    # Group 0: anchors a, b of class 0 on the same unit vector, k of class 1 orthogonal to them;
    # group 1: two clips of different classes (no positive: risk 0).
    features = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 3])
    groups = torch.tensor([0, 0, 0, 1, 1])
    # Anchor a: partners b (cosine 1) and k (cosine 0); Gaussian emphasis on the cosine, scaled to mean one.
    r_b, r_k = math.exp(-0.5 * ((1 - eta) / eta) ** 2), math.exp(-0.5 * ((0 - eta) / eta) ** 2)
    w_b = 2 * r_b / (r_b + r_k)
    l_a = -w_b * (1 / tau - math.log(math.exp(1 / tau) + math.exp(0)))  # the same for b; k has no positive
    risks = [2 * l_a / 3, 0.0]
    mean = sum(risks) / 2
    variance = sum((r - mean) ** 2 for r in risks) / 2
    loss_fn = PIUmrLoss(num_groups=2, tau=tau, eta=eta, lambda_var=1.0)
    logits = torch.randn(5, 4, dtype=torch.float64)
    loss, parts = loss_fn(logits, features, labels, groups=groups, num_groups=2)
    assert parts["girl_var"].item() == pytest.approx(variance, rel=1e-9)
    assert parts["girl"].item() == pytest.approx(mean + variance, rel=1e-9)
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    assert loss.item() == pytest.approx(ce + mean + variance, rel=1e-9)
    assert parts["girl_positive_fraction"].item() == pytest.approx(2 / 5)
    assert parts["girl_group_size"].item() == pytest.approx(2.5)
    assert "girl_var" not in PIUmrLoss(girl=False)(logits, features, labels)[1]


def test_training_logs_the_diagnostics_and_balanced_person_batches_give_every_anchor_a_positive(tmp_path):
    from models import train
    from tests.train_helpers import tiny_args

    persons = 'synthetic_options={"persons_per_split": {"train": 2, "val": 2, "test": 2}}'
    # 2 persons per batch of 8, each with 2 classes x 2 clips: every subject group has pairs.
    balanced = train.main(
        tiny_args(tmp_path / "balanced", epochs=1, train_clips=8, eval_clips=4)
        + [
            "--no-test",
            "--set",
            persons,
            "--girl-groups",
            "subject",
            "--batch-sampler",
            "m_per_class",
            "--m-per-class",
            "2",
        ]
    )["history"][0]
    assert balanced["train_girl_positive_fraction"] == 1.0 and balanced["train_girl_group_size"] == 4.0
    assert balanced["train_girl_var"] >= 0.0
    plain = train.main(
        tiny_args(tmp_path / "plain", epochs=1, train_clips=8, eval_clips=4) + ["--no-test", "--no-girl"]
    )["history"][0]
    assert plain["train_girl_positive_fraction"] is None and plain["train_girl_var"] is None
    assert (tmp_path / "plain" / "curves.png").stat().st_size > 0
