"""The numbers behind the evaluation plots, from the COCO evaluation that validation already ran.

An accumulated COCOeval holds, per IoU threshold, recall point (COCO's 101), class, area range and
maxDets: `precision` (interpolated: the best precision at this recall or above; its mean over the
recall points is the AP), `scores` (the score of the detection where each recall point is reached)
and `recall` (that of all detections). From these arrays alone, with no second pass:

- precision-recall curves per class and over all classes, at IoU 0.5 and averaged over the
  config's IoU thresholds (0.5:0.95), each with its AP, the mean of the curve as COCO takes it;
- precision, recall and F1 against the score threshold (IoU 0.5), per class and their mean over
  the classes, and the threshold of best mean F1 (recall is read on COCO's grid of 0.01).

What needs more than these arrays (TIDE, calibration, the confusion matrix) is in
utils/evaluation/diagnostics.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Score thresholds of the stored curves, and the finer grid the best F1 is searched on.
CURVE_THRESHOLDS = np.linspace(0.0, 1.0, 101)
SEARCH_THRESHOLDS = np.linspace(0.0, 1.0, 1001)
# The confusion matrix's default score threshold: mmdet's tools/analysis_tools/confusion_matrix.py.
CONFUSION_SCORE_THR = 0.3


@dataclass
class CocoArrays:
    """What the plots keep of one accumulated COCOeval: all areas, the maxDets of COCO's statistics
    (AP@[.5:.95] at 100 detections per image, the others at maxDets[2], as `coco_stats`)."""

    iou_type: str
    classes: list[str]  # along the class axis: the engine's sorted category ids
    cat_ids: list[int]
    recall_thrs: np.ndarray  # (R,)
    precision: np.ndarray  # (T, R, K) at 100 detections; -1 for classes without ground truth
    precision_50: np.ndarray  # (R, K) at IoU 0.5
    scores_50: np.ndarray  # (R, K) at IoU 0.5
    recall_50: np.ndarray  # (K,) at IoU 0.5: the recall of all detections

    @classmethod
    def from_coco_eval(cls, coco_eval: Any, names: dict[int, str]) -> CocoArrays:
        """Slice an accumulated COCOeval (pycocotools' or hotcoco's); `names`: category
        id -> class name."""
        params, arrays = coco_eval.params, coco_eval.eval
        area = list(params.areaRngLbl).index("all")
        max_dets = list(params.maxDets)
        at_100 = max_dets.index(100) if 100 in max_dets else len(max_dets) - 1
        top = min(2, len(max_dets) - 1)
        iou_50 = int(np.flatnonzero(np.isclose(np.asarray(params.iouThrs), 0.5))[0])
        cat_ids = [int(c) for c in params.catIds]
        return cls(
            iou_type=params.iouType,
            classes=[names[c] for c in cat_ids],
            cat_ids=cat_ids,
            recall_thrs=np.asarray(params.recThrs, dtype=np.float64),
            precision=np.asarray(arrays["precision"][:, :, :, area, at_100], dtype=np.float64),
            precision_50=np.asarray(arrays["precision"][iou_50, :, :, area, top], np.float64),
            scores_50=np.asarray(arrays["scores"][iou_50, :, :, area, top], dtype=np.float64),
            recall_50=np.asarray(arrays["recall"][iou_50, :, area, top], dtype=np.float64),
        )

    def with_ground_truth(self) -> np.ndarray:
        """Which classes have ground truth (the engines give them precision -1 otherwise)."""
        return (self.precision > -1).all(axis=(0, 1))


def pr_curves(arrays: CocoArrays) -> dict[str, Any]:
    """Precision at each recall point, per class and over all classes, with each curve's AP.

    `{"recall": [...], "0.5": curves, "0.5:0.95": curves}`, curves being `{"all": {"precision",
    "ap"}, "classes": {name: {"precision", "ap"}}}`; classes without ground truth are left out.
    """
    valid = arrays.with_ground_truth()
    result: dict[str, Any] = {"recall": arrays.recall_thrs.tolist()}
    for key, precision in (("0.5", arrays.precision_50), ("0.5:0.95", arrays.precision.mean(0))):
        classes = {
            name: {"precision": precision[:, k].tolist(), "ap": float(precision[:, k].mean())}
            for k, name in enumerate(arrays.classes)
            if valid[k]
        }
        overall = precision[:, valid].mean(axis=1) if valid.any() else np.zeros(len(precision))
        result[key] = {
            "all": {"precision": overall.tolist(), "ap": float(overall.mean())},
            "classes": classes,
        }
    return result


def _per_class_at(arrays: CocoArrays, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall and F1 (T, K) of each class with ground truth at each score threshold:
    the last recall point that detections scoring at least the threshold reach."""
    valid = np.flatnonzero(arrays.with_ground_truth())
    shape = (len(thresholds), len(valid))
    precision, recall = np.full(shape, np.nan), np.zeros(shape)
    for column, k in enumerate(valid):
        # Recall points past the recall of all detections are not reached (the engines leave
        # precision and score 0 there).
        reached = arrays.recall_thrs <= arrays.recall_50[k] + 1e-12
        scores = arrays.scores_50[reached, k]  # non-increasing along the recall points
        count = np.searchsorted(-scores, -thresholds, side="right")  # points scoring >= thr
        hit = count > 0
        precision[hit, column] = arrays.precision_50[reached, k][count[hit] - 1]
        recall[hit, column] = arrays.recall_thrs[reached][count[hit] - 1]
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return precision, recall, f1


def threshold_curves(arrays: CocoArrays) -> dict[str, Any]:
    """Precision, recall and F1 at IoU 0.5 against the score threshold, per class and their mean
    over the classes with ground truth, and the threshold of best mean F1 (`best`: score_thr,
    f1, precision, recall; keep detections scoring at least score_thr)."""
    names = [
        name for name, ok in zip(arrays.classes, arrays.with_ground_truth(), strict=True) if ok
    ]
    precision, recall, f1 = _per_class_at(arrays, CURVE_THRESHOLDS)
    result: dict[str, Any] = {"score_thr": CURVE_THRESHOLDS.tolist(), "classes": {}}
    for column, name in enumerate(names):
        result["classes"][name] = {
            "precision": _listed(precision[:, column]),
            "recall": recall[:, column].tolist(),
            "f1": f1[:, column].tolist(),
        }
    result["all"] = {
        "precision": _listed(_nanmean(precision)),
        "recall": _mean(recall).tolist(),
        "f1": _mean(f1).tolist(),
    }
    result["best"] = best_f1(arrays)
    return result


def best_f1(arrays: CocoArrays) -> dict[str, float]:
    """The score threshold of best mean F1 over the classes, on a 0.001 grid (the highest of
    equal ones), with the mean precision and recall there; zeros without detections."""
    precision, recall, f1 = _per_class_at(arrays, SEARCH_THRESHOLDS)
    mean_f1 = _mean(f1)
    if not mean_f1.size or mean_f1.max() <= 0:
        return {"score_thr": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    index = len(mean_f1) - 1 - int(np.argmax(mean_f1[::-1]))
    return {
        "score_thr": float(SEARCH_THRESHOLDS[index]),
        "f1": float(mean_f1[index]),
        "precision": float(np.nan_to_num(_nanmean(precision)[index])),
        "recall": float(_mean(recall)[index]),
    }


def _mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=1) if values.shape[1] else np.zeros(len(values))


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the classes that have detections above the threshold (NaN where none has)."""
    counts = np.isfinite(values).sum(axis=1)
    sums = np.nansum(values, axis=1)
    return np.divide(sums, counts, out=np.full(len(values), np.nan), where=counts > 0)


def _listed(values: np.ndarray) -> list[float | None]:
    """JSON has no NaN: None where a precision is undefined (no detection above the threshold)."""
    return [None if np.isnan(v) else float(v) for v in values]
