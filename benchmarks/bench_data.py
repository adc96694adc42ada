"""The MA-52 input pipeline against the training step.

`loader`: clips per second of one DataLoader worker (this process, one torch thread, one
FFmpeg thread) for `MA52Dataset(training=True)` at 16x224 (short side 256), on clips generated
here with MA-52's geometry: 1080x1296 portrait H.264 (x264 preset medium, CRF 23), 30 fps,
60 frames, a textured background, a textured "person" moving over it and per-frame sensor
noise (about 2.5 Mbit/s; flat colour would decode unrealistically fast). `native` reads these
files; `prepared` reads the copy `models/prepare_ma52.py` makes of them. One round loads every
clip once; `extra_info["clips_per_s"]` is clips / median round time, `kib_per_clip` the
file size,
`cpu_ms_per_clip` the process CPU time per clip (median round; robust to other load).

`train-step`: what the training step consumes on this CPU: PIUmr-M (X3D-M, TFAM, CE + GIRL)
on uint8 16x224x224 clips, batch 4 (GIRL's 2 pseudo-groups need 2 clips each): device
normalization, forward, backward, AdamW, in the default (contiguous) and channels_last
memory formats; `extra_info`: `clips_per_s` and `gflops_fwd_per_clip` (FlopCounterMode, as
bench_models.py; docs/training.md models GPU consumption from it).
"""

from __future__ import annotations

import time

import av
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.data.ma52 import MA52Dataset
from models.data.prepare import prepare
from models.modelling.piumr import PIUmrLoss, build_piumr
from models.training.loop import model_step
from models.training.precision import to_channels_last

NUM_CLIPS = 3
WIDTH, HEIGHT, FRAMES, FPS = 1080, 1296, 60, 30


def _smooth_noise(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Texture at several scales: random noise bicubically upsampled (by swscale)."""
    out = np.zeros((height, width, 3), np.float32)
    for factor, weight in ((32, 0.5), (8, 0.3), (2, 0.2)):
        small = rng.integers(0, 256, (height // factor + 1, width // factor + 1, 3), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(small, format="rgb24")
        out += weight * frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BICUBIC")
    return out


def write_ma52_like_clip(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pad = 64
    background = _smooth_noise(rng, WIDTH, HEIGHT).astype(np.int16)
    person = _smooth_noise(rng, WIDTH // 2 + 2 * pad, HEIGHT // 2 + 2 * pad).astype(np.int16)
    yy, xx = np.mgrid[0 : HEIGHT // 2, 0 : WIDTH // 2]
    inside = (((yy - HEIGHT / 4) / (HEIGHT / 4)) ** 2 + ((xx - WIDTH / 4) / (WIDTH / 4)) ** 2 < 1)[..., None]
    grain = rng.normal(0, 2.0, (4, HEIGHT, WIDTH, 3)).astype(np.int16)  # sensor noise, cycled with shifts
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "23", "preset": "medium"}
        for t in range(FRAMES):
            frame = background.copy()
            dy, dx = int(pad + 40 * np.sin(2 * np.pi * t / 40)), int(pad + 30 * np.cos(2 * np.pi * t / 25))
            top = HEIGHT // 4 + int(20 * np.sin(t / 7))
            region = frame[top : top + HEIGHT // 2, WIDTH // 4 : WIDTH // 4 + WIDTH // 2]
            np.copyto(region, person[dy : dy + HEIGHT // 2, dx : dx + WIDTH // 2], where=inside)
            frame += np.roll(grain[t % 4], 7 * t, axis=1)
            rgb = np.clip(frame, 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    raw = tmp_path_factory.mktemp("ma52_raw")
    (raw / "train").mkdir()
    names = [f"{subject:04d}_01_0001.mp4" for subject in range(NUM_CLIPS)]
    for seed, name in enumerate(names):
        write_ma52_like_clip(raw / "train" / name, seed)
    (raw / "train_list_videos.txt").write_bytes(b"".join(f"{name} 9\r\n".encode() for name in names))
    prepared = tmp_path_factory.mktemp("ma52_prepared")
    prepare(raw, prepared, splits=("train",), progress=False)
    return {"native": raw, "prepared": prepared}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["native", "prepared"])
def test_loader_clips_per_worker(benchmark, roots, kind, one_thread):
    dataset = MA52Dataset(roots[kind], "train", num_frames=16, size=224, training=True, decode_threads=1)
    torch.manual_seed(0)

    cpu_seconds = []

    def load_all():
        start = time.process_time()
        for index in range(len(dataset)):
            assert dataset[index]["clip"].shape == (16, 224, 224, 3)
        cpu_seconds.append(time.process_time() - start)

    benchmark.group = "data MA-52 1080x1296x60 -> 16x224 uint8, one worker"
    benchmark.extra_info["impl"] = kind
    benchmark.extra_info["kib_per_clip"] = round(
        sum((dataset.video_dir / name).stat().st_size for name in dataset.names) / len(dataset) / 1024, 1
    )
    benchmark.pedantic(load_all, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["clips_per_s"] = round(len(dataset) / benchmark.stats.stats.median, 2)
    # CPU time of this process: what one busy core gives per clip, even on a loaded machine.
    benchmark.extra_info["cpu_ms_per_clip"] = round(1000 * float(np.median(cpu_seconds)) / len(dataset), 1)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_train_step_clips_per_second(benchmark, memory_format):
    torch.manual_seed(0)
    model = build_piumr("M", 52, num_frames=16).train()
    batch = 4
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 16, 224, 224))
    channels_last = memory_format == "channels_last"
    if channels_last:
        to_channels_last(model)
    loss_fn = PIUmrLoss(num_groups=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    frames = torch.randint(0, 256, (batch, 16, 224, 224, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 2])

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = model_step(model, loss_fn, frames, labels, channels_last=channels_last)
        loss.backward()
        optimizer.step()

    step()  # lazy optimizer state outside the timing
    benchmark.group = f"data train-step PIUmr-M {batch}x16x224 uint8 in, fwd+bwd+AdamW"
    benchmark.extra_info.update(
        impl=memory_format,
        threads=torch.get_num_threads(),
        gflops_fwd_per_clip=round(counter.get_total_flops() / 1e9, 2),
    )
    benchmark.pedantic(step, rounds=3, iterations=1)
    benchmark.extra_info["clips_per_s"] = round(batch / benchmark.stats.stats.median, 3)
