"""The generated validation set the evaluation-report tests share (bench.coco_data: crowd
regions, wrong classes, duplicates, false positives, an image with more than 100 detections of a
class), evaluated by our evaluator, and pycocotools' evaluation of the same detections."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from mmengine.config import Config
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.coco_data import CATEGORY_IDS, CLASSES, generate, to_samples
from utils.evaluation.coco_metric import coco_detections
from utils.evaluation.evaluator import CocoEvaluator
from utils.evaluation.report import evaluation_report

SCORE_THR = 0.3


def written_set(folder: Path, images: int, **options: Any) -> tuple[str, Any]:
    """`bench.coco_data.generate(images, **options)` with its annotation file written into
    `folder` (mmdet's modules registered, as the evaluator needs): the file's path and the set."""
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    data = generate(images, **options)
    ann_file = folder / "instances_val.json"
    ann_file.write_text(json.dumps(data.gt))
    return str(ann_file), data


def evaluated_set(folder: Path) -> dict[str, Any]:
    """60 generated images evaluated for bbox and segm by hotcoco, as a validation does: the
    metrics, the COCO metric and its report, the annotation file (in `folder`), the detections
    and masks in COCO's results format, the predicted samples."""
    ann_file, data = written_set(folder, 60)
    config = {"type": "CocoMetric", "ann_file": ann_file, "metric": ["bbox", "segm"]}
    evaluator = CocoEvaluator(
        Config({"val_evaluator": config}), backend="hotcoco", meta={"classes": CLASSES}
    )
    evaluator.update(to_samples(data.predictions, with_masks=True))
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = evaluator.compute([evaluator.entries])
    metric = evaluator.coco_metric()
    predictions = tuple(data.predictions)
    return {
        "metrics": metrics,
        "metric": metric,
        "report": evaluation_report(metric, SCORE_THR),
        "ann_file": Path(ann_file),
        "detections": coco_detections(predictions, list(CATEGORY_IDS), "bbox"),
        "masks": coco_detections(predictions, list(CATEGORY_IDS), "segm"),
        "samples": data.predictions,
    }


def reference(ann_file: Path, detections: list[dict], iou_type: str = "bbox") -> COCOeval:
    """pycocotools' evaluation of the same detections, with mmdet's maxDets."""
    coco = COCO(str(ann_file))
    field = "segmentation" if iou_type == "segm" else "bbox"
    records = [{k: d[k] for k in ("image_id", "category_id", field, "score")} for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(records), iou_type)
        coco_eval.params.maxDets = [100, 300, 1000]
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval
