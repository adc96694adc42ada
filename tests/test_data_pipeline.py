"""The training input pipeline: uint8 (and synthetic float) frames from the workers,
normalized on the device inside the step exactly as the former float pipeline did in the
workers; augmentation seeded by the sampler (independent of the workers); repeated
augmentation; the compiled and channels_last steps against the eager contiguous one."""

import json

import numpy as np
import pytest
import torch

from models.data import (
    MA52Dataset,
    SeededSampler,
    SyntheticMicroActions,
    collate_clips,
    sample_frame_indices,
    synthetic,
)
from models.data.decode import decoded_frames, read_sampled_frames
from models.data.ma52 import write_h264_mp4
from models.training import builders, data_loading
from models.training.config import TrainConfig, resolve_config
from models.training.distributed import setup as setup_distributed
from models.training.loop import model_step
from models.training.precision import to_channels_last
from models.training.run import Run
from tests.train_helpers import TINY_PRESET, one_thread  # noqa: F401


def float_pipeline(frames: np.ndarray) -> torch.Tensor:
    """The worker-side normalization this pipeline replaced, verbatim: (T, H, W, 3) uint8 or
    [0, 1] float -> float32 (3, T, H, W)."""
    scale = 1.0 / (255.0 * 0.225) if frames.dtype == np.uint8 else 1.0 / 0.225
    clip = np.transpose(frames, (3, 0, 1, 2)).astype(np.float32) * np.float32(scale)
    clip -= np.float32(0.45 / 0.225)
    return torch.from_numpy(np.ascontiguousarray(clip))


@pytest.fixture(scope="module")
def ma52_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ma52")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    names = [f"000{i}_01_0001.mp4" for i in range(4)]
    for name in names:
        write_h264_mp4(root / "train" / name, rng.integers(0, 256, (9, 40, 32, 3), dtype=np.uint8))
    (root / "train_list_videos.txt").write_text("".join(f"{name} {i}\n" for i, name in enumerate(names)))
    return root


@pytest.mark.parametrize("short_side", [16, 24, 32])  # downscaled, odd scale factor, native size
def test_sampled_frames_are_the_per_frame_conversion(ma52_root, short_side):
    """The decoder's one swscale context per clip gives what a fresh conversion of each frame gives."""
    path = ma52_root / "train" / "0001_01_0001.mp4"
    width, height = short_side, round(40 * short_side / 32)
    frames = list(decoded_frames(path))
    expected = np.stack(
        [
            frames[index].to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")
            for index in sample_frame_indices(len(frames), 5)
        ]
    )
    assert np.array_equal(read_sampled_frames(path, 5, short_side), expected)


def reference_capsule(self, start, end, radius, colour) -> None:
    """The renderer's capsule in its plain form (one numpy expression per step)."""
    size = self.size
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float32), start[0].shape)
    pad = radius.max() + 1.5 / size
    x0 = max(int((min(start[0].min(), end[0].min()) - pad) * size), 0)
    x1 = min(int(np.ceil((max(start[0].max(), end[0].max()) + pad) * size)), size)
    y0 = max(int((min(start[1].min(), end[1].min()) - pad) * size), 0)
    y1 = min(int(np.ceil((max(start[1].max(), end[1].max()) + pad) * size)), size)
    if x0 >= x1 or y0 >= y1:
        return
    px = self.grid[None, None, x0:x1] - start[0][:, None, None].astype(np.float32)
    py = self.grid[None, y0:y1, None] - start[1][:, None, None].astype(np.float32)
    bx = (end[0] - start[0]).astype(np.float32)[:, None, None]
    by = (end[1] - start[1]).astype(np.float32)[:, None, None]
    if np.any(bx) or np.any(by):
        along = np.clip((px * bx + py * by) * (1.0 / (bx * bx + by * by + 1e-12)), 0.0, 1.0)
        px = px - along * bx
        py = py - along * by
    coverage = np.clip((radius[:, None, None] * size + 0.5) - np.sqrt(px * px + py * py) * size, 0.0, 1.0)
    region = self.image[:, y0:y1, x0:x1]
    region += coverage[..., None] * (colour - region)


@pytest.mark.parametrize("seed", [0, 5])
def test_synthetic_clips_are_the_reference_rasterization(seed, monkeypatch):
    """Bit for bit: the rasterizer's speed-ups must not change a single pixel."""
    kinds = [("train", {"training": True}), ("val", {}), ("test", {"num_frames": 5, "size": 48})]
    datasets = [
        synthetic.SyntheticMicroActions(split, **{"num_frames": 8, "size": 32, "seed": seed, **options})
        for split, options in kinds
    ]
    keys = [
        [(index, seed + index) if dataset.training else index for index in range(0, len(dataset), 97)]
        for dataset in datasets
    ]
    fast = [[dataset[key]["clip"] for key in dataset_keys] for dataset, dataset_keys in zip(datasets, keys)]
    monkeypatch.setattr(synthetic._Canvas, "capsule", reference_capsule)
    for dataset, dataset_keys, clips in zip(datasets, keys, fast):
        dataset._backgrounds.clear()  # rendered again with the reference
        for key, clip in zip(dataset_keys, clips):
            assert torch.equal(dataset[key]["clip"], clip), (dataset.split, key)


class Recorder(torch.nn.Module):
    """Stands in for the model: records its input, returns (logits, features)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen = None

    def forward(self, clip):
        self.seen = clip.detach().clone()
        pooled = clip.mean(dim=(2, 3, 4)) * self.weight
        return pooled.repeat(1, 18)[:, :52], pooled


def sum_loss(logits, features, labels, **groups):
    return logits.sum(), {}


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_model_sees_what_the_float_pipeline_gave(ma52_root, channels_last):
    datasets = [
        MA52Dataset(ma52_root, "train", num_frames=4, size=24, short_side=32, training=True),
        SyntheticMicroActions("train", num_frames=4, size=32, persons_per_split=1, training=True),
    ]
    for dataset in datasets:
        items = [dataset[(index, 100 + index)] for index in range(4)]
        batch = collate_clips(items)
        assert batch["clip"].dtype == (torch.uint8 if isinstance(dataset, MA52Dataset) else torch.float32)
        model = Recorder()
        model_step(model, sum_loss, batch["clip"], None, channels_last=channels_last)
        expected = torch.stack([float_pipeline(item["clip"].numpy()) for item in items])
        assert torch.equal(model.seen, expected)  # bit for bit: normalization moved, not changed
        assert model.seen.is_contiguous(
            memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format
        )


def test_augmentation_is_a_function_of_the_key(ma52_root):
    dataset = MA52Dataset(ma52_root, "train", num_frames=4, size=16, short_side=32, training=True)
    assert torch.equal(dataset[(2, 7)]["clip"], dataset[(2, 7)]["clip"])
    crops = {dataset[(2, seed)]["clip"].float().mean().item() for seed in range(8)}
    assert len(crops) > 2
    sampler = SeededSampler(torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, seed=0), 0, 0)
    sampler.set_epoch(3)
    keys = list(sampler)
    assert keys == list(sampler) and sorted(index for index, _ in keys) == [0, 1, 2, 3]
    sampler.set_epoch(4)
    assert [seed for _, seed in sampler] != [seed for _, seed in keys]
    # Workers do not matter: the same batches from 0 and 2 persistent worker processes.
    sampler.set_epoch(3)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=2,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_clips,
            persistent_workers=workers > 0,
        )
        batches.append([batch["clip"] for _ in range(2) for batch in loader])
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_repeated_augmentation_decodes_once_and_gives_k_clips(ma52_root, monkeypatch):
    import models.data.decode as decode

    calls = []
    real = decode.read_sampled_frames
    monkeypatch.setattr(decode, "read_sampled_frames", lambda *args: calls.append(args) or real(*args))
    dataset = MA52Dataset(ma52_root, "train", num_frames=4, size=16, short_side=32, training=True, repeats=3)
    items = dataset[(1, 5)]
    assert len(calls) == 1 and len(items) == 3
    assert all(item["label"] == 1 and item["index"] == 1 for item in items)
    assert len({item["clip"].float().mean().item() for item in items}) > 1  # different crops
    batch = collate_clips([items, None, dataset[(2, 6)]])
    assert batch["clip"].shape == (6, 4, 16, 16, 3) and batch["label"].tolist() == [1, 1, 1, 2, 2, 2]
    assert batch["num_dropped"] == 1
    with pytest.raises(ValueError, match="repeats"):
        MA52Dataset(ma52_root, "train", num_frames=4, size=16, short_side=32, repeats=2)  # not training
    cfg = resolve_config({"repeated_augmentation": 3, "batch_size": 8, "preset": "XS"})
    with pytest.raises(ValueError, match="repeated_augmentation"):
        Run(cfg, setup_distributed("cpu"))


def _tiny_step_setup():
    # TFAM on the last stage only: its ops and GIRL's are in the graph, and compiling stays short.
    cfg = resolve_config(
        {
            "preset": json.loads(TINY_PRESET),
            "num_frames": 4,
            "crop_size": 32,
            "tfam_stages": ["res5"],
            "girl_num_groups": 2,
            "device": "cpu",
        }
    )
    torch.manual_seed(0)
    model = builders.build_model(cfg).train()
    frames = torch.randint(0, 256, (8, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    return cfg, model, builders.build_loss(cfg), frames, labels


def _one_step(step, model, loss_fn, frames, labels, channels_last):
    torch.manual_seed(5)  # GIRL's pseudo-groups
    loss, parts, logits = step(model, loss_fn, frames, labels, channels_last=channels_last)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach(), grads


def _assert_same_step(a, b, tolerance):
    torch.testing.assert_close(a[0], b[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(a[1], b[1], rtol=tolerance, atol=tolerance)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=tolerance, atol=tolerance, msg=name)


def test_channels_last_step_equals_the_contiguous_step():
    _, model, loss_fn, frames, labels = _tiny_step_setup()
    eager = _one_step(model_step, model, loss_fn, frames, labels, False)
    to_channels_last(model)
    assert any(
        p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous() for p in model.parameters()
    )
    _assert_same_step(eager, _one_step(model_step, model, loss_fn, frames, labels, True), 1e-4)


def test_compiled_step_equals_the_eager_step():
    """fullgraph capture of normalization, model (TFAM's ops) and loss (GIRL) through Dynamo and
    AOTAutograd; aot_eager keeps it within test time (inductor's code generation takes minutes
    on a 2-core machine)."""
    _, model, loss_fn, frames, labels = _tiny_step_setup()
    eager = _one_step(model_step, model, loss_fn, frames, labels, False)
    compiled = torch.compile(model_step, fullgraph=True, backend="aot_eager")
    _assert_same_step(eager, _one_step(compiled, model, loss_fn, frames, labels, False), 1e-4)


def test_workers_default_to_the_cores_per_rank(monkeypatch):
    monkeypatch.setattr(data_loading.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 ranks on this node
    assert data_loading.num_workers(TrainConfig(num_workers=None)) == 4
    assert data_loading.num_workers(TrainConfig(num_workers=0)) == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert data_loading.num_workers(TrainConfig(num_workers=None)) == 16
