"""Clip handling shared by the MA-52 loader and the synthetic dataset: which frames to take,
the spatial crop and flip, X3D's normalization and the batch collate.

Every dataset item is a dict
`{"clip": float32 (3, T, H, W), "label": int, "body": int, "subject": int, "index": int}`
(subject -1 when unknown, e.g. on MA-52's test split), or None for a video that could
not be read; `collate_clips` drops the None items and counts them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import default_collate

# X3D's Kinetics normalization (SPEC §6): RGB / 255, then per channel (x - mean) / std.
X3D_MEAN = 0.45
X3D_STD = 0.225


def sample_frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread uniformly over the whole clip: the centre frame of each
    of `num_frames` equal segments. A clip shorter than `num_frames` repeats frames."""
    if num_available < 1:
        raise ValueError(f"num_available: expected at least 1 frame, got {num_available}")
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    centres = (np.arange(num_frames) + 0.5) * (num_available / num_frames)
    return np.minimum(centres.astype(np.int64), num_available - 1)


def crop_and_flip(frames: np.ndarray, size: int, training: bool) -> np.ndarray:
    """Square `size` crop of `(T, H, W, 3)` frames: random position plus a horizontal flip
    with probability 0.5 when training (torch's global RNG, which DataLoader seeds per
    worker), the centre otherwise."""
    height, width = frames.shape[1:3]
    if height < size or width < size:
        raise ValueError(f"frames: expected at least {size}x{size} pixels to crop, got {height}x{width}")
    if training:
        top = int(torch.randint(0, height - size + 1, ()).item())
        left = int(torch.randint(0, width - size + 1, ()).item())
    else:
        top, left = (height - size) // 2, (width - size) // 2
    frames = frames[:, top:top + size, left:left + size]
    if training and torch.rand(()).item() < 0.5:
        frames = frames[:, :, ::-1]
    return frames


def normalize_clip(frames: np.ndarray) -> torch.Tensor:
    """`(T, H, W, 3)` RGB frames, uint8 in [0, 255] or float in [0, 1], to the model's
    float32 `(3, T, H, W)` input with X3D's normalization."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected shape (T, H, W, 3), got {frames.shape}")
    # numpy, not torch: this runs in DataLoader workers, where torch's intra-op threads
    # only contend with each other (measured 30x slower on a loaded 2-core machine).
    scale = 1.0 / (255.0 * X3D_STD) if frames.dtype == np.uint8 else 1.0 / X3D_STD
    clip = np.transpose(frames, (3, 0, 1, 2)).astype(np.float32) * np.float32(scale)
    clip -= np.float32(X3D_MEAN / X3D_STD)
    return torch.from_numpy(np.ascontiguousarray(clip))


def denormalize_clip(clip: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize_clip`: float `(3, T, H, W)` back to uint8 `(T, H, W, 3)` RGB."""
    rgb = (clip.detach().float() * X3D_STD + X3D_MEAN).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def collate_clips(items: list) -> dict:
    """Stack dataset items into a batch dict of tensors (`clip` (B, 3, T, H, W), `label`,
    `body`, `subject`, `index` (B,) int64), dropping the None items of unreadable videos;
    `num_dropped` says how many were dropped. When every item was dropped, the tensors are
    empty (B = 0) and the caller should skip the batch."""
    kept = [item for item in items if item is not None]
    num_dropped = len(items) - len(kept)
    if not kept:
        empty = torch.empty(0, dtype=torch.int64)
        batch = {"clip": torch.empty(0, dtype=torch.float32), "label": empty, "body": empty.clone(),
                 "subject": empty.clone(), "index": empty.clone()}
    else:
        batch = default_collate(kept)
    batch["num_dropped"] = num_dropped
    return batch
