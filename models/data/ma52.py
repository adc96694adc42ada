"""MA-52 (micro-action) video dataset in the official release format (SPEC §6), or a copy
made by `models/prepare_ma52.py` (read the same way, much faster).

Layout searched under `root` (the first that exists wins; when none does, the error lists
every path tried):
- lists `{split}_list_videos.txt` in `root/` or `root/annotations/`: one
  `<name>.mp4 <action_id>` per line, whitespace separated, LF or CRLF, final newline
  optional (the official test list has none; its labels are dummy zeros). A name is a path
  relative to the video folder: an absolute name or one with a `..` part (which could reach
  outside the data root) is refused like any malformed line, before any file is opened;
- videos in `root/{split}/` or `root/videos_{split}/`.
A root holding `prepared.json` is a prepared copy (its clips are smaller, every frame kept);
`source` says which kind is being read.

Train/val names are `SSSS_BB_CCCC.mp4`: `SSSS` is the subject (interview) id, exposed
as `subject` so GIRL can use real subjects as groups; other names (the test split's
`testNNNN.mp4`) give subject -1. Labels come from the list, never from the file name;
the body id is the body of the listed action.

Decoding: `models/data/decode.py` (PyAV). `num_frames` frames are taken uniformly over the
whole clip (centre of each of `num_frames` equal segments; clips shorter than that repeat
frames; MA-52 clips have 45-75 frames, fewer than X3D's 16 x stride 5). Frames are resized
so the short side is `short_side` (default `round(size * 256 / 224)`, i.e. 256 for 224 as in
MANet's MA-52 pipeline), then cropped to `size x size`: random crop + horizontal flip when
`training`, centre crop otherwise. Items carry uint8 frames; X3D's normalization happens in
the training step (`clips.normalize_frames`).

A missing root, list or video folder is an InputNotFound naming every path tried; a
malformed list (a line without a label, a label outside [0, 52), a non-integer, a name
reaching outside the video folder, text that is not UTF-8) is a DatasetError naming the
file and line (models/errors.py: the scripts print either on one line).

A video that cannot be read (missing, corrupt, no video stream, no frame decoded, a frame
size the decoder refuses: see decode.py) gives a warning naming it, is recorded in
`.failed`, and its item is None, which `collate_clips` drops and counts (`num_dropped`).
`.failed` is per process: with DataLoader workers, sum the batches' `num_dropped` instead.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path, PurePosixPath

import av
import numpy as np
import torch

from models.data.clips import check_repeats, first_existing, item_key, labelled_clip_items
from models.data.decode import sampled_frames_or_none
from models.data.labels import ACTION_TO_BODY, NUM_ACTIONS
from models.errors import DatasetError, InputNotFound

SPLITS = ("train", "val", "test")
PREPARED_MANIFEST = "prepared.json"
PREPARED_FORMAT = "piumr-ma52-prepared-v1"
_SUBJECT_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)\.mp4$")


def list_file_candidates(root: Path, split: str) -> list[Path]:
    name = f"{split}_list_videos.txt"
    return [root / name, root / "annotations" / name]


def video_dir_candidates(root: Path, split: str) -> list[Path]:
    return [root / split, root / f"videos_{split}"]


def find_split_files(root: Path, split: str) -> tuple[Path, Path]:
    """The list file and the video folder of `split` under `root`."""
    if not root.is_dir():
        raise InputNotFound(
            f"MA-52 root: expected a folder holding the lists and videos, but {root} "
            f"{'is not a folder' if root.exists() else 'does not exist'}"
        )
    return (
        first_existing(list_file_candidates(root, split), f"MA-52 {split} list", is_dir=False),
        first_existing(video_dir_candidates(root, split), f"MA-52 {split} video folder", is_dir=True),
    )


def read_video_list(path: Path) -> tuple[list[str], list[int]]:
    """Names and action ids of a list file; LF or CRLF, blank lines ignored. A malformed
    line (see the module docstring) is a DatasetError naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{path}: expected a UTF-8 text list, got undecodable bytes at offset {error.start}"
        ) from None
    names, labels = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise DatasetError(f"{path}:{line_number}: expected '<name>.mp4 <action_id>', got {line!r}")
        label = int(fields[1])
        if not 0 <= label < NUM_ACTIONS:
            raise DatasetError(f"{path}:{line_number}: expected an action id in [0, {NUM_ACTIONS}), got {label}")
        name = PurePosixPath(fields[0])
        if name.is_absolute() or ".." in name.parts or "\0" in fields[0]:
            raise DatasetError(
                f"{path}:{line_number}: expected a video name inside the split's folder, got "
                f"{fields[0]!r} (absolute paths and '..' are refused)"
            )
        names.append(fields[0])
        labels.append(label)
    if not names:
        raise DatasetError(f"{path}: the list is empty")
    return names, labels


def subject_of_name(name: str) -> int:
    """Subject id from an `SSSS_BB_CCCC.mp4` name, -1 for any other name."""
    match = _SUBJECT_NAME.match(name)
    return int(match.group(1)) if match else -1


def write_h264_mp4(path, frames: np.ndarray, fps: int = 30, crf: int = 18) -> None:
    """Encode `(T, H, W, 3)` uint8 RGB frames as an H.264 (yuv420p) MP4, as MA-52's
    clips are stored; `H` and `W` must be even (a yuv420p constraint)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frames: H.264 in yuv420p needs even height and width, got {height}x{width}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSON or UTF-8
        raise DatasetError(f"root: {path} is not a {PREPARED_FORMAT} manifest (not JSON: {error})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != PREPARED_FORMAT
        or not isinstance(manifest.get("short_side"), int)
    ):
        raise DatasetError(f"root: {path} is not a {PREPARED_FORMAT} manifest")
    return manifest


class MA52Dataset(torch.utils.data.Dataset):
    """One split of MA-52 or of a prepared copy (see the module docstring for the layout,
    sampling, crops and failure handling). Items: `{"clip": uint8 (num_frames, size, size, 3),
    "label", "body", "subject", "index"}`, a list of `repeats` such items (training with
    repeated augmentation), or None for an unreadable video. `key` is an index or
    `(index, seed)` (`clips.item_key`). `decode_threads`: FFmpeg threads per decode.

    Attributes: `names`, `labels`, `bodies`, `subjects` (lists in list order), `list_path`,
    `video_dir`, `prepared` (the copy's prepared.json, None for original videos), `source`
    (which of the two, in words), `failed` (names of videos that could not be read in this
    process), `missing` (listed names with no file)."""

    def __init__(
        self,
        root,
        split: str,
        num_frames: int = 16,
        size: int = 224,
        training: bool = False,
        short_side: int | None = None,
        repeats: int = 1,
        decode_threads: int = 1,
    ):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
        if size < 1:
            raise ValueError(f"size: expected >= 1, got {size}")
        if decode_threads < 0:
            raise ValueError(f"decode_threads: expected >= 0 (0: one per core), got {decode_threads}")
        self.short_side = round(size * 256 / 224) if short_side is None else int(short_side)
        if self.short_side < size:
            raise ValueError(f"short_side: expected >= size ({size}) so the crop fits, got {self.short_side}")
        self.root = Path(root)
        self.split = split
        self.num_frames = num_frames
        self.size = size
        self.training = training
        self.repeats = check_repeats(repeats, training)
        self.decode_threads = decode_threads

        manifest = self.root / PREPARED_MANIFEST
        self.prepared = _read_manifest(manifest) if manifest.is_file() else None
        if self.prepared is None:
            self.source = f"original MA-52 videos in {self.root} (models/prepare_ma52.py makes a faster copy)"
        else:
            if self.short_side > self.prepared["short_side"]:
                raise ValueError(
                    f"short_side: {self.short_side} is larger than the prepared copy's "
                    f"{self.prepared['short_side']} ({self.root}); prepare it again with "
                    f"--short-side {self.short_side} or read the original videos"
                )
            self.source = f"prepared MA-52 copy in {self.root} (H.264, short side {self.prepared['short_side']})"

        self.list_path, self.video_dir = find_split_files(self.root, split)
        self.names, self.labels = read_video_list(self.list_path)
        self.bodies = [ACTION_TO_BODY[label] for label in self.labels]
        self.subjects = [subject_of_name(name) for name in self.names]
        self.failed: list[str] = []

        self.missing = [name for name in self.names if not (self.video_dir / name).is_file()]
        if len(self.missing) == len(self.names):
            raise InputNotFound(
                f"none of the {len(self.names)} videos listed in {self.list_path} is in {self.video_dir} "
                f"(first: {self.names[0]})"
            )
        if self.missing:
            warnings.warn(
                f"MA-52 {split}: {len(self.missing)} of {len(self.names)} listed videos are missing "
                f"from {self.video_dir} (first: {', '.join(self.missing[:3])}); they will be skipped",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, key):
        index, rng = item_key(key, self.training)
        name = self.names[index]
        path = self.video_dir / name
        frames = sampled_frames_or_none(
            path,
            self.num_frames,
            self.short_side,
            self.decode_threads,
            f"MA-52 {self.split}: skipping unreadable video {path}",
        )
        if frames is None:
            self.failed.append(name)
            return None
        return labelled_clip_items(self, index, frames, rng)
