"""COCO evaluation streamed over ranks: each rank matches its images as they are predicted.

With hotcoco as the engine, a rank's CocoMetric (bbox and segm, with an annotation file) hands
each batch to hotcoco's `StreamingEval`, which matches the detections against that batch's
ground truth and keeps only the matches. What a rank shares at the end is that state
(`to_bytes`, about 37 bytes per detection) instead of every detection and mask (about 223 for
a COCO-sized mask, 30 for a box); the chief merges
the ranks' states and accumulates: its evaluation is the batch evaluation's, equal to the last
bit (tests/utils/evaluation/test_streaming.py).

What a streamed evaluation cannot give: TIDE, calibration and the confusion matrix, which need
every detection on the chief (the report leaves them out), and the images no rank predicted,
which a batch evaluation counts as missed (a full validation predicts them all). A rank adds an
image once; an image on two ranks would count twice: the validation loaders deal each image to
one rank, and the chief's `CocoEvaluator.compute` fails on one it finds in two ranks' entries.
Turned on by the hyperparameter `streamed_evaluation` (off by default: the report's loss).
"""

from __future__ import annotations

from typing import Any

import hotcoco

from utils.evaluation.coco_metric import BackendCocoMetric, coco_detections
from utils.evaluation.diagnostics import hotcoco_quiet
from utils.evaluation.hotcoco_engine import detection_columns

STREAMED = ("bbox", "segm")


def streamable(metric: Any) -> bool:
    """Whether the metric's evaluation can be streamed: a CocoMetric evaluated by hotcoco with
    an annotation file (the ranks need each image's ground truth), of boxes and masks only."""
    return (
        isinstance(metric, BackendCocoMetric)
        and metric.backend == "hotcoco"
        and metric._coco_api is not None
        and not metric.format_only
        and set(metric.metrics) <= set(STREAMED)
    )


class CocoStream:
    """One rank's streamed evaluation of a CocoMetric: a StreamingEval per IoU type."""

    def __init__(self, metric: BackendCocoMetric) -> None:
        self.metric = metric
        self.seen: set[Any] = set()
        self.detections = 0
        self.streams: dict[str, hotcoco.StreamingEval] = {}

    def _start(self) -> None:
        """The streams, with mmdet's parameters, once the classes (dataset_meta) are known."""
        metric, coco = self.metric, self.metric._coco_api
        if metric.cat_ids is None:
            metric.cat_ids = coco.getCatIds(catNms=list(metric.dataset_meta["classes"]))
        categories = coco.loadCats(metric.cat_ids)
        for iou_type in metric.metrics:
            params = hotcoco.Params(iou_type)
            params.catIds = list(metric.cat_ids)
            params.maxDets = list(metric.proposal_nums)
            params.iouThrs = metric.iou_thrs.tolist()
            self.streams[iou_type] = hotcoco.StreamingEval(categories, iou_type, params=params)

    def add(self, results: list[tuple[dict, dict]]) -> None:
        """Match a batch: the metric's `process` results, (ground truth, prediction) per image."""
        if not self.streams:
            self._start()
        preds, ids = [], []
        for _, pred in results:
            if pred["img_id"] not in self.seen:
                self.seen.add(pred["img_id"])
                preds.append(pred)
                ids.append(pred["img_id"])
        if not preds:
            return
        coco, cat_ids = self.metric._coco_api, self.metric.cat_ids
        images, objects = coco.loadImgs(ids), coco.loadAnns(coco.getAnnIds(imgIds=ids))
        self.detections += sum(len(pred["labels"]) for pred in preds)
        for iou_type, stream in self.streams.items():
            if iou_type == "segm":  # as records: hotcoco takes a mask's area from the mask
                detections: Any = coco_detections(tuple(preds), cat_ids, iou_type)
            else:
                detections = detection_columns(tuple(preds), cat_ids, iou_type)
            with hotcoco_quiet():
                stream.update(images, objects, detections)

    def state(self) -> dict[str, Any]:
        """What the chief gathers from this rank."""
        states = {iou_type: stream.to_bytes() for iou_type, stream in self.streams.items()}
        return {"streams": states, "detections": self.detections}

    def finish(self, states: list[dict[str, Any]]) -> None:
        """On the chief: merge the ranks' states into the metric's evaluations
        (`metric.streamed`, None for an IoU type without detections), which its
        `compute_metrics` reads next."""
        detections = sum(state["detections"] for state in states)
        self.metric.streamed = {}
        for iou_type in self.metric.metrics:
            shards = [
                hotcoco.StreamingEval.from_bytes(state["streams"][iou_type])
                for state in states
                if iou_type in state["streams"]
            ]
            if not detections or not shards:
                self.metric.streamed[iou_type] = None
                continue
            with hotcoco_quiet():
                coco_eval = hotcoco.StreamingEval.merge(shards).finalize()
                if coco_eval.eval is None:
                    coco_eval.accumulate()
            self.metric.streamed[iou_type] = coco_eval
