"""Evaluate a detector export on a COCO annotation file (a test split after training), as
validation does, and write everything into one folder:

    results.bbox.json, results.segm.json, images.json   the predictions (utils/inference/predict.py)
    metrics.json                                        the metrics, with what was evaluated
    evaluation/*.png, evaluation/report.json            the plots and their numbers
    images/                                             drawings of the first few images

`log_evaluation` puts the metrics (as `<split>/<metric>`) and the folder (as `<split>/`) into an
MLflow run: the training run of the checkpoint when it is known, else a new one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from utils.base.errors import PredictError
from utils.evaluation.curves import CONFUSION_SCORE_THR
from utils.evaluation.plots import draw_report
from utils.evaluation.report import REPORT_DIR, evaluation_report, save_report
from utils.inference.inputs import coco_inputs
from utils.inference.predict import run_predictions
from utils.training.tracking import MlflowRun
from utils.training.tracking_settings import MlflowSettings

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
BAD_IMAGE_HINT = "fix or remove it, and its entry in the annotation file, then evaluate again"


def evaluate(
    export_dir: Path,
    ann_file: Path,
    out_dir: Path,
    image_root: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    score_thr: float = CONFUSION_SCORE_THR,
    max_rendered: int = 8,
    split: str = "test",
) -> dict[str, Any]:
    """Predict and evaluate every image of `ann_file`; write the folder described above.

    Args:
        export_dir: folder with `model.pth` and `config.py` (`utils.inference.predict.find_export`).
        ann_file: the COCO annotation file of the split.
        out_dir: output folder (created).
        image_root: the folder the file's `file_name`s are relative to (default: its folder).
        batch_size: images per forward pass; by default the config's validation batch, so the
            metrics equal validation's on the same images.
        device: e.g. "cuda:0" or "cpu"; CUDA when available by default.
        score_thr: the confusion matrix counts detections scoring at least it, drawings those
            above it.
        max_rendered: draw the first this many images.
        split: the split's name, recorded in `metrics.json`.

    Returns:
        `{"metrics", "report", "files", "images", "detections", "batch_size", "batches"}`.
    """
    ann_file = Path(ann_file)
    if ann_file.is_file() and ann_file.stat().st_size == 0:
        raise PredictError(f"{ann_file} is empty (0 bytes): pass the split's COCO annotation file.")
    inputs = coco_inputs(ann_file, image_root)  # structural checks, missing images
    if not inputs.images:
        raise PredictError(f"{ann_file} lists no images: there is nothing to evaluate.")
    if not json.loads(ann_file.read_text())["annotations"]:
        raise PredictError(
            f"{ann_file} has no annotations: evaluation needs the ground truth of its images "
            "(for predictions alone, use the predict command)."
        )
    summary, evaluator = run_predictions(
        export_dir,
        inputs,
        out_dir,
        batch_size,
        score_thr,
        device,
        max_rendered=max_rendered,
        bad_hint=BAD_IMAGE_HINT,
    )
    metric = evaluator.coco_metric() if evaluator is not None else None
    report = evaluation_report(metric, score_thr) if metric is not None else None
    files = [Path(f) for f in summary["files"]]
    if report is not None:
        files += save_report(report, draw_report(report), out_dir / REPORT_DIR)
    record = {
        "split": split,
        "annotation_file": str(ann_file.resolve()),
        "model": str(Path(export_dir).resolve()),
        "batches": summary["batches"],
        "batch_size": summary["batch_size"],
        "images": summary["images"],
        "metrics": summary["metrics"],
    }
    metrics_file = out_dir / METRICS_FILE
    metrics_file.write_text(json.dumps(record, indent=1))
    return {
        "metrics": summary["metrics"],
        "report": report,
        "files": [*files, metrics_file],
        "images": summary["images"],
        "detections": summary["detections"],
        "batch_size": summary["batch_size"],
        "batches": summary["batches"],
    }


def log_evaluation(
    settings: MlflowSettings,
    run_id: str | None,
    split: str,
    result: dict[str, Any],
    out_dir: Path,
    checkpoint: str,
) -> str:
    """Log an evaluation into the training run `run_id` if the server has it, else into a new
    run of the settings' experiment; returns the run's id.

    Metrics go in as `<split>/<metric>` at the batches the model trained (0 if unknown), the
    output folder as the artifacts `<split>/`, the checkpoint and annotation file as tags.
    """
    run = MlflowRun(settings)
    new = not (run_id and run.attach(run_id))
    if new:
        run.start(f"{split} evaluation of {Path(checkpoint).name}", "", {"evaluation": split})
    step = result["batches"] or 0
    run.log_metrics({f"{split}/{name}": value for name, value in result["metrics"].items()}, step)
    record = json.loads((out_dir / METRICS_FILE).read_text())
    run.set_tag(f"{split}.checkpoint", checkpoint)
    run.set_tag(f"{split}.annotation_file", record["annotation_file"])
    run.log_folder(out_dir, split)
    if new:
        run.end("FINISHED")
    logger.info(
        "MLflow: %s metrics in %s run %s.", split, "a new" if new else "the training", run.run_id
    )
    return str(run.run_id)
