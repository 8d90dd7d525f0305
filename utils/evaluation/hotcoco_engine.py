"""hotcoco as mmdet's CocoMetric's engine: its ground-truth index and the detections' loading.

`HotcocoIndex` is hotcoco's COCO index as the code around mmdet's CocoMetric reads it: the
metric keeps its ground truth in mmdet's `_coco_api`, which mmdet's own code (its result files,
`proposal_fast`) calls as mmdet's pycocotools wrapper. hotcoco answers those calls
(`get_ann_ids`, `load_anns`, `get_img_ids`, ...) but one: `get_cat_ids(cat_names=...)`.
"""

from __future__ import annotations

from typing import Any

import hotcoco
import numpy as np


class HotcocoIndex(hotcoco.COCO):
    """hotcoco.COCO with mmdet's spelling of `get_cat_ids`."""

    def get_cat_ids(self, cat_names: Any = (), sup_names: Any = (), cat_ids: Any = ()) -> list[int]:
        """mmdet's spelling (`cat_names`, `sup_names`) of hotcoco's `get_cat_ids`."""
        return self.getCatIds(catNms=list(cat_names), supNms=list(sup_names), catIds=cat_ids)


def load_results(
    ground_truth: hotcoco.COCO, preds: tuple[dict, ...], cat_ids: list[int], iou_type: str
) -> hotcoco.COCO:
    """The predictions as hotcoco's detections, loaded from columns (no dict per detection).

    Equal to `loadRes` of mmdet's `results2json` records (utils.evaluation.coco_metric's
    `coco_detections`): boxes in float64 from the float32 predictions; a mask's box and area
    are the mask's own, as pycocotools' `loadRes` makes them.
    """
    columns = detection_columns(preds, cat_ids, iou_type)
    if iou_type != "segm":
        return ground_truth.loadRes(columns)
    masks = [mask for pred in preds for mask in pred["masks"]]
    columns[:, 1:5] = np.asarray(hotcoco.mask.toBbox(masks)).reshape(-1, 4)
    detections = ground_truth.loadRes(columns, segmentation=masks)
    # loadRes takes a row's area from its box; a mask's area is its pixels.
    area = np.asarray(hotcoco.mask.area(masks), dtype=np.float64)
    detections.update_anns(ids=np.arange(1, len(masks) + 1), area=area)
    return detections


def detection_columns(preds: tuple[dict, ...], cat_ids: list[int], iou_type: str) -> np.ndarray:
    """(N, 7) float64 rows of hotcoco's `loadRes`: image id, x, y, w, h, score, category id;
    masks' scores (`mask_scores` where the model gives them) for segm."""
    preds = [pred for pred in preds if len(pred["labels"])]
    counts = [len(pred["labels"]) for pred in preds]
    columns = np.zeros((sum(counts), 7), dtype=np.float64)
    if not preds:
        return columns
    columns[:, 0] = np.repeat([pred["img_id"] for pred in preds], counts)
    boxes = np.concatenate([pred["bboxes"] for pred in preds]).astype(np.float64)
    columns[:, 1:3], columns[:, 3:5] = boxes[:, :2], boxes[:, 2:] - boxes[:, :2]
    score = "mask_scores" if iou_type == "segm" else "scores"
    columns[:, 5] = np.concatenate([pred.get(score, pred["scores"]) for pred in preds])
    columns[:, 6] = np.asarray(cat_ids)[np.concatenate([pred["labels"] for pred in preds])]
    return columns
