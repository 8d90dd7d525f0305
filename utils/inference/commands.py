"""The `export`, `predict` and `evaluate` commands, the same from either engine's command line
(`model_def.py ...`, `python -m on_ray ...`): their arguments, what they run on a checkpoint's
mmdet export (`CHECKPOINT/mmdet/`, `model.pth` + `config.py`, which both engines write), what
they print. An engine's adapter adds only how it finds and reads its checkpoints: `Checkpoints`.

mmdet is imported when a command runs: a command line checks the installed versions first (a
wrong mmcv fails mmdet's import with a bare assert).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.base.errors import USER_ERRORS, ExperimentError, ExportError, PredictError
from utils.base.files import CACHE_ROOT
from utils.evaluation.curves import CONFUSION_SCORE_THR

# Where the Determined adapter keeps the checkpoints it fetched by UUID (any command reads them).
FETCHED = CACHE_ROOT / "checkpoints"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CHECKPOINT_HELP = (
    "checkpoint folder (Determined's or Ray's, with mmdet/ inside, or an export folder with "
    "model.pth and config.py) or a Determined checkpoint UUID (model_def.py fetches it)"
)
IMAGE_ROOT_HELP = "folder the annotation file's file_names are relative to (default: its folder)"
BATCH_HELP = (
    "images per forward pass (default: the config's validation batch, with which the metrics "
    "equal validation's)"
)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def copy_export(checkpoint: Path, out: Path, experiment_conf: dict[str, Any] | None) -> Path:
    """Write a checkpoint's mmdet export into `out`: as it is, or with the `data` section of
    `experiment_conf` (for data that moved) in its config; the classes must stay the model's."""
    import torch
    from mmengine.config import Config

    from utils.data.prepare import prepare_source
    from utils.data.source import plan_data
    from utils.inference.predict import find_export
    from utils.training import export

    source = find_export(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    if experiment_conf is None:
        if out.resolve() != source.resolve():
            for name in (export.MODEL_FILE, export.CONFIG_FILE):  # renamed once complete
                shutil.copyfile(source / name, out / f".{name}.partial")
                (out / f".{name}.partial").replace(out / name)
        return out
    try:
        saved = torch.load(source / export.MODEL_FILE, map_location="cpu", weights_only=True)
        meta = saved["meta"]
        classes = tuple(meta["dataset_meta"]["classes"])
    except Exception as err:  # torch raises many types for a truncated or foreign file
        reason = str(err).splitlines()[0][:200]
        raise ExportError(f"{source / export.MODEL_FILE} cannot be read ({reason}).") from err
    cfg = Config.fromfile(source / export.CONFIG_FILE)
    # The data read and checked as a run reads them.
    cfg = prepare_source(cfg, plan_data(cfg, experiment_conf.get("data") or {}))
    data_classes = export.config_dataset_meta(cfg)["classes"]
    if tuple(data_classes) != classes:
        raise ExportError(
            f"the experiment's data has the classes {list(data_classes)}, the model "
            f"{list(classes)}: point its data section at data with the model's classes."
        )
    # The model's dataset_meta as trained (its palette too): only the data's paths change.
    dataset_meta, batches = meta["dataset_meta"], meta.get("iter")
    return export.write_export(out, saved["state_dict"], cfg, dataset_meta, batches)


def checkpoint_run(
    checkpoint: Path, environ: Mapping[str, str], experiment_conf: dict[str, Any] | None = None
) -> tuple[Any, str | None]:
    """Where an evaluation of a checkpoint logs to: the MlflowSettings of its experiment (when
    its engine keeps it) or of `environ`, and its training's run if the checkpoint (or the one
    around its `mmdet/`) names it in RUN_FILE; None for what is not known."""
    from utils.training.tracking import RUN_FILE
    from utils.training.tracking_settings import mlflow_settings

    settings = mlflow_settings(experiment_conf or {}, environ)
    run_file = (checkpoint.parent if checkpoint.name == "mmdet" else checkpoint) / RUN_FILE
    if settings is None or not run_file.is_file():
        return settings, None
    return settings, json.loads(run_file.read_text()).get("run_id")


@dataclass(frozen=True)
class Checkpoints:
    """What an engine adds to the commands: `locate` turns the CHECKPOINT argument into a local
    folder (e.g. fetching it); `export` writes a located checkpoint's export into a folder (with
    an experiment's data section); `tracking` names the MLflow settings and run of one."""

    locate: Callable[[str], str]
    export: Callable[[Path, Path, dict[str, Any] | None], Path] = copy_export
    tracking: Callable[[Path, Mapping[str, str]], tuple[Any, str | None]] = checkpoint_run


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, help="folder for model.pth and config.py")
    parser.add_argument(
        "--experiment",
        help="experiment YAML whose data section to use instead of the checkpoint's (for data "
        "that moved); the model and its classes stay the checkpoint's",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of it"
    )


def export(args: argparse.Namespace, checkpoints: Checkpoints) -> Path:
    """Writes the mmdet export (model.pth, config.py) of a checkpoint into a folder."""
    from utils.experiment.load import load_experiment

    conf = load_experiment(args.experiment, args.set) if args.experiment else None
    out = checkpoints.export(Path(checkpoints.locate(args.checkpoint)), Path(args.out), conf)
    print(f"Wrote {out / 'model.pth'} and {out / 'config.py'}.")
    return out


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders, or a COCO annotation file"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, help=BATCH_HELP)
    parser.add_argument(
        "--score-thr", type=float, default=0.3, help="draw predictions above it (default 0.3)"
    )
    parser.add_argument("--device", help="e.g. cuda:0 or cpu (default: CUDA when available)")
    parser.add_argument("--image-root", help=IMAGE_ROOT_HELP)
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip images that do not decode (counted and listed) instead of stopping",
    )
    parser.add_argument(
        "--max-rendered", type=int, metavar="N", help="draw the first N images only (default: all)"
    )


def check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: use 1 or more.")


def predict(args: argparse.Namespace, checkpoints: Checkpoints) -> dict[str, Any]:
    """Batch inference with a checkpoint: COCO results files, drawings, COCO metrics."""
    from utils.inference import predict as prediction
    from utils.inference.inputs import collect_inputs

    check_batch_size(args.batch_size)
    export_dir = prediction.find_export(checkpoints.locate(args.checkpoint))
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
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("annotation_file", help="the split's COCO annotation file")
    parser.add_argument("--image-root", help=IMAGE_ROOT_HELP)
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


def evaluate(args: argparse.Namespace, checkpoints: Checkpoints) -> dict[str, Any]:
    """Evaluate a checkpoint on a test split: COCO metrics, per-class AP, plots, MLflow."""
    from utils.evaluation.report import coco_table, report_lines
    from utils.inference import evaluate as evaluation
    from utils.inference.predict import find_export

    check_batch_size(args.batch_size)
    if not 0 <= args.score_thr <= 1:
        raise PredictError(f"--score-thr {args.score_thr}: use a number from 0 to 1.")
    checkpoint = Path(checkpoints.locate(args.checkpoint))
    export_dir = find_export(checkpoint)
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
            settings, run_id = checkpoints.tracking(checkpoint, dict(os.environ))
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


# name: (what it does, its arguments, the command); each command returns its result.
COMMANDS = {
    "export": (export.__doc__, export_arguments, export),
    "predict": (predict.__doc__, predict_arguments, predict),
    "evaluate": (evaluate.__doc__, evaluate_arguments, evaluate),
}


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `export`, `predict` and `evaluate` to a command line's subcommands."""
    for name, (doc, add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=(doc or "").splitlines()[0]))


def run_command(args: argparse.Namespace, checkpoints: Checkpoints) -> Any:
    """Run the parsed command with an engine's `checkpoints`; an error in what the command line
    names ends it with one line (`predict: ...`)."""
    try:
        return COMMANDS[args.command][2](args, checkpoints)
    except USER_ERRORS as err:
        option = " --experiment" if isinstance(err, ExperimentError) else ""
        raise SystemExit(f"{args.command}{option}: {err}") from err
