"""The evaluation report of a validation or test split: the numbers behind the plots, the tables.

`evaluation_report` builds it on the chief from the COCO evaluation that has just run (no second
pass): per IoU type the precision-recall curves, precision/recall/F1 against the score threshold
with the best-F1 threshold, per-class AP (utils/evaluation/curves.py), TIDE's error breakdown and
the calibration; for boxes the confusion matrix (utils/evaluation/diagnostics.py); a streamed
evaluation's says instead that it has none of these (`not_computed`). `save_report`
writes it as `report.json` with the plots (utils/evaluation/plots.py) into a folder,
`evaluation/` of a checkpoint or of the evaluate command's output; `report_lines` and
`coco_table` are what a console shows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from utils.base.errors import ConfigError
from utils.evaluation.coco_metric import STAT_NAMES, BackendCocoMetric
from utils.evaluation.curves import CONFUSION_SCORE_THR, pr_curves, threshold_curves
from utils.evaluation.diagnostics import TIDE_LABELS, calibration, confusion_matrix, tide
from utils.evaluation.drawings import save_pngs

logger = logging.getLogger(__name__)
REPORT_DIR = "evaluation"  # in checkpoints and in the evaluate command's output
REPORT_FILE = "report.json"
TASKS = ("bbox", "segm")
# What a streamed evaluation's report says in place of what it cannot give.
NOT_STREAMED = (
    "TIDE, the calibration and the confusion matrix were not computed: the evaluation was "
    "streamed (hyperparameters.streamed_evaluation: true), and they need every detection on "
    "the chief."
)


def plot_settings(hparams: dict[str, Any]) -> float | None:
    """The confusion matrix's score threshold from the hyperparameter `evaluation_plots`
    (`{score_thr: 0.3}`, the default), or None for `false` (no plots)."""
    spec = hparams.get("evaluation_plots", {})
    if spec is False:
        return None
    example = "e.g. {score_thr: 0.3}, or false for no plots"
    if spec is True or spec is None:
        spec = {}
    if not isinstance(spec, dict) or set(spec) - {"score_thr"}:
        raise ConfigError(f"hyperparameters.evaluation_plots is {spec!r}: use {example}.")
    score_thr = spec.get("score_thr", CONFUSION_SCORE_THR)
    if (
        isinstance(score_thr, bool)
        or not isinstance(score_thr, int | float)
        or not (0 <= score_thr <= 1)
    ):
        raise ConfigError(
            f"hyperparameters.evaluation_plots.score_thr is {score_thr!r}: use a number from 0 "
            "to 1 (the confusion matrix counts detections scoring at least it)."
        )
    return float(score_thr)


def evaluation_report(
    metric: BackendCocoMetric, score_thr: float = CONFUSION_SCORE_THR
) -> dict[str, Any] | None:
    """The report of the metric's last evaluation; None when it evaluated nothing (no
    detections). `score_thr`: the confusion matrix's (detections scoring at least it)."""
    if not metric.arrays:
        return None
    coco = metric._coco_api
    report: dict[str, Any] = {"tasks": {}}
    for task, arrays in metric.arrays.items():
        curves = pr_curves(arrays)
        per_class = {}
        for name, cat_id in zip(arrays.classes, arrays.cat_ids, strict=True):
            missing = {"ap": -1.0}  # no objects of the class: -1 as COCO's per-class AP
            per_class[name] = {
                "instances": len(coco.getAnnIds(catIds=[cat_id], iscrowd=0)),
                "AP": curves["0.5:0.95"]["classes"].get(name, missing)["ap"],
                "AP50": curves["0.5"]["classes"].get(name, missing)["ap"],
            }
        report["tasks"][task] = {
            "pr_curves": curves,
            "threshold_curves": threshold_curves(arrays),
            "per_class": per_class,
        }
        # A streamed evaluation holds matches only: these need every detection.
        if task not in metric.streamed_last:
            report["tasks"][task]["tide"] = tide(metric.evals[task])
            report["tasks"][task]["calibration"] = calibration(metric.evals[task])
    if "bbox" in metric.evals and "bbox" not in metric.streamed_last:
        report["confusion_matrix"] = confusion_matrix(metric.evals["bbox"], score_thr)
    streamed = [task for task in report["tasks"] if task in metric.streamed_last]
    if streamed:  # said, rather than left out silently or drawn as the zeros hotcoco gives
        left_out = ["tide", "calibration", *(["confusion_matrix"] if "bbox" in streamed else [])]
        report["not_computed"] = {"parts": left_out, "tasks": streamed, "reason": NOT_STREAMED}
    return report


def save_report(
    report: dict[str, Any], drawings: dict[str, np.ndarray], folder: Path
) -> list[Path]:
    """Write `folder/report.json` and each drawing as `folder/<name>.png`."""
    text = json.dumps(_rounded(report))
    paths = save_pngs(drawings, folder)  # makes the folder
    path = folder / REPORT_FILE
    path.write_text(text)
    return [*paths, path]


def _rounded(value: Any) -> Any:
    """Floats to 6 decimals (a third of the file), recursively."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def coco_table(metrics: dict[str, float]) -> list[str]:
    """The 12 COCO statistics, one row each, one column per IoU type present."""
    tasks = [task for task in TASKS if f"{task}_mAP" in metrics]
    lines = [f"{'':<12}" + "".join(f"{task:>10}" for task in tasks)]
    for name in STAT_NAMES:
        values = [metrics.get(f"{task}_{name.replace('@', '_')}") for task in tasks]
        if any(value is not None for value in values):
            cells = "".join(f"{'' if v is None else f'{v:.3f}':>10}" for v in values)
            lines.append(f"{name:<12}{cells}")
    return lines


def report_lines(report: dict[str, Any]) -> list[str]:
    """Per-class AP (with each class's number of objects) and the best-F1 threshold per task."""
    tasks = list(report["tasks"])
    classes = list(report["tasks"][tasks[0]]["per_class"])
    width = max([12, *(len(name) + 2 for name in classes)])
    header = f"{'class':<{width}}{'objects':>8}"
    header += "".join(f"{f'{task} AP':>10}{f'{task} AP50':>12}" for task in tasks)
    lines = [header]
    for name in classes:
        first = report["tasks"][tasks[0]]["per_class"][name]
        row = f"{name:<{width}}{first['instances']:>8}"
        for task in tasks:
            values = report["tasks"][task]["per_class"][name]
            row += f"{values['AP']:>10.3f}{values['AP50']:>12.3f}"
        lines.append(row)
    for task in tasks:
        best = report["tasks"][task]["threshold_curves"]["best"]
        lines.append(
            f"{task}: best F1 {best['f1']:.3f} at score threshold {best['score_thr']:.3f} "
            f"(precision {best['precision']:.3f}, recall {best['recall']:.3f}, IoU 0.5, mean "
            "over classes)"
        )
    return [*lines, *tide_lines(report)]


def tide_lines(report: dict[str, Any]) -> list[str]:
    """TIDE's table, one column per IoU type: AP50 and the AP50 each error type costs (with its
    count), then the calibration error; then, after a streamed evaluation, why it has none."""
    tasks = [task for task in report["tasks"] if "tide" in report["tasks"][task]]
    not_computed = [report["not_computed"]["reason"]] if "not_computed" in report else []
    if not tasks:
        return not_computed
    lines = ["TIDE errors at IoU 0.5: the AP50 gained by fixing each type (how many there are)"]
    lines.append(f"{'':<12}" + "".join(f"{task:>16}" for task in tasks))
    lines.append(
        f"{'AP50':<12}" + "".join(f"{report['tasks'][t]['tide']['ap50']:>16.3f}" for t in tasks)
    )
    for error, name in TIDE_LABELS.items():
        cells = ""
        for task in tasks:
            errors = report["tasks"][task]["tide"]
            count = errors["counts"].get(error)
            cell = f"{errors['delta_ap'][error]:.3f}" + (f" ({count})" if count is not None else "")
            cells += f"{cell:>16}"
        lines.append(f"{name:<12}{cells}")
    lines.append(
        f"{'ECE':<12}"
        + "".join(f"{report['tasks'][t]['calibration']['ece']:>16.3f}" for t in tasks)
    )
    return [*lines, *not_computed]
