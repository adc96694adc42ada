"""Video decoding behind one small interface (PyAV / FFmpeg), shared by the MA-52 loader
and `models/prepare_ma52.py`.

- `read_sampled_frames(path, num_frames, short_side, threads)`: what a dataset item needs,
  `(num_frames, H, W, 3)` uint8 RGB, frames picked by `sample_frame_indices`, short side
  resized to `short_side` (area interpolation, in the same swscale call as the YUV -> RGB
  conversion). Every frame is decoded (H.264 frames depend on each other); only the picked
  ones are converted.
- `decoded_frames(path, threads)`: every frame as an `av.VideoFrame` (the prepare step).
- `sampled_frames_or_none(path, ..., skipping)`: what a dataset item reads: the sampled
  frames, or None and a warning when the video is missing or cannot be read.

Frame sizes are bounded before anything is decoded or converted, so that one odd or hostile
file cannot exhaust a worker's memory: more than `MAX_FRAME_PIXELS` pixels, or an aspect
ratio beyond `MAX_ASPECT_RATIO` (a 2x1024 video resized to a short side of 256 would give
256x131072 frames, 100 MB each), is an `UnreadableVideo` naming the size. Frames are
converted to the size of the first one, so a resolution change mid-stream cannot give
frames that do not stack.

`threads` is FFmpeg's decoder thread count (frame + slice threading; 0 = one per core).
A DataLoader worker should use 1 when there are as many workers as cores: threads only
help while cores are idle. torchcodec and DALI were evaluated as alternatives (README).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from models.data.clips import sample_frame_indices

# The largest frame H.264 allows (level 6.2: 139,264 macroblocks of 16x16, e.g. 8192x4352).
MAX_FRAME_PIXELS = 139_264 * 256
# Longer side / shorter side; 32:9 panoramas are 3.6.
MAX_ASPECT_RATIO = 4.0


class UnreadableVideo(Exception):
    """A video file that opened but yielded nothing usable."""


def check_frame_size(width: int, height: int) -> None:
    """UnreadableVideo for a frame size this module refuses to decode or resize."""
    if width < 1 or height < 1:
        raise UnreadableVideo(f"frame size {width}x{height}: expected at least 1x1")
    if width * height > MAX_FRAME_PIXELS:
        raise UnreadableVideo(
            f"frame size {width}x{height}: expected at most {MAX_FRAME_PIXELS:,} pixels "
            "(H.264's largest level), refused"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnreadableVideo(
            f"frame size {width}x{height}: expected an aspect ratio of at most "
            f"{MAX_ASPECT_RATIO:g}:1, refused (resizing it would need "
            f"{max(width, height) / min(width, height):.0f}x the memory of a square frame)"
        )


def resized_shape(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to `short_side`, aspect kept."""
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


def _open_video(path: Path, threads: int):
    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise UnreadableVideo("no video stream")
    stream = container.streams.video[0]
    if stream.codec_context.width and stream.codec_context.height:  # 0 when the header does not say
        try:
            check_frame_size(stream.codec_context.width, stream.codec_context.height)
        except UnreadableVideo:
            container.close()
            raise
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    return container, stream


def decoded_frames(path: Path, threads: int = 1):
    """Every frame of the video's first video stream, in presentation order."""
    container, stream = _open_video(path, threads)
    with container:
        for frame in container.decode(stream):
            check_frame_size(frame.width, frame.height)
            yield frame


def read_sampled_frames(path: Path, num_frames: int, short_side: int, threads: int = 1) -> np.ndarray:
    """`(num_frames, H', W', 3)` uint8 RGB frames sampled uniformly over the video, the
    short side resized to `short_side`. The container's frame count picks the frames; when
    that count is missing or wrong the video is decoded a second time with the true count."""
    container, stream = _open_video(path, threads)
    with container:
        expected = int(stream.frames)
        converted, count = _decode_selected(container, stream, _wanted(expected, num_frames), short_side)
    if count == 0:
        raise UnreadableVideo("no frame could be decoded")
    if count != expected:
        # The header's frame count was missing or wrong: pick again with the true count.
        container, stream = _open_video(path, threads)
        with container:
            converted, recount = _decode_selected(container, stream, _wanted(count, num_frames), short_side)
        if recount != count:
            raise UnreadableVideo(f"decoding gave {count} frames, then {recount}")
    return np.stack([converted[int(index)] for index in sample_frame_indices(count, num_frames)])


def sampled_frames_or_none(
    path: Path | None, num_frames: int, short_side: int, threads: int, skipping: str
) -> np.ndarray | None:
    """`read_sampled_frames`, or None with the warning "`skipping`: <error>" when `path` is
    None (no video for the item), missing or unreadable: one bad clip must not end a run.
    The warning points at the caller of the dataset's `__getitem__`."""
    try:
        if path is None:
            raise FileNotFoundError("no video file")
        return read_sampled_frames(path, num_frames, short_side, threads)
    except Exception as error:
        warnings.warn(f"{skipping}: {type(error).__name__}: {error}", stacklevel=3)
        return None


def _wanted(num_available: int, num_frames: int) -> set[int]:
    return set(sample_frame_indices(num_available, num_frames).tolist()) if num_available > 0 else set()


def _decode_selected(container, stream, wanted: set[int], short_side: int) -> tuple[dict[int, np.ndarray], int]:
    """Decode every frame, converting those whose position is in `wanted` (to the first
    frame's resized shape); returns the converted frames by position and the number of
    frames decoded."""
    converted = {}
    count = 0
    shape = None
    # One reformatter keeps one swscale context for the clip: `VideoFrame.to_ndarray` sets one
    # up per frame, which cost more than the conversion itself (about 2x the CPU time).
    reformatter = VideoReformatter()
    for frame in container.decode(stream):
        check_frame_size(frame.width, frame.height)
        if count in wanted:
            shape = shape or resized_shape(frame.width, frame.height, short_side)
            picture = reformatter.reformat(frame, width=shape[0], height=shape[1], format="rgb24", interpolation="AREA")
            converted[count] = picture.to_ndarray()
        count += 1
    return converted, count
