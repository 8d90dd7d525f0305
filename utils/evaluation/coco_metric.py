"""MMDetection's CocoMetric evaluated in memory by hotcoco or pycocotools.

mmdet's CocoMetric keeps doing what it does (per-image `process`, the label -> category mapping,
the ground truth, the metric names); only the evaluation changes: the detections go to the COCO
engine in memory instead of through JSON files, the statistics are reported unrounded (mmdet
rounds to 3 decimals) and per-class AP comes as `<iou_type>_AP_per_class/<class name>`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mmdet.evaluation import CocoMetric

from utils.evaluation.curves import CocoArrays, best_f1
from utils.evaluation.diagnostics import hotcoco_quiet

# Re-exported: the mask encoding is its own module, still imported from here (tests, predict).
from utils.evaluation.mask_rle import encode_cropped, encode_masks

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "STAT_NAMES",
    "BackendCocoMetric",
    "coco_detections",
    "coco_engine",
    "coco_stats",
    "encode_cropped",
    "encode_masks",
]

BACKENDS = ("hotcoco", "pycocotools")
DEFAULT_BACKEND = "hotcoco"
# Per-class AP by default up to this many classes (VOC's 20); `val_evaluator.classwise` decides.
CLASSWISE_MAX_CLASSES = 20
# mmdet's names of pycocotools' 12 statistics, in their order.
STAT_NAMES = (
    "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
    "AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000",
)  # fmt: skip


def coco_engine(backend: str) -> tuple[type, type]:
    """The backend's (COCO, COCOeval) classes; a missing hotcoco is a clear error."""
    if backend == "pycocotools":
        from mmdet.datasets.api_wrappers import COCO, COCOeval

        return COCO, COCOeval
    if backend == "hotcoco":
        try:
            from hotcoco import COCOeval

            from utils.evaluation.hotcoco_engine import HotcocoIndex
        except ImportError as err:
            raise ImportError(
                "hyperparameters.coco_backend is 'hotcoco' but hotcoco cannot be imported "
                f"({err}): install it (pip install hotcoco==1.3.0) or set coco_backend: "
                "pycocotools."
            ) from err
        return HotcocoIndex, COCOeval
    raise ValueError(f"COCO backend {backend!r} is not one of {', '.join(BACKENDS)}.")


class BackendCocoMetric(CocoMetric):
    """CocoMetric whose `compute_metrics` runs the given COCO engine on in-memory detections.

    `classwise` None (the default): per-class AP when there are at most CLASSWISE_MAX_CLASSES.
    """

    def __init__(
        self, backend: str = DEFAULT_BACKEND, classwise: bool | None = None, **kwargs: Any
    ) -> None:
        super().__init__(classwise=bool(classwise), **kwargs)
        self.classwise = classwise
        self.backend = backend
        # A config's list (or number) as the engines' array: they find IoU 0.5 and 0.75 with
        # `iouThr == params.iouThrs`, which a list answers with one bool and fails on.
        self.iou_thrs = np.atleast_1d(np.asarray(self.iou_thrs, dtype=np.float64))
        self.coco_class, self.cocoeval_class = coco_engine(backend)
        # Of the last evaluation, for the report (utils/evaluation/report.py): each IoU type's
        # arrays and the engine's evaluation (TIDE, calibration, the confusion matrix).
        self.arrays: dict[str, CocoArrays] = {}
        self.evals: dict[str, Any] = {}
        # Evaluations merged from the ranks' streams (utils/evaluation/streaming.py), for the
        # next `compute_metrics`; None for an IoU type without detections.
        self.streamed: dict[str, Any] = {}
        self.streamed_last: set[str] = set()  # the IoU types the last evaluation streamed
        self.names_by_id: dict[int, str] = {}
        if self._coco_api is not None and backend != "pycocotools":
            # mmdet loaded the annotation file with pycocotools: index the same dicts again.
            self._coco_api = self.coco_class(self._coco_api.dataset)

    def compute_metrics(self, results: list) -> dict[str, float]:
        if self.format_only:  # mmdet writes the result files; nothing to evaluate
            return super().compute_metrics(results)
        gts, preds = zip(*results, strict=True) if results else ((), ())  # () if streamed
        if self._coco_api is None:  # no ann_file: mmdet's ground truth from the data samples
            with tempfile.TemporaryDirectory() as tmp:
                path = self.gt_to_coco_json(gts, str(Path(tmp) / "results"))
                self._coco_api = self.coco_class(path)
        if self.cat_ids is None:  # pycocotools' spelling, which both engines take
            self.cat_ids = self._coco_api.getCatIds(catNms=list(self.dataset_meta["classes"]))
        if self.img_ids is None:
            self.img_ids = self._coco_api.getImgIds()
        # hotcoco's `cats` builds a new dict on each access: once per evaluation.
        self.names_by_id = {c: cat["name"] for c, cat in self._coco_api.cats.items()}
        items = self.metric_items or STAT_NAMES[:6]
        unknown = [item for item in items if item not in STAT_NAMES]
        if unknown:
            raise KeyError(f"val_evaluator.metric_items: {unknown} not in {list(STAT_NAMES)}.")

        classwise = self.classwise
        if classwise is None:
            classwise = len(self.cat_ids) <= CLASSWISE_MAX_CLASSES
        metrics: dict[str, float] = {}
        self.arrays, self.evals = {}, {}
        streamed, self.streamed = self.streamed, {}
        self.streamed_last = set(streamed)
        for metric in self.metrics:
            if metric == "proposal_fast":  # mmdet's own recall, no COCO engine involved
                recalls = self.fast_eval_recall(preds, self.proposal_nums, self.iou_thrs)
                for number, recall in zip(self.proposal_nums, recalls, strict=True):
                    metrics[f"AR@{number}"] = float(recall)
                continue
            iou_type = "bbox" if metric == "proposal" else metric
            # mmdet names proposal recall `AR@100`, bbox and segm statistics `bbox_mAP`, ...
            prefix = "" if metric == "proposal" else f"{metric}_"
            names = items if metric != "proposal" else self.metric_items or STAT_NAMES[6:]
            if metric in streamed:
                coco_eval = streamed[metric]
            elif any(len(pred["labels"]) for pred in preds):
                coco_eval = self.run_engine(preds, iou_type, use_cats=metric != "proposal")
            else:
                coco_eval = None
            if coco_eval is None:
                logger.warning("No %s detections on the validation set: its metrics are 0.", metric)
                metrics.update({f"{prefix}{name}": 0.0 for name in names})
                if metric != "proposal":
                    metrics.update(f1_metrics(metric, None))
                if classwise and metric != "proposal":
                    metrics.update({self.class_key(metric, c): 0.0 for c in self.cat_ids})
                continue
            stats = coco_stats(coco_eval)
            metrics.update({f"{prefix}{n}": float(stats[STAT_NAMES.index(n)]) for n in names})
            if metric == "proposal":
                continue
            arrays = self.arrays[metric] = CocoArrays.from_coco_eval(coco_eval, self.names_by_id)
            metrics.update(f1_metrics(metric, best_f1(arrays)))
            self.evals[metric] = coco_eval
            if classwise:
                metrics.update(self.per_class_ap(coco_eval, metric))
        return metrics

    def run_engine(self, preds: tuple[dict, ...], iou_type: str, use_cats: bool) -> Any:
        """The engine run on the predictions with mmdet's parameters (image and category ids,
        maxDets, IoUs)."""
        if self.backend == "hotcoco":
            from utils.evaluation.hotcoco_engine import load_results

            coco_dt = load_results(self._coco_api, preds, self.cat_ids, iou_type)
        else:
            coco_dt = self._coco_api.loadRes(coco_detections(preds, self.cat_ids, iou_type))
        if self.backend == "pycocotools" and self.use_mp_eval:
            from mmdet.datasets.api_wrappers import COCOevalMP

            coco_eval = COCOevalMP(self._coco_api, coco_dt, iou_type)
        else:
            coco_eval = self.cocoeval_class(self._coco_api, coco_dt, iou_type)
        params = coco_eval.params
        params.catIds = list(self.cat_ids)
        params.imgIds = list(self.img_ids)
        params.maxDets = list(self.proposal_nums)
        # pycocotools compares `iouThr == iouThrs` (an array); hotcoco stores a list.
        params.iouThrs = self.iou_thrs if self.backend == "pycocotools" else self.iou_thrs.tolist()
        params.useCats = int(use_cats) if self.backend == "pycocotools" else use_cats
        with hotcoco_quiet():
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()  # the table in the log
        return coco_eval

    def per_class_ap(self, coco_eval: Any, metric: str) -> dict[str, float]:
        """AP@[.5:.95] of each class (all areas, the largest maxDets), -1 where it has no objects.

        The engines sort `params.catIds`, so the precision's class axis follows that order.
        """
        precision = coco_eval.eval["precision"]  # [IoU, recall, class, area, maxDets]
        per_class = {}
        for index, cat_id in enumerate(coco_eval.params.catIds):
            values = precision[:, :, index, 0, -1]
            values = values[values > -1]
            per_class[self.class_key(metric, cat_id)] = (
                float(values.mean()) if values.size else -1.0
            )
        return per_class

    def class_key(self, metric: str, cat_id: int) -> str:
        """`bbox_AP_per_class/<name>`: one group per IoU type in TensorBoard and the WebUI."""
        return f"{metric}_AP_per_class/{self.names_by_id[int(cat_id)]}"


# The best-F1 keys after the IoU type (`bbox_best_F1`, ...), by `curves.best_f1`'s keys.
F1_KEYS = {
    "f1": "best_F1",
    "score_thr": "best_F1_score_thr",
    "precision": "best_F1_precision",
    "recall": "best_F1_recall",
}


def f1_metrics(metric: str, best: dict[str, float] | None) -> dict[str, float]:
    """`bbox_best_F1`, `bbox_best_F1_score_thr`, `..._precision`, `..._recall` (see best_f1);
    zeros without detections."""
    best = best or dict.fromkeys(F1_KEYS, 0.0)
    return {f"{metric}_{key}": best[field] for field, key in F1_KEYS.items()}


def coco_detections(preds: tuple[dict, ...], cat_ids: list[int], iou_type: str) -> list[dict]:
    """mmdet's `results2json` records for one IoU type, built in memory.

    Boxes become xywh in float64 from the float32 predictions, as mmdet's JSON round trip gives;
    mask records carry no box, so the engines take the mask's area, as mmdet arranges.
    """
    category = np.asarray(cat_ids)
    records = []
    for pred in preds:
        if not len(pred["labels"]):
            continue
        img_id = pred["img_id"]
        cats = category[pred["labels"]].tolist()
        if iou_type == "segm":
            scores = pred.get("mask_scores", pred["scores"]).tolist()
            for mask, score, cat in zip(pred["masks"], scores, cats, strict=True):
                records.append(
                    {"image_id": img_id, "category_id": cat, "score": score, "segmentation": mask}
                )
        else:
            boxes = pred["bboxes"].astype(np.float64)
            boxes[:, 2:] -= boxes[:, :2]
            scores = pred["scores"].tolist()
            for box, score, cat in zip(boxes.tolist(), scores, cats, strict=True):
                records.append(
                    {"image_id": img_id, "category_id": cat, "score": score, "bbox": box}
                )
    return records


def coco_stats(coco_eval: Any) -> np.ndarray:
    """pycocotools' 12 detection statistics from the engine's accumulated precision and recall.

    pycocotools takes AP@[.5:.95] at 100 detections per image and the other statistics at
    maxDets[2]; hotcoco's `summarize` takes the largest maxDets for all of them, which
    differs on images with more than 100 detections of a class. One rule for both engines.
    """
    params = coco_eval.params

    def mean(ap: bool, iou: float | None = None, area: str = "all", max_dets: int = 100) -> float:
        values = coco_eval.eval["precision" if ap else "recall"]
        if iou is not None:
            values = values[np.where(iou == np.asarray(params.iouThrs))[0]]
        area_index = list(params.areaRngLbl).index(area)
        det_index = [i for i, m in enumerate(params.maxDets) if m == max_dets]
        values = values[..., area_index, :][..., det_index]
        values = values[values > -1]
        return float(values.mean()) if values.size else -1.0

    top = params.maxDets[2]
    return np.array([
        mean(True), mean(True, 0.5, max_dets=top), mean(True, 0.75, max_dets=top),
        mean(True, area="small", max_dets=top), mean(True, area="medium", max_dets=top),
        mean(True, area="large", max_dets=top),
        mean(False, max_dets=params.maxDets[0]), mean(False, max_dets=params.maxDets[1]),
        mean(False, max_dets=top), mean(False, area="small", max_dets=top),
        mean(False, area="medium", max_dets=top), mean(False, area="large", max_dets=top),
    ])  # fmt: skip
