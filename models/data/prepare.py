"""One-time preparation of MA-52 for fast loading: every clip re-encoded to H.264 with the
short side at 256 pixels and decode-friendly settings, names and list files kept.

    python models/prepare_ma52.py --data-root /data/MA-52 --out /data/MA-52-prepared
    python models/train.py --data-root /data/MA-52-prepared          # reads the copy

Why this form (README, "Data pipeline"): the loader decodes every frame of a clip (H.264
frames depend on each other) and MA-52's are 1080x1296; at 256x308 there are ~18x fewer
pixels to decode and `tune=fastdecode` (CAVLC, no deblocking, no weighted prediction) makes
each cheaper. Every frame is kept, in order, so a dataset samples the same frame indices
from the copy as from the original. Audio is dropped.

Output: `OUT/{split}_list_videos.txt` (the original list files, byte for byte),
`OUT/{split}/<name>.mp4`, and `OUT/prepared.json` (settings, source, clip counts, disk
size, failures), which tells `MA52Dataset` that it reads a prepared copy.

Runs over processes (`--workers`, default one per core), shows a progress bar and is
resumable: a clip is written to a temporary file, decoded back and checked (frame count,
size), then renamed, so an existing output is a finished one and a rerun skips it. A
clip that cannot be read is reported (and listed in prepared.json), never fatal.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
from tqdm import tqdm

from models.data.decode import UnreadableVideo, decoded_frames, resized_shape
from models.data.ma52 import PREPARED_FORMAT, PREPARED_MANIFEST, SPLITS, find_split_files, read_video_list

# libx264 settings of the copy; `threads=1` because parallelism comes from the processes.
ENCODER = "libx264"
ENCODER_OPTIONS = {"crf": "18", "preset": "veryfast", "tune": "fastdecode", "threads": "1"}
FPS = 30


def prepared_shape(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Output size: short side `short_side` (never upscaled), both sides even (yuv420p)."""
    if min(width, height) <= short_side:
        return width - width % 2, height - height % 2
    width, height = resized_shape(width, height, short_side)
    return width - width % 2, height - height % 2


def prepare_clip(source: Path, target: Path, short_side: int) -> int:
    """Re-encode `source` into `target`, verified; returns the frame count. Raises on an
    unreadable source or a failed check (the target is then not created)."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        count, shape = _encode(source, partial, short_side)
        if count == 0:
            raise UnreadableVideo("no frame could be decoded")
        check = sum(1 for frame in decoded_frames(partial) if (frame.width, frame.height) == shape)
        if check != count:
            raise UnreadableVideo(f"verification: wrote {count} frames of {shape[0]}x{shape[1]}, read back {check}")
        os.replace(partial, target)
        return count
    finally:
        partial.unlink(missing_ok=True)


def _encode(source: Path, partial: Path, short_side: int) -> tuple[int, tuple[int, int]]:
    count, shape = 0, None
    with av.open(str(partial), mode="w", format="mp4") as output:
        stream = None
        for frame in decoded_frames(source):
            if stream is None:
                shape = prepared_shape(frame.width, frame.height, short_side)
                stream = output.add_stream(ENCODER, rate=FPS)
                stream.width, stream.height = shape
                stream.pix_fmt = "yuv420p"
                stream.options = dict(ENCODER_OPTIONS)
            # Frame positions, not the source's timestamps, define a frame for the loader: number
            # them 0, 1, ... at FPS, so that timestamp-based readers (players, seeking decoders) agree.
            picture = frame.reformat(width=shape[0], height=shape[1], format="yuv420p", interpolation="AREA")
            picture.pts, picture.time_base = count, Fraction(1, FPS)
            output.mux(stream.encode(picture))
            count += 1
        if stream is not None:
            output.mux(stream.encode())
    return count, shape


def _prepare_one(job: tuple[str, str, int]) -> tuple[str, int | None, str | None]:
    source, target, short_side = job
    try:
        return target, prepare_clip(Path(source), Path(target), short_side), None
    except (av.FFmpegError, OSError, UnreadableVideo) as error:
        return target, None, f"{type(error).__name__}: {error}"


def prepare(
    data_root, out, short_side: int = 256, workers: int | None = None, splits=SPLITS, progress: bool = True
) -> dict:
    """Prepare every listed clip of `splits` under `data_root` into `out`; returns the
    manifest written to `out/prepared.json`."""
    data_root, out = Path(data_root), Path(out)
    if short_side < 2 or short_side % 2:
        raise ValueError(f"short_side: expected an even number >= 2 (H.264 yuv420p), got {short_side}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    if out.resolve() == data_root.resolve():
        raise ValueError(f"out: expected a folder other than data_root ({data_root})")
    if (data_root / PREPARED_MANIFEST).is_file():
        raise ValueError(f"data_root: {data_root} is already a prepared copy")
    manifest_path = out / PREPARED_MANIFEST
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        if previous.get("short_side") != short_side or previous.get("encoder_options") != ENCODER_OPTIONS:
            raise ValueError(
                f"out: {out} holds a copy made with other settings (short side "
                f"{previous.get('short_side')}); use another folder"
            )
    jobs, skipped, listed = [], 0, {}
    for split in splits:
        list_path, video_dir = find_split_files(data_root, split)
        names, _ = read_video_list(list_path)
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / list_path.name).write_bytes(list_path.read_bytes())
        listed[split] = len(names)
        for name in names:
            target = out / split / name
            if target.is_file():
                skipped += 1
            else:
                jobs.append((str(video_dir / name), str(target), short_side))
    failed = {}
    workers = workers or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_prepare_one, jobs, chunksize=1)
        for target, _, error in tqdm(
            results, total=len(jobs), desc="preparing MA-52", unit="clip", disable=not progress, dynamic_ncols=True
        ):
            if error is not None:
                failed[str(Path(target).relative_to(out))] = error
                tqdm.write(f"failed: {target}: {error}")
    size = sum(path.stat().st_size for split in splits for path in (out / split).glob("*.mp4"))
    manifest = {
        "format": PREPARED_FORMAT,
        "codec": "h264",
        "short_side": short_side,
        "encoder_options": ENCODER_OPTIONS,
        "source": str(data_root.resolve()),
        "listed": listed,
        "written": len(jobs) - len(failed),
        "skipped_existing": skipped,
        "failed": failed,
        "bytes": size,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="the original MA-52 folder (lists and videos)")
    p.add_argument("--out", required=True, help="folder for the prepared copy (created; rerun to resume)")
    p.add_argument("--short-side", type=int, default=256, help="short side of the copy in pixels (256 for 224 crops)")
    p.add_argument("--workers", type=int, help="processes (default: one per available core)")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to prepare")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        p.error(f"--splits: expected names from {SPLITS}, got {unknown}")
    manifest = prepare(args.data_root, args.out, args.short_side, args.workers, splits, args.progress)
    print(
        f"prepared {manifest['written']} clips ({manifest['skipped_existing']} already done, "
        f"{len(manifest['failed'])} failed) into {args.out}: {manifest['bytes'] / 2**20:.1f} MiB on disk"
    )
    for target, error in manifest["failed"].items():
        print(f"  failed: {target}: {error}")
    return manifest
