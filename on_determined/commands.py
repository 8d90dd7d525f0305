"""The `export` and `predict` commands of `model_def.py`: their arguments and what they print."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from on_determined.checkpoints import export_determined_checkpoint, local_checkpoint
from utils import predict as prediction
from utils.errors import PredictError
from utils.experiment import load_experiment
from utils.export import CONFIG_FILE, MODEL_FILE
from utils.inputs import collect_inputs


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="Determined checkpoint folder (or checkpoint UUID)")
    parser.add_argument("--out", required=True, help="folder for model.pth and config.py")
    parser.add_argument(
        "--experiment",
        help="experiment YAML whose data section to use instead of the checkpoint's (for data "
        "that moved); hyperparameters and config files stay the checkpoint's",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of it"
    )


def export(args: argparse.Namespace) -> Path:
    """Writes the mmdet export (model.pth, config.py) of a checkpoint into a folder."""
    conf = load_experiment(args.experiment, args.set) if args.experiment else None
    out = export_determined_checkpoint(local_checkpoint(args.checkpoint), args.out, conf)
    print(f"Wrote {out / MODEL_FILE} and {out / CONFIG_FILE}.")
    return out


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="checkpoint folder (Determined, with mmdet/ inside, or an export folder) or a "
        "Determined checkpoint UUID",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders, or a COCO annotation file"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument(
        "--score-thr", type=float, default=0.3, help="draw predictions above it (default 0.3)"
    )
    parser.add_argument("--device", help="e.g. cuda:0 or cpu (default: CUDA when available)")
    parser.add_argument(
        "--image-root",
        help="folder the annotation file's file_names are relative to (default: its folder)",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip images that do not decode (counted and listed) instead of stopping",
    )
    parser.add_argument(
        "--max-rendered", type=int, metavar="N", help="draw the first N images only (default: all)"
    )


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """Batch inference with a checkpoint: COCO results files, drawings, COCO metrics."""
    if args.batch_size < 1:
        raise PredictError(f"--batch-size {args.batch_size}: use 1 or more.")
    export_dir = prediction.find_export(local_checkpoint(args.checkpoint))
    inputs = collect_inputs(args.inputs, args.image_root)
    summary = prediction.predict(
        export_dir,
        inputs,
        Path(args.out),
        args.batch_size,
        args.score_thr,
        args.device,
        args.skip_bad_images,
        args.max_rendered,
    )
    print(f"Predicted {summary['images']} images: {summary['detections']} detections.")
    if summary["skipped"]:
        print(f"Skipped {len(summary['skipped'])} images that do not decode:")
        for path in summary["skipped"]:
            print(f"  {path}")
    if summary["metrics"]:
        print(f"COCO evaluation on {inputs.ann_file}:")
        for name, value in summary["metrics"].items():
            print(f"  {name:<18} {value:.3f}")
    print("Wrote " + ", ".join(summary["files"]) + f" and {Path(args.out) / 'images'}/.")
    return summary


# name: (what it does, its arguments, the command); `export` and `predict` return their results.
COMMANDS = {
    "export": (export.__doc__, export_arguments, export),
    "predict": (predict.__doc__, predict_arguments, predict),
}
