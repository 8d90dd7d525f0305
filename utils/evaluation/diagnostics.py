"""What a COCO evaluation says beyond its statistics, from hotcoco's evaluation of it.

- TIDE's error breakdown (Bolya et al., ECCV 2020): each false positive at IoU 0.5 is a
  classification error (right place, wrong class), a localisation error (right class, IoU
  between 0.1 and 0.5), both, a duplicate, or background; each object no detection found is
  missed. Per type, how much AP50 rises when those errors are fixed (`delta_ap`) and how many
  there are: where the AP is lost, so what to work on.
- Calibration: the detections binned by score, each bin's share of true positives (IoU 0.5)
  against its mean score, and the expected calibration error (ECE, their count-weighted gap).
- The confusion matrix of boxes: COCO's greedy one-to-one matching by score at IoU 0.5,
  regardless of class, of the detections scoring at least a threshold.

The calibration and the confusion matrix equal ours computed from pycocotools' matches (tests).
With the pycocotools engine, hotcoco evaluates the same detections again for these.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

# TIDE's error types in the order of the report, the table and the plot, and their names there;
# `FP` and `FN` are all false positives and all misses at once.
TIDE_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
TIDE_LABELS = {"Cls": "class", "Loc": "location", "Both": "class+loc", "Dupe": "duplicate",
               "Bkg": "background", "Miss": "missed", "FP": "all FP", "FN": "all FN"}  # fmt: skip
CALIBRATION_BINS = 10
MATCH_IOU = 0.5  # the IoU of TIDE's positives, the calibration's and the confusion matrix's


def hotcoco_eval(coco_eval: Any) -> Any:
    """The evaluation as hotcoco's: itself, or (pycocotools') evaluated again by hotcoco with
    the same ground truth, detections and parameters."""
    if hasattr(coco_eval, "tide_errors"):
        return coco_eval
    from hotcoco import COCO, COCOeval

    params = coco_eval.params
    field = "segmentation" if params.iouType == "segm" else "bbox"
    detections = [
        {key: ann[key] for key in ("image_id", "category_id", "score", field)}
        for ann in coco_eval.cocoDt.anns.values()
    ]
    ground_truth = COCO(coco_eval.cocoGt.dataset)
    twin = COCOeval(ground_truth, ground_truth.loadRes(detections), params.iouType)
    twin.params.catIds = [int(c) for c in params.catIds]
    twin.params.imgIds = list(params.imgIds)
    twin.params.maxDets = [int(m) for m in params.maxDets]
    twin.params.iouThrs = [float(t) for t in params.iouThrs]
    twin.params.useCats = bool(params.useCats)
    run(twin)
    return twin


def run(coco_eval: Any) -> None:
    """evaluate and accumulate, without hotcoco's warnings of what mmdet's settings mean."""
    with hotcoco_quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()


@contextlib.contextmanager
def hotcoco_quiet() -> Iterator[None]:
    """Without hotcoco's warnings that mmdet's maxDets (100, 300, 1000) are not COCO's (1, 10,
    100) and that proposals pool the classes (useCats 0): both are what mmdet asks for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "hotcoco: (max_dets|use_cats)", UserWarning)
        yield


def tide(coco_eval: Any) -> dict[str, Any]:
    """TIDE's breakdown: `ap50` (COCO's AP at IoU 0.5, the base), per error type `delta_ap`
    (with `FP` and `FN`, all false positives and all misses fixed at once) and `counts`."""
    errors = hotcoco_eval(coco_eval).tide_errors(pos_thr=MATCH_IOU, bg_thr=0.1)
    return {
        "ap50": float(errors["ap_base"]),
        "delta_ap": {name: float(errors["delta_ap"][name]) for name in TIDE_LABELS},
        "counts": {name: int(errors["counts"][name]) for name in TIDE_ERRORS},
        "pos_thr": float(errors["pos_thr"]),
        "bg_thr": float(errors["bg_thr"]),
    }


def calibration(coco_eval: Any) -> dict[str, Any]:
    """ECE, the largest gap (`mce`), and per score bin its `lower`, `upper`, `confidence` (mean
    score), `accuracy` (share of true positives) and `count`; `per_class` ECE."""
    result = hotcoco_eval(coco_eval).calibration(n_bins=CALIBRATION_BINS, iou_threshold=MATCH_IOU)
    bins = [
        {
            "lower": float(b["bin_lower"]),
            "upper": float(b["bin_upper"]),
            "confidence": float(b["avg_confidence"]),
            "accuracy": float(b["avg_accuracy"]),
            "count": int(b["count"]),
        }
        for b in result["bins"]
    ]
    return {
        "ece": float(result["ece"]),
        "mce": float(result["mce"]),
        "iou_thr": MATCH_IOU,
        "detections": int(result["num_detections"]),
        "bins": bins,
        "per_class": {name: float(v) for name, v in result["per_category"].items()},
    }


def confusion_matrix(coco_eval: Any, score_thr: float) -> dict[str, Any]:
    """Box counts (K + 1, K + 1) of the detections scoring at least `score_thr`: rows the
    object's class, columns the detection's (`cat_ids` order), the last row detections of no
    object (background), the last column objects no detection found. Crowd regions are left
    out; a detection on one counts as background."""
    evaluation = hotcoco_eval(coco_eval)
    # Every detection of an image takes part (no maxDets cap): at most all of them.
    cap = max(len(evaluation.coco_dt.get_ann_ids()), 1)
    result = evaluation.confusion_matrix(iou_thr=MATCH_IOU, max_det=cap, min_score=score_thr)
    return {
        "classes": [*result["cat_names"], "background"],
        "cat_ids": [int(c) for c in result["cat_ids"]],
        "score_thr": score_thr,
        "iou_thr": MATCH_IOU,
        "counts": np.asarray(result["matrix"], dtype=np.int64).tolist(),
    }
