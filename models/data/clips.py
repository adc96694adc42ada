"""Clip handling shared by the MA-52 loader and the synthetic dataset: which frames to take,
the spatial crop and flip, the batch collate and X3D's normalization (on the device).

Every dataset item is a dict
`{"clip": (T, H, W, 3) RGB frames, "label": int, "body": int, "subject": int, "index": int}`
(subject -1 when unknown, e.g. on MA-52's test split), or None for a video that could not be
read; `collate_clips` drops the None items and counts them. MA-52 frames are uint8 (what the
decoder gives: 4x fewer bytes through the worker queues and pinned memory than float32);
the synthetic renderer's are float32 in [0, 1]. `normalize_frames` turns a batch of either
into the model's input inside the training step, on the device.

Augmentation randomness comes from the item's key: a `(index, seed)` key (what
`SeededSampler` yields) makes an item a pure function of the key, whichever worker, and
however many, load it; a plain index in training mode draws the seed from torch's RNG.
With `repeats` = k > 1 an item is a list of k clips augmented independently from one
decode (repeated augmentation, as in VideoMAE and MViT); `collate_clips` flattens them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler, default_collate

from models.errors import InputNotFound

# X3D's Kinetics normalization (SPEC §6): RGB / 255, then per channel (x - mean) / std.
X3D_MEAN = 0.45
X3D_STD = 0.225
SEED_BOUND = 2**31


def sample_frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread uniformly over the whole clip: the centre frame of each
    of `num_frames` equal segments. A clip shorter than `num_frames` repeats frames."""
    if num_available < 1:
        raise ValueError(f"num_available: expected at least 1 frame, got {num_available}")
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    centres = (np.arange(num_frames) + 0.5) * (num_available / num_frames)
    return np.minimum(centres.astype(np.int64), num_available - 1)


def first_existing(candidates: list[Path], what: str, is_dir: bool) -> Path:
    """The first of `candidates` that is a folder (`is_dir`) or a file; else InputNotFound
    naming `what` and every path tried."""
    for path in candidates:
        if path.is_dir() if is_dir else path.is_file():
            return path
    raise InputNotFound(f"{what} not found; tried {', '.join(str(path) for path in candidates)}")


def item_key(key, training: bool) -> tuple[int, np.random.Generator | None]:
    """The dataset index of `key` (an index or `(index, seed)`) and, when `training`, the
    generator of its augmentation."""
    index, seed = key if isinstance(key, tuple) else (key, None)
    if not training:
        return int(index), None
    if seed is None:
        seed = int(torch.randint(0, SEED_BOUND, ()).item())
    return int(index), np.random.default_rng(seed)


def crop_and_flip(frames: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Square `size` crop of `(T, H, W, C)` frames (any dtype, no copy): with `rng`, a random
    position and a horizontal flip with probability 0.5; without, the centre."""
    height, width = frames.shape[1:3]
    if height < size or width < size:
        raise ValueError(f"frames: expected at least {size}x{size} pixels to crop, got {height}x{width}")
    if rng is None:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    frames = frames[:, top : top + size, left : left + size]
    if rng is not None and rng.random() < 0.5:
        frames = frames[:, :, ::-1]
    return frames


def clip_items(frames: np.ndarray, size: int, rng: np.random.Generator | None, repeats: int, **fields):
    """The item(s) of one decoded clip: `repeats` crops (one when `rng` is None, i.e. not
    training), each a dict of `fields` plus its contiguous `clip`."""
    items = [
        dict(fields, clip=torch.from_numpy(np.ascontiguousarray(crop_and_flip(frames, size, rng))))
        for _ in range(repeats if rng is not None else 1)
    ]
    return items[0] if len(items) == 1 else items


def labelled_clip_items(dataset, index: int, frames: np.ndarray, rng: np.random.Generator | None):
    """`clip_items` of `dataset`'s clip `index` from its decoded or rendered `frames`, with the
    dataset's `size` and `repeats` and the clip's label, body and subject (the MA-52 loader
    and the synthetic dataset keep them in `labels`, `bodies` and `subjects`)."""
    return clip_items(
        frames,
        dataset.size,
        rng,
        dataset.repeats,
        label=dataset.labels[index],
        body=dataset.bodies[index],
        subject=dataset.subjects[index],
        index=index,
    )


def check_repeats(repeats: int, training: bool) -> int:
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected a positive integer, got {repeats!r}")
    if repeats > 1 and not training:
        raise ValueError(f"repeats: repeated augmentation ({repeats}) needs training=True")
    return repeats


class SeededSampler(Sampler):
    """Yields `(index, seed)` for each index of `sampler`: the seeds are drawn from
    (`seed`, epoch, `rank`), so an epoch's augmentation does not depend on the worker
    processes (persistent workers keep their RNG state across epochs, which would make a
    resumed run differ from an uninterrupted one)."""

    def __init__(self, sampler, seed: int, rank: int):
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        indices = list(self.sampler)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + self.rank)
        seeds = torch.randint(0, SEED_BOUND, (len(indices),), generator=generator).tolist()
        return iter(zip(indices, seeds))

    def __len__(self) -> int:
        return len(self.sampler)


def collate_clips(items: list) -> dict:
    """Stack dataset items into a batch dict of tensors (`clip` (B, T, H, W, 3), `label`,
    `body`, `subject`, `index` (B,) int64), flattening repeated-augmentation lists and
    dropping the None items of unreadable videos; `num_dropped` says how many were dropped.
    When every item was dropped, the tensors are empty (B = 0) and the caller should skip
    the batch."""
    kept = [clip for item in items if item is not None for clip in (item if isinstance(item, list) else [item])]
    num_dropped = sum(item is None for item in items)
    if not kept:
        empty = torch.empty(0, dtype=torch.int64)
        batch = {
            "clip": torch.empty(0, dtype=torch.uint8),
            "label": empty,
            "body": empty.clone(),
            "subject": empty.clone(),
            "index": empty.clone(),
        }
    else:
        batch = default_collate(kept)
    batch["num_dropped"] = num_dropped
    return batch


def normalize_frames(frames: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """`(B, T, H, W, 3)` RGB frames, uint8 in [0, 255] or float in [0, 1], to the model's
    float32 `(B, 3, T, H, W)` input with X3D's normalization; `channels_last` keeps the
    frames' own layout, which is torch.channels_last_3d, else the result is contiguous.
    The arithmetic is the float pipeline's as it ran in the workers (x * scale - shift in
    float32), so the model sees the same values."""
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected shape (B, T, H, W, 3), got {tuple(frames.shape)}")
    scale = 1.0 / (255.0 * X3D_STD) if frames.dtype == torch.uint8 else 1.0 / X3D_STD
    clip = frames.permute(0, 4, 1, 2, 3).to(torch.float32) * scale - X3D_MEAN / X3D_STD
    return clip if channels_last else clip.contiguous()
