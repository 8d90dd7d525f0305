"""The `export`, `predict` and `evaluate` commands of `model_def.py`: their arguments and what
they print."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from on_determined.checkpoints import (
    checkpoint_tracking,
    export_determined_checkpoint,
    local_checkpoint,
)
from utils.base.errors import PredictError
from utils.evaluation.curves import CONFUSION_SCORE_THR
from utils.evaluation.report import coco_table, report_lines
from utils.experiment.load import load_experiment
from utils.inference import evaluate as evaluation
from utils.inference import predict as prediction
from utils.inference.inputs import collect_inputs
from utils.training.export import CONFIG_FILE, MODEL_FILE

BATCH_HELP = (
    "images per forward pass (default: the config's validation batch, with which the metrics "
    "equal validation's)"
)


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
    parser.add_argument("--batch-size", type=int, help=BATCH_HELP)
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
    if args.batch_size is not None and args.batch_size < 1:
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
    print(
        f"Predicted {summary['images']} images in batches of {summary['batch_size']}: "
        f"{summary['detections']} detections."
    )
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


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="checkpoint folder (Determined, with mmdet/ inside, or an export folder) or a "
        "Determined checkpoint UUID",
    )
    parser.add_argument("annotation_file", help="the split's COCO annotation file")
    parser.add_argument(
        "--image-root",
        help="folder the annotation file's file_names are relative to (default: its folder)",
    )
    parser.add_argument("--out", help="output folder (default: runs/evaluate/SPLIT_NAME)")
    parser.add_argument(
        "--split-name", default="test", help="the split's name: MLflow's `<name>/` (test)"
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON only")
    parser.add_argument("--batch-size", type=int, help=BATCH_HELP)
    parser.add_argument("--device", help="e.g. cuda:0 or cpu (default: CUDA when available)")
    parser.add_argument(
        "--score-thr",
        type=float,
        default=CONFUSION_SCORE_THR,
        help="the confusion matrix counts detections scoring at least it, the drawings those "
        "above it (0.3)",
    )
    parser.add_argument(
        "--max-rendered", type=int, default=8, metavar="N", help="draw the first N images (8)"
    )
    parser.add_argument(
        "--no-mlflow", action="store_true", help="do not log to MLflow, even where configured"
    )


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a checkpoint on a test split: COCO metrics, per-class AP, plots, MLflow."""
    if args.batch_size is not None and args.batch_size < 1:
        raise PredictError(f"--batch-size {args.batch_size}: use 1 or more.")
    if not 0 <= args.score_thr <= 1:
        raise PredictError(f"--score-thr {args.score_thr}: use a number from 0 to 1.")
    checkpoint = local_checkpoint(args.checkpoint)
    export_dir = prediction.find_export(checkpoint)
    out = Path(args.out or Path("runs") / "evaluate" / args.split_name)
    # With --json, stdout is the JSON alone: the COCO engines print their tables to stdout.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        result = evaluation.evaluate(
            export_dir,
            Path(args.annotation_file),
            out,
            args.image_root,
            args.batch_size,
            args.device,
            args.score_thr,
            args.max_rendered,
            args.split_name,
        )
        settings, run_id = (None, None)
        if not args.no_mlflow:
            settings, run_id = checkpoint_tracking(checkpoint, dict(os.environ))
        if settings is not None:
            result["mlflow_run_id"] = evaluation.log_evaluation(
                settings, run_id, args.split_name, result, out, args.checkpoint
            )
    if args.json:
        print(json.dumps(result["metrics"], indent=1))
        return result
    print(
        f"Evaluated {result['images']} images of {args.annotation_file} ({args.split_name}) in "
        f"batches of {result['batch_size']}, model trained {result['batches']} batches:"
    )
    print("\n".join(coco_table(result["metrics"])))
    if result["report"] is not None:
        print("\n".join(report_lines(result["report"])))
    if "mlflow_run_id" in result:
        print(f"MLflow run {result['mlflow_run_id']}: {args.split_name}/ metrics and files.")
    print(f"Wrote {out}/: metrics.json, results, evaluation/ plots and report.json, images/.")
    return result


# name: (what it does, its arguments, the command); each returns its result.
COMMANDS = {
    "export": (export.__doc__, export_arguments, export),
    "predict": (predict.__doc__, predict_arguments, predict),
    "evaluate": (evaluate.__doc__, evaluate_arguments, evaluate),
}
