"""models/data/balanced.py: class-balanced (and person-balanced) batches under one and
several ranks."""

import numpy as np
import pytest

from models.data.balanced import ClassBalancedSampler, _Deck


def random_dataset(seed: int, classes: int = 13, persons: int = 9, size: int = 400):
    """Labels and persons drawn at random (unbalanced: some cells empty, some crowded)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, size), rng.integers(100, 100 + persons, size)


def batches_of(sampler) -> np.ndarray:
    indices = np.array(list(sampler))
    assert len(indices) == len(sampler) and len(indices) % sampler.batch_size == 0
    return indices.reshape(-1, sampler.batch_size)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size,m", [(12, 4), (12, 2), (6, 3)])
def test_every_batch_has_m_of_each_class_and_ranks_are_disjoint(world_size, batch_size, m):
    labels, _ = random_dataset(world_size * 7 + m)
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            sampler = ClassBalancedSampler(labels, batch_size, m, rank=rank, world_size=world_size, seed=5)
            sampler.set_epoch(epoch)
            batches = batches_of(sampler)
            assert len(batches) == (len(labels) // world_size) // batch_size  # DistributedSampler's count
            for batch in batches:
                _, counts = np.unique(labels[batch], return_counts=True)
                assert counts.tolist() == [m] * (batch_size // m)
                assert len(set(batch.tolist())) == batch_size  # every share holds >= m of each class
            seen.append(set(batches.ravel().tolist()))
        for a in range(world_size):
            for b in range(a + 1, world_size):
                assert not seen[a] & seen[b], f"ranks {a} and {b} share items in epoch {epoch}"


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_balanced_epoch_visits_every_item_once_as_a_random_order_does(world_size):
    # 13 classes x 24 items; per rank 156 // 12 = 13 batches of 3 classes x 4: each class 3 times.
    labels = np.random.default_rng(world_size).permutation(np.repeat(np.arange(13), 24))
    for epoch in (0, 1):
        visited = []
        for rank in range(world_size):
            sampler = ClassBalancedSampler(labels, 12, 4, rank=rank, world_size=world_size, seed=2)
            sampler.set_epoch(epoch)
            visited += list(sampler)
        assert sorted(visited) == list(range(len(labels)))


@pytest.mark.parametrize("cards", [1, 2, 5, 13])
def test_the_deck_deals_distinct_cards_and_every_card_equally_often(cards):
    for k in range(1, cards + 1):
        deck, counts = _Deck(list(range(cards)), np.random.default_rng(k)), np.zeros(cards, dtype=int)
        for _ in range(3 * cards):
            hand = deck.deal(k)
            assert len(set(hand)) == k
            counts[hand] += 1
            assert counts.max() - counts.min() <= 1


def test_person_mode_gives_each_person_several_classes_with_m_items():
    labels, subjects = random_dataset(3, classes=6, persons=12, size=600)
    batch_size, m, persons = 16, 2, 4
    seen = []
    for rank in range(2):
        sampler = ClassBalancedSampler(
            labels, batch_size, m, rank=rank, world_size=2, seed=1, subjects=subjects, persons_per_batch=persons
        )
        for batch in batches_of(sampler):
            people, per_person = np.unique(subjects[batch], return_counts=True)
            assert len(people) == persons and per_person.tolist() == [batch_size // persons] * persons
            for person in people:
                _, counts = np.unique(labels[batch][subjects[batch] == person], return_counts=True)
                assert counts.tolist() == [m] * (batch_size // persons // m)
        seen.append(set(subjects[list(sampler)].tolist()))
    assert not seen[0] & seen[1]  # each person's clips go to one rank


def test_epochs_are_seeded():
    labels, _ = random_dataset(0)
    sampler = ClassBalancedSampler(labels, 8, 2, seed=3)
    first = list(sampler)
    assert list(sampler) == first  # the same epoch again gives the same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    other = ClassBalancedSampler(labels, 8, 2, seed=4)
    assert list(other) != first


def test_a_rare_class_repeats_its_items_instead_of_breaking_the_batch():
    labels = np.array([0] * 30 + [1] * 30 + [2])  # class 2 has one item
    sampler = ClassBalancedSampler(labels, 6, 2, seed=0)
    for batch in batches_of(sampler):
        _, counts = np.unique(labels[batch], return_counts=True)
        assert counts.tolist() == [2] * 3


def test_impossible_compositions_are_refused_naming_the_argument():
    labels, subjects = random_dataset(1, classes=3)
    with pytest.raises(ValueError, match="batch_size: expected a multiple of m = 4"):
        ClassBalancedSampler(labels, 10, 4)
    with pytest.raises(ValueError, match="m: batches of 8 with m = 2 need 4 classes"):
        ClassBalancedSampler(labels, 8, 2)
    with pytest.raises(ValueError, match="persons_per_batch: 20 persons"):
        ClassBalancedSampler(labels, 40, 2, subjects=subjects, persons_per_batch=20)
    with pytest.raises(ValueError, match="rank: expected an integer in \\[0, 2\\)"):
        ClassBalancedSampler(labels, 6, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="subjects and persons_per_batch"):
        ClassBalancedSampler(labels, 6, 2, subjects=subjects)
