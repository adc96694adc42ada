"""models/train.py and models/training/: end-to-end runs on tiny synthetic data, exact
resume, 2-process torchrun (gloo), the MA-52 path via a synthetic export, non-finite loss
handling, config layering and the smaller helpers."""

import csv
import json
import math

import pytest
import torch

from models import train
from models.training import run as run_module
from models.training.builders import lr_factor
from models.training.checkpointing import load_checkpoint, save_atomic
from models.training.cli import overrides_from_args
from models.training.config import TrainConfig, resolve_config
from models.training.distributed import setup as setup_distributed
from models.training.loop import NonFiniteLossError, subject_groups, train_one_epoch
from models.training.precision import check_memory_format
from tests.train_helpers import EVALUATE_SCRIPT, TRAIN_SCRIPT, one_thread, run_script, tiny_args  # noqa: F401


def _history_metrics(ckpt: dict) -> list:
    return [{k: v for k, v in record.items() if k != "epoch_seconds"} for record in ckpt["history"]]


def test_train_script_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_script([TRAIN_SCRIPT, *tiny_args(out, epochs=2)])
    assert "finished epoch 2/2" in result.stdout
    assert "best checkpoint, test (held-out persons)" in result.stdout
    for name in ("last.pt", "best.pt", "metrics.csv", "curves.png", "summary.json"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["val_f1_mean"]) <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["test"]["num_samples"] == 24
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and {"model", "optimizer", "scheduler", "scaler", "rng", "sampler"} <= set(ckpt)
    assert ckpt["config"]["epochs"] == 2 and ckpt["config"]["dataset"] == "synthetic"


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    # One DataLoader worker: its augmentation RNG must be reproducible too.
    train.main(tiny_args(whole, epochs=3) + ["--workers", "1"])
    train.main(tiny_args(parts, epochs=3) + ["--workers", "1", "--stop-after-epoch", "1"])
    assert load_checkpoint(parts / "last.pt")["epoch"] == 1
    # A fresh process continues, as after a real interruption; only --out and --resume given.
    run_script([TRAIN_SCRIPT, "--out", parts, "--resume", "--no-progress"])
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(parts / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"]
    assert _history_metrics(a) == _history_metrics(b)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    with open(parts / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_torchrun_two_processes_gloo_agree_with_single_process_evaluation(tmp_path):
    out = tmp_path / "ddp"
    run_script(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            TRAIN_SCRIPT,
            *tiny_args(out, epochs=1, eval_clips=23),
            "--no-test",
            "--device",
            "cpu",
            "--set",
            "eval_batch_size=1",
        ],
        timeout=300,
    )
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 1
    # The validation metrics gathered over the two ranks (odd split size: unequal shards)
    # equal a one-process evaluation of the saved weights on the whole split.
    # One clip per batch on both sides: the convolutions' rounding depends on the batch size,
    # which would let a near-tie prediction differ between the two runs.
    run_script(
        [
            EVALUATE_SCRIPT,
            out / "last.pt",
            "--split",
            "val",
            "--out",
            tmp_path / "eval",
            "--no-progress",
            "--max-points",
            "50",
            "--batch-size",
            "1",
        ]
    )
    single = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    gathered = ckpt["val_metrics"]
    assert gathered["num_samples"] == single["num_samples"] == 23
    for key in ("action_top1", "action_top5", "body_top1", "f1_mean"):
        assert gathered[key] == pytest.approx(single[key], abs=1e-9), key


def export_tiny_ma52(root):
    """One person per split (52 clips each), 48x48, 16 frames, test labels hidden (dummy 0)."""
    from models.data import export_ma52

    persons = {"train": 1, "val": 1, "test": 1}
    return export_ma52({"size": 48, "persons_per_split": persons}, root, frames_per_video=16, hide_test_labels=True)


def test_synthetic_export_trains_through_the_ma52_loader(tmp_path):
    root = export_tiny_ma52(tmp_path / "ma52")
    out = tmp_path / "run"
    summary = train.main(tiny_args(out, epochs=1, train_clips=8, eval_clips=8) + ["--data-root", str(root)])
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["dataset"] == "ma52" and ckpt["global_step"] == 1
    assert ckpt["val_metrics"]["num_samples"] == 8
    assert summary["test"] is None  # MA-52 test labels are dummy: no test metrics
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_prepared_ma52_trains_with_workers_and_repeated_augmentation(tmp_path, capsys):
    from models.data.prepare import prepare

    root = export_tiny_ma52(tmp_path / "ma52")
    prepare(root, tmp_path / "prepared", short_side=48, workers=1, progress=False)
    args = tiny_args(tmp_path / "run", epochs=1, train_clips=8, eval_clips=8)
    args[args.index("--workers") + 1] = "1"  # a persistent worker process, uint8 batches through the queue
    train.main(args + ["--data-root", str(tmp_path / "prepared"), "--repeated-aug", "2", "--no-test"])
    assert f"reading prepared MA-52 copy in {tmp_path / 'prepared'}" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["config"]["repeated_augmentation"] == 2 and ckpt["global_step"] == 2  # 8 clips of 4 videos x 2


class _NaNAtCall(torch.nn.Module):
    """Wraps the training loss: call number `bad_call` (1-based) returns NaN."""

    def __init__(self, loss_fn, bad_call: int):
        super().__init__()
        self.loss_fn, self.bad_call, self.calls = loss_fn, bad_call, 0

    def forward(self, logits, features, labels, **groups):
        self.calls += 1
        loss, parts = self.loss_fn(logits, features, labels, **groups)
        return (loss * float("nan") if self.calls == self.bad_call else loss), parts


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    build_loss = run_module.build_loss
    monkeypatch.setattr(run_module, "build_loss", lambda cfg: _NaNAtCall(build_loss(cfg), bad_call=6))
    out = tmp_path / "run"
    # 32 clips / batch 8 = 4 steps per epoch: call 6 is epoch 2, step 2.
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2/4 \(global step 6\)"):
        train.main(tiny_args(out, epochs=3))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_grad_scaler_skips_and_counts_a_non_finite_step(tmp_path):
    cfg = resolve_config(overrides_from_args(train.parse_args(tiny_args(tmp_path, epochs=1))))
    run = run_module.Run(cfg, setup_distributed("cpu"))
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # what fp16 on CUDA uses
    run.loss_fn = _NaNAtCall(run.loss_fn, bad_call=2)
    record = train_one_epoch(run, epoch=1)
    assert record["train_skipped_steps"] == 1 and run.scaler.get_scale() == 2.0**9
    assert math.isfinite(record["train_loss"])
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    run.log.close()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--no-tfam"], {"tfam": False}),
        (["--temporal-only"], {"temporal": True, "frequency": False}),
        (["--frequency-only"], {"temporal": False, "frequency": True}),
        (["--fusion", "mean"], {"fusion": "mean"}),
        (["--tfam-stages", "res4,res5"], {"tfam_stages": ["res4", "res5"]}),
        (["--no-girl"], {"girl": False}),
        (["--girl-groups", "subject"], {"girl_groups": "subject"}),
        (["--amp", "bf16"], {"amp": "bf16"}),  # CPU bf16 autocast
        (["--memory-format", "channels_last"], {"memory_format": "channels_last"}),
        (["--repeated-aug", "2"], {"repeated_augmentation": 2}),
    ],
)
def test_switches_train_a_step(tmp_path, flags, expected):
    args = tiny_args(tmp_path, epochs=1, train_clips=8, eval_clips=4) + ["--no-test"] + flags
    cfg = resolve_config(overrides_from_args(train.parse_args(args)))
    assert {k: getattr(cfg, k) for k in expected} == expected
    summary = train.main(args)
    assert summary["epochs_done"] == 1 and math.isfinite(summary["history"][0]["train_loss"])


def test_config_layering_and_errors(tmp_path):
    main_job = resolve_config({})
    assert main_job.dataset == "synthetic" and main_job.epochs < TrainConfig().epochs
    paper = resolve_config({"data_root": str(tmp_path)})
    assert paper.dataset == "ma52" and paper.preset == "M" and paper.batch_size == 80
    assert (paper.lr, paper.weight_decay, paper.epochs, paper.lr_milestones) == (1e-3, 1e-4, 120, [30, 60])
    with pytest.raises(ValueError, match="unknown config key"):
        resolve_config({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="'fusion'"):
        resolve_config({"fusion": "max"})
    with pytest.raises(ValueError, match="--data-root"):
        resolve_config({"dataset": "ma52"})
    for key, value in (
        ("repeated_augmentation", 0),
        ("prefetch_factor", 0),
        ("num_workers", -1),
        ("compile", "yes"),
        ("memory_format", "nhwc"),
    ):
        with pytest.raises(ValueError, match=f"'{key}'"):
            resolve_config({key: value})
    assert paper.num_workers is None and paper.memory_format == "contiguous" and not paper.compile
    with pytest.raises(ValueError, match="tfam_stages"):
        resolve_config({"tfam_stages": ["res6"]})


def test_subject_groups_give_every_group_two_members():
    subjects = torch.tensor([7, 7, 3, 9, 9, 9, 5, 1])  # persons 3, 5, 1 appear once
    groups, num_groups = subject_groups(subjects)
    assert num_groups == 3 and torch.bincount(groups, minlength=num_groups).min() >= 2
    assert groups[0] == groups[1] and groups[3] == groups[4] == groups[5] and groups[0] != groups[3]
    assert groups[2] == groups[6] == groups[7]
    lone, num_lone = subject_groups(torch.tensor([4, 4, 4, 8]))  # a single leftover joins a group
    assert num_lone == 1 and lone.tolist() == [0, 0, 0, 0] and lone.dtype == torch.int64
    # Ids in [0, G), as girl_loss takes them; G counts the pooled group only when there is one.
    for subjects in (torch.tensor([1, 1, 2, 2]), torch.tensor([1, 2, 3]), torch.tensor([5])):
        groups, num_groups = subject_groups(subjects)
        assert sorted(set(groups.tolist())) == list(range(num_groups))


def test_lr_schedules():
    cfg = TrainConfig(epochs=120, lr_milestones=[30, 60], lr_gamma=0.1, warmup_epochs=0)
    factor = lr_factor(cfg, steps_per_epoch=10)
    assert factor(299) == 1.0 and factor(300) == pytest.approx(0.1) and factor(600) == pytest.approx(0.01)
    cosine = lr_factor(cfg.replace(lr_schedule="cosine", warmup_epochs=1), steps_per_epoch=10)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0) and cosine(1199) < 1e-4


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_channels_last_bf16_cpu_refused_where_pytorch_computes_garbage():
    """The refusal guards a real defect: X3D's stem depthwise 5x1x1 conv under CPU bf16
    autocast with channels_last_3d gives a weight gradient that changes between identical
    calls at 4 frames; the guard lets through the layouts and frame counts that are exact."""

    def weight_grad_norms(frames: int, channels_last: bool) -> set:
        torch.manual_seed(0)
        conv = torch.nn.Conv3d(24, 24, (5, 1, 1), padding=(2, 0, 0), groups=24, bias=False)
        x, grad = torch.randn(8, 24, frames, 16, 16), torch.randn(8, 24, frames, 16, 16)
        if channels_last:
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        norms = set()
        for _ in range(12):
            conv.weight.grad = None
            scribble = [torch.full((1 << 16,), 1e30) for _ in range(8)]  # dirty the allocator's free blocks
            del scribble
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv(x)
            out.backward(grad.to(out.dtype))
            norms.add(round(float(conv.weight.grad.double().norm()), 3))
        return norms

    cpu = torch.device("cpu")
    assert len(weight_grad_norms(16, channels_last=True)) == 1 and len(weight_grad_norms(4, channels_last=False)) == 1
    check_memory_format(True, torch.bfloat16, cpu, 16)
    check_memory_format(True, None, cpu, 4)
    check_memory_format(False, torch.bfloat16, cpu, 4)
    with pytest.raises(ValueError, match="num_frames >= 5, got 4"):
        check_memory_format(True, torch.bfloat16, cpu, 4)
