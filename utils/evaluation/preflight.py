"""What would fail only at the first validation, found before training: metrics the model cannot
produce and evaluator settings the COCO engine cannot compute.

The session calls these at start-up (`TrainingSession.__init__`) and `--check` calls them on the
model it builds, so a config that cannot be validated fails in seconds, not after an epoch.
Missing validation images are the other such failure: `utils.data.datasets.image_problems`.
"""

from __future__ import annotations

import numbers
from typing import Any

from mmengine.config import Config

from utils.config.tree import evaluator_configs
from utils.evaluation.coco_metric import STAT_NAMES

COCO_METRIC_TYPES = ("CocoMetric", "mmdet.CocoMetric")
# What mmdet's CocoMetric evaluates (its own `allowed_metrics`).
COCO_METRICS = ("bbox", "segm", "proposal", "proposal_fast")
# The statistics that read one IoU threshold, and the maxDets value of AP@[.5:.95].
THRESHOLD_OF = {"mAP_50": 0.5, "mAP_75": 0.75}
AP_MAX_DETS = 100


def predicts_masks(model: Any) -> bool | None:
    """Whether an mmdet detector predicts instance masks: True with a mask head (two-stage, SOLO,
    CondInst, ...), an RTMDet-Ins head or a MaskFormer; False for the other two-stage, single-stage
    and DETR-like detectors; None for a detector class this does not know."""
    from mmdet.models.dense_heads import RTMDetInsHead
    from mmdet.models.detectors import (
        DetectionTransformer,
        MaskFormer,
        SingleStageDetector,
        TwoStageDetector,
    )

    if getattr(model, "with_mask", False) or isinstance(model, MaskFormer):
        return True
    if isinstance(getattr(model, "bbox_head", None), RTMDetInsHead):
        return True
    if isinstance(model, TwoStageDetector | SingleStageDetector | DetectionTransformer):
        return False
    return None


def evaluation_problems(cfg: Config, model: Any) -> list[str]:
    """What the config's `val_evaluator` asks that this model or the COCO engine cannot give,
    each naming the key and what to do; none means the first validation can compute it all."""
    evaluator = cfg.get("val_evaluator")
    several = isinstance(evaluator, list | tuple)
    problems = []
    for index, metric_cfg in enumerate(evaluator_configs(evaluator)):
        key = f"val_evaluator.{index}" if several else "val_evaluator"
        metrics = as_list(metric_cfg.get("metric", "bbox"))
        if "segm" in metrics and predicts_masks(model) is False:
            rest = [m for m in metrics if m != "segm"] or ["bbox"]
            value = rest[0] if len(rest) == 1 else f"[{', '.join(rest)}]"
            problems.append(
                f"{key}.metric asks for 'segm', but the model ({type(model).__name__}) predicts "
                f"no masks: evaluate {value} (e.g. hyperparameters.override_mmdet_config: "
                f"{{{key}.metric: {value}}}) or train a config with a mask head."
            )
        if metric_cfg.get("type") in COCO_METRIC_TYPES:
            problems += coco_setting_problems(key, metric_cfg, metrics)
    return problems


def coco_setting_problems(key: str, metric_cfg: Any, metrics: list[Any]) -> list[str]:
    """A CocoMetric's `metric`, `metric_items`, `iou_thrs` and `proposal_nums` checked against
    what the COCO engines compute: the 12 statistics read IoU 0.5 and 0.75 (`mAP_50`, `mAP_75`),
    AP@[.5:.95] at 100 detections and the others at the third `proposal_nums` value."""
    problems = []
    unknown = [m for m in metrics if m not in COCO_METRICS]
    if unknown:
        problems.append(
            f"{key}.metric: {unknown} are not CocoMetric metrics; use {', '.join(COCO_METRICS)}."
        )
    items = metric_cfg.get("metric_items")
    items = list(STAT_NAMES) if items is None else as_list(items)
    unknown = [item for item in items if item not in STAT_NAMES]
    if unknown:
        problems.append(
            f"{key}.metric_items: {unknown} are not COCO statistics; use names of "
            f"{', '.join(STAT_NAMES)}."
        )
    if not any(m in ("bbox", "segm", "proposal") for m in metrics):
        return problems  # proposal_fast is mmdet's own recall, without the COCO engine
    thresholds = metric_cfg.get("iou_thrs")
    if thresholds is not None:
        values = as_list(thresholds)
        if not values or not all(_is_number(t) and 0 < t <= 1 for t in values):
            problems.append(
                f"{key}.iou_thrs is {thresholds!r}: give IoU thresholds between 0 and 1, or "
                "remove the key for COCO's 0.5:0.95."
            )
        else:
            lacking = {n: t for n, t in THRESHOLD_OF.items() if n in items and t not in values}
            if lacking:
                needed = " and ".join(str(t) for t in lacking.values())
                problems.append(
                    f"{key}.iou_thrs {values} lacks {needed}, which "
                    f"{' and '.join(lacking)} are measured at: add {needed}, or leave "
                    f"{' and '.join(lacking)} out of {key}.metric_items."
                )
    counts = metric_cfg.get("proposal_nums")
    if counts is not None:
        values = as_list(counts)
        if len(values) < 3 or not all(_is_number(n) and n >= 1 for n in values):
            problems.append(
                f"{key}.proposal_nums is {counts!r}: the COCO engine needs three or more "
                "detection counts per image (maxDets; mmdet's default is (100, 300, 1000))."
            )
        elif "mAP" in items and AP_MAX_DETS not in values:
            problems.append(
                f"{key}.proposal_nums {values} lacks {AP_MAX_DETS}, the detections per image "
                f"that mAP is measured at: add {AP_MAX_DETS}, or leave mAP out of "
                f"{key}.metric_items."
            )
    return problems


def as_list(value: Any) -> list[Any]:
    """A config value that may be one item, a list or tuple, or a numpy array, as a list."""
    if isinstance(value, list | tuple):
        return list(value)
    if hasattr(value, "tolist"):  # a numpy array in a Python config
        listed = value.tolist()
        return listed if isinstance(listed, list) else [listed]
    return [value]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
