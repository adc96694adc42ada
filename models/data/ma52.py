"""MA-52 (micro-action) video dataset in the official release format (SPEC §6).

Layout searched under `root` (the first that exists wins; when none does, the error lists
every path tried):
- lists `{split}_list_videos.txt` in `root/` or `root/annotations/`: one
  `<name>.mp4 <action_id>` per line, whitespace separated, LF or CRLF, final newline
  optional (the official test list has none; its labels are dummy zeros);
- videos in `root/{split}/` or `root/videos_{split}/`.

Train/val names are `SSSS_BB_CCCC.mp4`: `SSSS` is the subject (interview) id, exposed
as `subject` so GIRL can use real subjects as groups; other names (the test split's
`testNNNN.mp4`) give subject -1. Labels come from the list, never from the file name;
the body id is the body of the listed action.

Decoding uses PyAV. `num_frames` frames are taken uniformly over the whole clip (centre of
each of `num_frames` equal segments; clips shorter than that repeat frames; MA-52 clips
have 45-75 frames, fewer than X3D's 16 x stride 5). Frames are resized so the short side
is `short_side` (default `round(size * 256 / 224)`, i.e. 256 for 224 as in MANet's MA-52
pipeline), then cropped to `size x size`: random crop + horizontal flip when `training`,
centre crop otherwise; then X3D's normalization (RGB / 255, mean 0.45, std 0.225).

A video that cannot be read (missing, corrupt, no video stream, no frame decoded) gives a
warning naming it, is recorded in `.failed`, and its item is None, which `collate_clips`
drops and counts (`num_dropped`). `.failed` is per process: with DataLoader workers, sum
the batches' `num_dropped` instead.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import av
import numpy as np
import torch

from models.data.clips import crop_and_flip, normalize_clip, sample_frame_indices
from models.data.labels import ACTION_TO_BODY, NUM_ACTIONS

SPLITS = ("train", "val", "test")
_SUBJECT_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)\.mp4$")


class UnreadableVideo(Exception):
    """A video file that opened but yielded nothing usable."""


def list_file_candidates(root: Path, split: str) -> list[Path]:
    name = f"{split}_list_videos.txt"
    return [root / name, root / "annotations" / name]


def video_dir_candidates(root: Path, split: str) -> list[Path]:
    return [root / split, root / f"videos_{split}"]


def read_video_list(path: Path) -> tuple[list[str], list[int]]:
    """Names and action ids of a list file; LF or CRLF, blank lines ignored. A malformed
    line is a ValueError naming the file and line."""
    names, labels = [], []
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{line_number}: expected '<name>.mp4 <action_id>', got {line!r}")
        label = int(fields[1])
        if not 0 <= label < NUM_ACTIONS:
            raise ValueError(f"{path}:{line_number}: expected an action id in [0, {NUM_ACTIONS}), got {label}")
        names.append(fields[0])
        labels.append(label)
    if not names:
        raise ValueError(f"{path}: the list is empty")
    return names, labels


def subject_of_name(name: str) -> int:
    """Subject id from an `SSSS_BB_CCCC.mp4` name, -1 for any other name."""
    match = _SUBJECT_NAME.match(name)
    return int(match.group(1)) if match else -1


def _first_existing(candidates: list[Path], what: str, is_dir: bool) -> Path:
    for path in candidates:
        if (path.is_dir() if is_dir else path.is_file()):
            return path
    tried = "\n  ".join(str(path) for path in candidates)
    raise FileNotFoundError(f"MA-52 {what} not found; tried:\n  {tried}")


def _resized_shape(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


def decode_sampled_frames(path: Path, num_frames: int, short_side: int) -> np.ndarray:
    """`(num_frames, H', W', 3)` uint8 RGB frames sampled uniformly over the video, resized
    (area interpolation) so the short side is `short_side`. Only the sampled frames are
    converted; the container's frame count picks them, and when that count is missing or
    wrong the video is decoded a second time with the true count."""
    expected = _header_frame_count(path)
    wanted = sample_frame_indices(expected, num_frames) if expected > 0 else np.empty(0, np.int64)
    converted, count = _decode_selected(path, set(wanted.tolist()), short_side)
    if count == 0:
        raise UnreadableVideo("no frame could be decoded")
    if count != expected:
        # The header's frame count was missing or wrong: pick again with the true count.
        wanted = sample_frame_indices(count, num_frames)
        converted, recount = _decode_selected(path, set(wanted.tolist()), short_side)
        if recount != count:
            raise UnreadableVideo(f"decoding gave {count} frames, then {recount}")
    return np.stack([converted[int(index)] for index in wanted])


def _header_frame_count(path: Path) -> int:
    """The frame count the container declares (0 when it declares none)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise UnreadableVideo("no video stream")
        return int(container.streams.video[0].frames)


def _decode_selected(path: Path, wanted: set[int], short_side: int) -> tuple[dict[int, np.ndarray], int]:
    """Decode every frame, converting those whose position is in `wanted`; returns the
    converted frames by position and the number of frames decoded."""
    converted = {}
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted:
                converted[count] = _to_rgb(frame, short_side)
            count += 1
    return converted, count


def _to_rgb(frame: av.VideoFrame, short_side: int) -> np.ndarray:
    width, height = _resized_shape(frame.width, frame.height, short_side)
    return frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")


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


class MA52Dataset(torch.utils.data.Dataset):
    """One split of MA-52 (see the module docstring for the layout, sampling, crops and
    failure handling). Items: `{"clip": float32 (3, num_frames, size, size), "label",
    "body", "subject", "index"}` or None for an unreadable video.

    Attributes: `names`, `labels`, `bodies`, `subjects` (lists in list order), `list_path`,
    `video_dir`, `failed` (names of videos that could not be read in this process),
    `missing` (listed names with no file)."""

    def __init__(self, root, split: str, num_frames: int = 16, size: int = 224, training: bool = False,
                 short_side: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
        if size < 1:
            raise ValueError(f"size: expected >= 1, got {size}")
        self.short_side = round(size * 256 / 224) if short_side is None else int(short_side)
        if self.short_side < size:
            raise ValueError(f"short_side: expected >= size ({size}) so the crop fits, got {self.short_side}")
        self.root = Path(root)
        self.split = split
        self.num_frames = num_frames
        self.size = size
        self.training = training

        self.list_path = _first_existing(list_file_candidates(self.root, split), f"{split} list", is_dir=False)
        self.video_dir = _first_existing(video_dir_candidates(self.root, split), f"{split} video folder", is_dir=True)
        self.names, self.labels = read_video_list(self.list_path)
        self.bodies = [ACTION_TO_BODY[label] for label in self.labels]
        self.subjects = [subject_of_name(name) for name in self.names]
        self.failed: list[str] = []

        self.missing = [name for name in self.names if not (self.video_dir / name).is_file()]
        if len(self.missing) == len(self.names):
            raise FileNotFoundError(
                f"none of the {len(self.names)} videos listed in {self.list_path} is in {self.video_dir} "
                f"(first: {self.names[0]})")
        if self.missing:
            warnings.warn(f"MA-52 {split}: {len(self.missing)} of {len(self.names)} listed videos are missing "
                          f"from {self.video_dir} (first: {', '.join(self.missing[:3])}); they will be skipped",
                          stacklevel=2)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict | None:
        name = self.names[index]
        path = self.video_dir / name
        try:
            frames = decode_sampled_frames(path, self.num_frames, self.short_side)
        except (av.FFmpegError, OSError, UnreadableVideo) as error:
            self.failed.append(name)
            warnings.warn(f"MA-52 {self.split}: skipping unreadable video {path}: {error}", stacklevel=2)
            return None
        frames = crop_and_flip(frames, self.size, self.training)
        return {"clip": normalize_clip(frames), "label": self.labels[index], "body": self.bodies[index],
                "subject": self.subjects[index], "index": index}
