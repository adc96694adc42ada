"""Datasets and DataLoaders of a run, from its configuration.

- Workers return uint8 (MA-52) or float (synthetic) frames, already cropped and flipped;
  X3D's normalization runs on the device inside the step (`models.training.loop.model_step`).
- Batches come through pinned memory with non-blocking copies from persistent workers
  (`num_workers` per rank, default the cores available to the rank; `prefetch_factor`
  batches ahead each). Augmentation seeds come from the sampler, so an epoch's clips do not
  depend on the workers.
- `repeated_augmentation` k: each video is decoded once and gives k differently augmented
  clips of the batch (batch_size / k videos per step).
- `batch_sampler`: `random` batches, or `m_per_class`: class-balanced batches of
  `m_per_class` clips per class (`training_order`), which give GIRL same-class partners.
- Validation and test splits are sharded over the ranks without padding or duplicates
  (`ShardSampler`), so gathered predictions cover the split exactly once.
"""

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from models.data import MA52Dataset, SeededSampler, SyntheticMicroActions, collate_clips
from models.data.balanced import ClassBalancedSampler
from models.data.dfew import DFEWDataset
from models.errors import ConfigError
from models.training.config import TrainConfig
from models.training.distributed import DistInfo


def cores_per_rank() -> int:
    """CPU cores this process may use, shared evenly by the ranks on this node."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def num_workers(cfg: TrainConfig) -> int:
    return cores_per_rank() if cfg.num_workers is None else cfg.num_workers


def build_dataset(cfg: TrainConfig, split: str, train: bool):
    """The split of the configured dataset; `train` turns on training augmentation (random
    crop and flip, repeated `repeated_augmentation` times per decode)."""
    common = dict(
        split=split,
        num_frames=cfg.num_frames,
        size=cfg.crop_size,
        training=train,
        repeats=cfg.repeated_augmentation if train else 1,
    )
    if cfg.dataset == "synthetic":
        dataset = SyntheticMicroActions(**common, **cfg.synthetic_options)
    else:
        # Decoder threads only help on cores the workers leave idle.
        threads = max(1, cores_per_rank() // max(1, num_workers(cfg)))
        if cfg.dataset == "dfew":
            dataset = DFEWDataset(cfg.data_root, fold=cfg.dfew_fold, **common, decode_threads=threads)
        else:
            dataset = MA52Dataset(cfg.data_root, **common, decode_threads=threads)
    limit = cfg.max_train_clips if split == "train" else cfg.max_eval_clips
    if limit is not None and limit < len(dataset):
        # Evenly spaced clips keep every part of the list; items keep their original "index".
        dataset = KeyedSubset(dataset, np.unique(np.linspace(0, len(dataset) - 1, limit).round().astype(int)).tolist())
    return dataset


class KeyedSubset(Dataset):
    """torch's Subset for keys that may carry an augmentation seed: `(i, seed)` reads
    `(indices[i], seed)` (Subset would index its list with the tuple)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        return self.dataset[self.indices[index] if seed is None else (self.indices[index], seed)]

    def __len__(self) -> int:
        return len(self.indices)


class ShardSampler(Sampler):
    """Rank r of w takes items r, r+w, r+2w, ...: every item exactly once over the ranks
    (DistributedSampler pads with repeats, which would count some clips twice)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def training_order(dataset, cfg: TrainConfig, info: DistInfo, videos_per_batch: int) -> Sampler:
    """This rank's share of the training split per epoch: a random order (DistributedSampler),
    or class-balanced batches of `m_per_class` clips per class (models/data/balanced.py; with
    `girl_groups=subject`, `girl_num_groups` persons per batch, each with whole classes of m
    clips, so that every person group holds same-class partners). With repeated
    augmentation k, m / k videos per class each give k clips."""
    if cfg.batch_sampler == "random":
        return DistributedSampler(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    repeats = cfg.repeated_augmentation
    if cfg.m_per_class % repeats:
        raise ConfigError(
            f"config 'm_per_class': expected a multiple of repeated_augmentation ({repeats}), got {cfg.m_per_class}"
        )
    by_person = cfg.girl and cfg.girl_groups == "subject"
    try:
        return ClassBalancedSampler(
            item_attribute(dataset, "labels"),
            videos_per_batch,
            cfg.m_per_class // repeats,
            info.rank,
            info.world_size,
            cfg.seed,
            subjects=item_attribute(dataset, "subjects") if by_person else None,
            persons_per_batch=cfg.girl_num_groups if by_person else None,
        )
    except ValueError as error:
        raise ConfigError(
            f"config 'batch_sampler' m_per_class with m_per_class={cfg.m_per_class}, "
            f"{videos_per_batch} videos per batch and rank: {error}"
        ) from None


def item_attribute(dataset, name: str) -> list:
    """A per-item list (`labels`, `subjects`) of a dataset or of a KeyedSubset of one."""
    if isinstance(dataset, KeyedSubset):
        values = getattr(dataset.dataset, name)
        return [values[i] for i in dataset.indices]
    return getattr(dataset, name)


def build_loader(
    dataset, cfg: TrainConfig, info: DistInfo, train: bool, batch_size: int, persistent: bool = True
) -> DataLoader:
    """`batch_size` clips per step (with repeated augmentation k: batch_size / k videos)."""
    if train:
        batch_size //= cfg.repeated_augmentation
        sampler = SeededSampler(training_order(dataset, cfg, info, batch_size), cfg.seed, info.rank)
    else:
        sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    workers = num_workers(cfg)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_clips,
        drop_last=train,
        pin_memory=info.device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        # Its own generator: the worker base seeds it draws (whenever an iterator
        # starts) must not move the global RNG, which GIRL and TFAM use.
        generator=torch.Generator(),
    )
