"""COCO evaluation with MMDetection's own metrics (pycocotools), safe to split across ranks.

Each rank keeps the metric entries of the images it predicted, keyed by image id; `compute` merges
the entries of all ranks, counts every image once (distributed samplers may repeat images to pad
the last batches), and evaluates them with the config's `val_evaluator`.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from mmengine.config import Config
from mmengine.registry import METRICS

# All 12 COCO statistics, in pycocotools' order, under mmdet's names.
COCO_ITEMS = (
    "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
    "AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000",
)  # fmt: skip


class CocoEvaluator:
    """Collects per-image metric entries with `update`; `compute` evaluates them once per image."""

    def __init__(self, cfg: Config) -> None:
        evaluator_cfgs = cfg.val_evaluator
        if not isinstance(evaluator_cfgs, (list, tuple)):
            evaluator_cfgs = [evaluator_cfgs]
        self.metrics = []
        for metric_cfg in evaluator_cfgs:
            metric_cfg = copy.deepcopy(metric_cfg)
            if metric_cfg.type == "CocoMetric" and "metric_items" not in metric_cfg:
                metric_cfg.metric_items = list(COCO_ITEMS)
            self.metrics.append(METRICS.build(metric_cfg))
        self.entries: list[tuple[Any, list[list[Any]]]] = []

    def set_dataset_meta(self, meta: dict[str, Any]) -> None:
        for metric in self.metrics:
            metric.dataset_meta = meta

    def reset(self) -> None:
        self.entries = []

    def update(self, data_samples: list[Any]) -> None:
        """Add the predictions (DetDataSample with `pred_instances`) of one batch."""
        for sample in data_samples:
            output = sample.to_dict()
            per_metric = []
            for metric in self.metrics:
                metric.process({}, [output])
                per_metric.append(metric.results)
                metric.results = []
            # COCO ids are ints, VOC ids file names: keep them as the dataset gives them.
            self.entries.append((output["img_id"], per_metric))

    def compute(
        self, entries_per_rank: list[list[tuple[int, list[list[Any]]]]]
    ) -> dict[str, float]:
        """Evaluate the union of the ranks' entries, each image once; returns flat float metrics."""
        by_image = {}
        for entries in entries_per_rank:
            for img_id, per_metric in entries:
                by_image.setdefault(img_id, per_metric)
        results: dict[str, Any] = {}
        for index, metric in enumerate(self.metrics):
            metric_results = [e for img_id in sorted(by_image) for e in by_image[img_id][index]]
            results.update(metric.compute_metrics(metric_results))
            if hasattr(metric, "metric_items"):
                # CocoMetric returns nothing for an IoU type without any detection: its mAP is 0.
                for iou_type in metric.metrics:
                    for item in metric.metric_items or ():
                        results.setdefault(f"{iou_type}_{item}", 0.0)
        metrics = flatten_metrics(results)
        metrics["num_images"] = float(len(by_image))
        return metrics


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Check that every result is a number and give it a name TensorBoard and Determined accept."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, bool) or (
            not isinstance(value, (int, float)) and not hasattr(value, "__float__")
        ):
            raise TypeError(f"Metric {key!r} is {type(value).__name__} {value!r}, not a number.")
        name = re.sub(r"[^\w./-]", "_", key)
        flat[name] = float(value)
        if math.isinf(flat[name]):
            raise ValueError(f"Metric {key!r} is infinite.")
    return flat
