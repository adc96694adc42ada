"""Evaluate a PIUmr checkpoint (last.pt or best.pt of models/train.py) on one split.

    python models/evaluate.py runs/synthetic/best.pt --split test
    python models/evaluate.py runs/ma52_x3d_m/best.pt --split test --data-root /data/MA-52
    torchrun --nproc_per_node 8 models/evaluate.py runs/ma52_x3d_m/best.pt --split val

Writes to --out (default: <checkpoint folder>/eval_<split>):
  metrics.json              the official MA-52 metrics (SPEC §6) and what they were computed on
  confusion_action.png      52 x 52 row-normalized confusion matrix
  confusion_body.png        7 x 7, body = body of the predicted action
  tsne_body.png             t-SNE (scikit-learn) of the pre-classifier features, coloured by body part
  cosine_intra_class.png    cosine similarities of same-class feature pairs (paper Fig. 4-5)
  cosine_inter_class.png    ... and of different-class pairs
  prediction.csv            challenge submission (vid, action_pred_1..5, body_pred_1..5), test split
MA-52's test labels are dummy zeros: on that split no metrics or confusion matrices are
written, and the t-SNE and histograms use the predicted classes (said in their titles).
A missing or damaged checkpoint or data folder prints one error line and exits with status 1.
"""

import argparse
import json
from pathlib import Path

from models.errors import CheckpointError
from models.training.config import TrainConfig, choices


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="last.pt or best.pt written by models/train.py")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/eval_<split>)")
    p.add_argument("--data-root", help="MA-52 root, when it moved since training")
    p.add_argument("--batch-size", type=int, help="clips per process and step")
    p.add_argument("--workers", type=int, help="DataLoader workers per process")
    p.add_argument("--device", choices=choices("device"), default="auto")
    p.add_argument("--amp", choices=choices("amp"), help="default: the training run's setting")
    p.add_argument("--max-points", type=int, default=2000, help="clips used for t-SNE and histograms")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    # Imported here so that --help does not wait for torch.
    from models.evaluation.prediction import predict
    from models.training import distributed as dist_utils
    from models.training.builders import build_model
    from models.training.checkpointing import load_checkpoint
    from models.training.data_loading import build_dataset, build_loader
    from models.training.precision import resolve_amp

    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{args.checkpoint}: not a models/train.py checkpoint (needs 'config' and 'model')")
    changes = {
        key: value
        for key, value in (("data_root", args.data_root), ("num_workers", args.workers), ("amp", args.amp))
        if value is not None
    }
    cfg = TrainConfig.from_dict({**ckpt["config"], **changes, "device": args.device}, f"{args.checkpoint}'s config")
    if cfg.dataset == "dfew":
        raise CheckpointError(
            f"{args.checkpoint}: a DFEW run; evaluate.py writes MA-52's metrics and figures, "
            "expected an MA-52 or synthetic checkpoint (DFEW runs report WAR and UAR in training)"
        )
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{args.split}"

    info = dist_utils.setup(cfg.device)
    try:
        model = build_model(cfg, load_pretrained=False)
        model.load_state_dict(ckpt["model"])
        model.to(info.device)
        dataset = build_dataset(cfg, args.split, train=False)
        batch = args.batch_size or cfg.eval_batch_size or max(1, cfg.batch_size // info.world_size)
        loader = build_loader(dataset, cfg, info, train=False, batch_size=batch)
        pred = predict(
            model,
            loader,
            info,
            resolve_amp(cfg.amp, info.device),
            with_features=True,
            progress=args.progress,
            desc=args.split,
        )
        if not info.is_main:
            return {}
        return write_report(pred, dataset, cfg, args, out_dir, ckpt.get("epoch"))
    finally:
        dist_utils.cleanup()


def write_report(pred: dict, dataset, cfg: TrainConfig, args, out_dir: Path, epoch) -> dict:
    from models.data.labels import ACTION_NAMES, BODY_NAMES, body_of_action
    from models.evaluation import figures
    from models.evaluation.metrics import write_prediction_csv
    from models.evaluation.prediction import evaluate_predictions, split_has_labels

    out_dir.mkdir(parents=True, exist_ok=True)
    labelled = split_has_labels(cfg, args.split)
    action_pred = pred["scores"].argmax(1).numpy()
    report = {
        "checkpoint": str(args.checkpoint),
        "epoch": epoch,
        "dataset": cfg.dataset,
        "split": args.split,
        "num_clips": int(pred["scores"].shape[0]),
        "num_unreadable": pred["num_dropped"],
        "labels_available": labelled,
    }
    if labelled:
        report["metrics"] = evaluate_predictions(pred)
        action_true = pred["label"].numpy()
        figures.confusion_png(
            action_true, action_pred, ACTION_NAMES, out_dir / "confusion_action.png", f"action confusion ({args.split})"
        )
        figures.confusion_png(
            body_of_action(action_true),
            body_of_action(action_pred),
            BODY_NAMES,
            out_dir / "confusion_body.png",
            f"body confusion ({args.split})",
        )
        classes, which = action_true, "true"
    else:
        print(
            f"{args.split}: labels are not public (dummy zeros); no metrics or confusion matrices, "
            f"t-SNE and histograms use the predicted classes"
        )
        classes, which = action_pred, "predicted"
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(report, f, indent=2)
    features = pred["features"]
    figures.tsne_png(
        features,
        body_of_action(classes),
        out_dir / "tsne_body.png",
        f"t-SNE of features, {args.split}, coloured by {which} body",
        max_points=args.max_points,
    )
    intra, inter = figures.pair_cosines(features, classes, max_points=args.max_points)
    figures.cosine_histogram_png(intra, out_dir / "cosine_intra_class.png", f"intra-class ({which} action)", "tab:blue")
    figures.cosine_histogram_png(inter, out_dir / "cosine_inter_class.png", f"inter-class ({which} action)", "tab:red")
    if args.split == "test":
        names_of = getattr(dataset, "dataset", dataset).names  # through a max_eval_clips KeyedSubset
        names = [names_of[i] for i in pred["index"].tolist()]
        write_prediction_csv(out_dir / "prediction.csv", names, pred["scores"])
    if labelled:
        m = report["metrics"]
        print(
            f"{args.split} ({report['num_clips']} clips): action top-1 {m['action_top1']:.1%}, top-5 "
            f"{m['action_top5']:.1%}, body top-1 {m['body_top1']:.1%}, F1_mean {m['f1_mean']:.1%}"
        )
    print(f"wrote {out_dir}")
    return report
