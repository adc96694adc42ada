"""DFEW (dynamic facial expressions in the wild) in its release format: video clips and the
official 5-fold split files, 7 expression classes.

Layout searched under `root`:
- split files `EmoLabel_DataSplit/{train,test}(single-labeled)/set_{fold}.csv` (or the two
  `(single-labeled)` folders directly in `root`), folds 1..5. Each is a CSV with the header
  `video_name,label`: the clip number (`1`..`16372`) and the expression 1..7
  (`LABELS`: happy, sad, neutral, angry, surprise, disgust, fear), read as class 0..6.
- clips: video files (`.mp4`, `.avi`, `.mkv`, `.mov`) named by their clip number
  (`00001.mp4` or `1.mp4`), anywhere below the first of `root/Clip/clip_224x224`,
  `root/Clip/original`, `root/Clip`, `root` that exists (so `part_N/` subfolders work).
  The JPEG-frame releases (`clip_224x224_16f/NNNNN/*.jpg`) are not read: make videos of them.

Splits: `train` is the fold's training file; `val` and `test` are both the fold's test file
(DFEW has no validation split; its papers, HDF and M3DFEL included, report the test fold).
Items are those of the MA-52 loader (`{"clip", "label", "body", "subject", "index"}`) with
`body` and `subject` -1 (DFEW has neither); frames are decoded, sampled and cropped as there
(`models/data/decode.py`, `clips.py`). A missing root, split file or clip folder is an
InputNotFound naming every path tried; a malformed split file a DatasetError naming the file
and line; an unreadable video a warning, and its item is None (`collate_clips` drops it).
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import torch

from models.data.clips import check_repeats, clip_items, first_existing, item_key
from models.data.decode import sampled_frames_or_none
from models.errors import DatasetError, InputNotFound

LABELS = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
NUM_CLASSES = len(LABELS)
NUM_FOLDS = 5
SPLITS = ("train", "val", "test")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")


def split_file_candidates(root: Path, split: str, fold: int) -> list[Path]:
    folder = f"{'train' if split == 'train' else 'test'}(single-labeled)"
    return [root / "EmoLabel_DataSplit" / folder / f"set_{fold}.csv", root / folder / f"set_{fold}.csv"]


def clip_dir_candidates(root: Path) -> list[Path]:
    return [root / "Clip" / "clip_224x224", root / "Clip" / "original", root / "Clip", root]


def read_split_file(path: Path) -> tuple[list[int], list[int]]:
    """Clip numbers and classes (0..6) of a split file (see the module docstring)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: expected a UTF-8 CSV, got undecodable bytes at offset {error.start}") from None
    rows = [(number, row) for number, row in enumerate(csv.reader(lines), start=1) if any(f.strip() for f in row)]
    if not rows or [f.strip().lower() for f in rows[0][1][:2]] != ["video_name", "label"]:
        raise DatasetError(
            f"{path}:1: expected the header 'video_name,label', got "
            f"{','.join(rows[0][1]) if rows else 'an empty file'!r}"
        )
    clips, labels = [], []
    for number, row in rows[1:]:
        fields = [f.strip() for f in row]
        if len(fields) < 2 or not fields[0].isdigit() or not fields[1].isdigit():
            raise DatasetError(f"{path}:{number}: expected '<clip number>,<label 1-7>', got {','.join(row)!r}")
        label = int(fields[1])
        if not 1 <= label <= NUM_CLASSES:
            raise DatasetError(f"{path}:{number}: expected a label in 1..{NUM_CLASSES}, got {label}")
        clips.append(int(fields[0]))
        labels.append(label - 1)
    if not clips:
        raise DatasetError(f"{path}: the split file lists no clip")
    return clips, labels


def index_videos(folder: Path) -> dict[int, Path]:
    """Clip number -> video file, for every video below `folder` whose name is a number."""
    found: dict[int, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in VIDEO_SUFFIXES or not path.stem.isdigit() or not path.is_file():
            continue
        number = int(path.stem)
        if number in found:
            raise DatasetError(f"DFEW clip {number} has two videos: {found[number]} and {path}; keep one")
        found[number] = path
    return found


class DFEWDataset(torch.utils.data.Dataset):
    """One split of one DFEW fold (see the module docstring for the layout and items).

    `key` is an index or `(index, seed)` (`clips.item_key`); `repeats` > 1 gives a list of
    that many augmented clips per decode (training only). Attributes: `clips`, `labels`
    (list order), `split_path`, `clip_dir`, `source`, `failed`, `missing`.
    """

    def __init__(
        self,
        root,
        split: str,
        fold: int,
        num_frames: int = 16,
        size: int = 112,
        training: bool = False,
        short_side: int | None = None,
        repeats: int = 1,
        decode_threads: int = 1,
    ):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= NUM_FOLDS:
            raise ValueError(f"fold: expected an int in 1..{NUM_FOLDS}, got {fold!r}")
        if num_frames < 1 or size < 1:
            raise ValueError(f"num_frames, size: expected >= 1, got {num_frames}, {size}")
        self.short_side = round(size * 256 / 224) if short_side is None else int(short_side)
        if self.short_side < size:
            raise ValueError(f"short_side: expected >= size ({size}) so the crop fits, got {self.short_side}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputNotFound(
                f"DFEW root: expected a folder holding EmoLabel_DataSplit and the clips, but "
                f"{self.root} {'is not a folder' if self.root.exists() else 'does not exist'}"
            )
        self.split, self.fold = split, fold
        self.num_frames, self.size, self.training = num_frames, size, training
        self.repeats = check_repeats(repeats, training)
        self.decode_threads = decode_threads
        self.split_path = first_existing(
            split_file_candidates(self.root, split, fold), f"DFEW fold {fold} {split} file", is_dir=False
        )
        self.clip_dir = first_existing(clip_dir_candidates(self.root), "DFEW clip folder", is_dir=True)
        self.source = f"DFEW fold {fold} ({self.split_path.parent.name}) with clips in {self.clip_dir}"
        self.clips, self.labels = read_split_file(self.split_path)
        videos = index_videos(self.clip_dir)
        self.paths = [videos.get(number) for number in self.clips]
        self.missing = [number for number, path in zip(self.clips, self.paths) if path is None]
        if len(self.missing) == len(self.clips):
            raise InputNotFound(
                f"none of the {len(self.clips)} clips listed in {self.split_path} has a video under "
                f"{self.clip_dir} (first: clip {self.clips[0]}, looked for {self.clips[0]:05d}.mp4)"
            )
        if self.missing:
            warnings.warn(
                f"DFEW {split}: {len(self.missing)} of {len(self.clips)} listed clips have no video under "
                f"{self.clip_dir} (first: {self.missing[:3]}); they will be skipped",
                stacklevel=2,
            )
        self.failed: list[int] = []

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key):
        index, rng = item_key(key, self.training)
        path = self.paths[index]
        frames = sampled_frames_or_none(
            path,
            self.num_frames,
            self.short_side,
            self.decode_threads,
            f"DFEW {self.split}: skipping clip {self.clips[index]} ({path})",
        )
        if frames is None:
            self.failed.append(self.clips[index])
            return None
        return clip_items(
            frames, self.size, rng, self.repeats, label=self.labels[index], body=-1, subject=-1, index=index
        )
