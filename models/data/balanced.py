"""Class-balanced batches for metric-learning losses such as GIRL: every batch holds `m`
items of each of `batch_size / m` classes, so that an anchor finds same-class partners in
its group (with random batches of 16 out of 52 classes almost none does).

`ClassBalancedSampler` is a drop-in for `DistributedSampler`: it yields this rank's dataset
indices for one epoch, `batch_size` consecutive indices per batch (use it with a DataLoader
of that `batch_size` and `drop_last=True`), and `set_epoch` redraws the epoch. Everything is
a function of (`seed`, epoch, rank):
- the ranks get disjoint shares of the data: in class mode each class's items are dealt
  out to the ranks (a permutation drawn from (`seed`, epoch), the same on every rank), in
  person mode each person's items go to one rank;
- each rank composes its batches from its share only: `classes_per_batch` distinct classes,
  `m` items of each, taken from a shuffled pool of that class's share; a pool that runs out
  is reshuffled and reused, so a rare class repeats its items (within a batch too when its
  share has fewer than `m`) rather than being left out.
- classes (and persons) are dealt from a deck, a shuffled list of all of them followed by a
  new shuffle when it runs out: within an epoch every class comes up equally often (to one
  draw), so a balanced dataset's epoch visits every item once, as a random order does.
  (Classes drawn independently per batch left 12-19% of the main job's clips unseen in an
  epoch and gave some classes no clip, others twice their share.)
- person mode (`subjects` and `persons_per_batch` given, for GIRL's subject groups): a batch
  holds `persons_per_batch` distinct persons, each with `batch_size / persons_per_batch`
  items made of `m` items of each of some of that person's classes, so every person group
  has same-class partners.

An epoch has as many batches as `DistributedSampler(drop_last=True)` would give:
`(len(labels) // world_size) // batch_size`.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class ClassBalancedSampler(Sampler):
    """`m` items of each of `batch_size / (m * persons_per_batch)` classes per batch (per
    person in person mode); see the module docstring."""

    def __init__(
        self,
        labels,
        batch_size: int,
        m: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        subjects=None,
        persons_per_batch: int | None = None,
    ):
        labels = np.asarray(labels, dtype=np.int64)
        for name, value in (("batch_size", batch_size), ("m", m), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"labels: expected a non-empty list of class ids, got shape {labels.shape}")
        if (subjects is None) != (persons_per_batch is None):
            raise ValueError(
                "subjects and persons_per_batch: give both (person mode) or neither (class mode), got "
                f"subjects={'given' if subjects is not None else None}, "
                f"persons_per_batch={persons_per_batch!r}"
            )
        persons = 1 if persons_per_batch is None else persons_per_batch
        if isinstance(persons, bool) or not isinstance(persons, int) or persons < 1:
            raise ValueError(f"persons_per_batch: expected a positive integer, got {persons!r}")
        if batch_size % (persons * m):
            what = f"persons_per_batch x m = {persons} x {m}" if subjects is not None else f"m = {m}"
            raise ValueError(f"batch_size: expected a multiple of {what}, got {batch_size}")
        if subjects is not None:
            subjects = np.asarray(subjects, dtype=np.int64)
            if subjects.shape != labels.shape:
                raise ValueError(
                    f"subjects: expected one person id per label ({labels.size}), got shape {subjects.shape}"
                )
        self.labels, self.subjects = labels, subjects
        self.batch_size, self.m, self.persons_per_batch = batch_size, m, persons
        self.classes_per_batch = batch_size // (persons * m)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.num_batches = (labels.size // world_size) // batch_size
        self._check_share_suffices()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        cells = self._rank_cells(self.epoch)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 0xBA1A])
        pools = {key: [] for key in cells}
        persons = sorted({person for person, _ in cells})
        classes_of = {person: sorted(c for p, c in cells if p == person) for person in persons}
        # Persons that can fill their part of a batch with distinct classes.
        usable = _Deck([p for p in persons if len(classes_of[p]) >= self.classes_per_batch], rng)
        class_decks = {person: _Deck(classes_of[person], rng) for person in persons}
        indices = []
        for _ in range(self.num_batches):
            for person in usable.deal(self.persons_per_batch):
                for label in class_decks[person].deal(self.classes_per_batch):
                    indices.extend(self._take(pools, cells, (person, label), rng))
        return iter(indices)

    def _take(self, pools: dict, cells: dict, key, rng) -> list[int]:
        pool = pools[key]
        while len(pool) < self.m:
            # A refill puts the items still in the pool last, so a batch repeats an item only
            # when the class's share has fewer than m.
            fresh = rng.permutation(cells[key]).tolist()
            pool.extend([i for i in fresh if i not in pool] + [i for i in fresh if i in pool])
        taken, pools[key] = pool[: self.m], pool[self.m :]
        return taken

    def _rank_cells(self, epoch: int) -> dict:
        """This rank's share: `{(person, class): indices}` (person 0 for all in class mode)."""
        shared = np.random.default_rng([self.seed, epoch, 0x5EA1])  # the same deal on every rank
        cells: dict = {}
        if self.subjects is None:
            for label in np.unique(self.labels):
                members = np.flatnonzero(self.labels == label)
                share = shared.permutation(members)[self.rank :: self.world_size]
                if share.size:
                    cells[(0, int(label))] = share
            return cells
        persons = shared.permutation(np.unique(self.subjects))[self.rank :: self.world_size]
        for person in persons:
            mine = self.subjects == person
            for label in np.unique(self.labels[mine]):
                cells[(int(person), int(label))] = np.flatnonzero(mine & (self.labels == label))
        return cells

    def _check_share_suffices(self) -> None:
        """Every rank must be able to compose its batches whatever the epoch's deal: checked
        on the worst case (class mode: only the classes with an item for every rank count;
        person mode: a rank dealt the fewest persons, all the unusable ones among them)."""
        if self.num_batches == 0:
            raise ValueError(
                f"batch_size: {self.batch_size} per rank x {self.world_size} rank(s) exceeds the "
                f"{self.labels.size} items"
            )
        if self.subjects is None:
            counts = np.bincount(self.labels)
            held = int((counts >= self.world_size).sum())  # classes every rank holds
            if held < self.classes_per_batch:
                raise ValueError(
                    f"m: batches of {self.batch_size} with m = {self.m} need {self.classes_per_batch} "
                    f"classes on every rank, but only {held} classes have >= {self.world_size} items"
                )
            return
        classes_per_person = sorted(np.unique(self.labels[self.subjects == p]).size for p in np.unique(self.subjects))
        usable = sum(count >= self.classes_per_batch for count in classes_per_person)
        worst = len(classes_per_person) // self.world_size - (len(classes_per_person) - usable)
        if worst < self.persons_per_batch:
            raise ValueError(
                f"persons_per_batch: {self.persons_per_batch} persons per batch, each with {self.classes_per_batch} "
                f"classes x m = {self.m} items, need that many persons with >= {self.classes_per_batch} classes "
                f"on every one of {self.world_size} rank(s); {usable} of {len(classes_per_person)} persons have them"
            )


class _Deck:
    """Deals distinct cards `k` at a time (`k <= len(cards)`) from a line of shuffles of
    `cards`, a new shuffle joining when the line runs out; a card that would repeat within a
    deal waits first in line for the next deal. A shuffle is thus dealt out before the next
    one starts: after any number of deals, two cards' counts differ by at most one."""

    def __init__(self, cards: list, rng: np.random.Generator):
        self.cards, self.rng, self.line = list(cards), rng, []

    def deal(self, k: int) -> list:
        dealt, waiting = [], []
        while len(dealt) < k:
            if not self.line:
                self.line = self.rng.permutation(self.cards).tolist()
            card = self.line.pop(0)
            (waiting if card in dealt else dealt).append(card)
        self.line = waiting + self.line
        return dealt
