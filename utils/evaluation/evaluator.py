"""COCO evaluation with MMDetection's own metrics, safe to split across ranks.

Each rank keeps the metric entries of the images it predicted, keyed by image id; `compute` merges
the entries of all ranks, counts every image once (distributed samplers may repeat images to pad
the last batches), and evaluates them with the config's `val_evaluator`. Its CocoMetrics are
evaluated by hotcoco, or by pycocotools (the reference), see
`utils.evaluation.coco_metric`.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import re
from typing import Any

import torch
from mmengine.config import Config
from mmengine.registry import METRICS

from utils.base.errors import ConfigError
from utils.config.tree import evaluator_configs
from utils.evaluation.coco_metric import BACKENDS, DEFAULT_BACKEND, STAT_NAMES, BackendCocoMetric
from utils.evaluation.mask_rle import encode_masks

logger = logging.getLogger(__name__)

# All 12 COCO statistics, in pycocotools' order, under mmdet's names.
COCO_ITEMS = STAT_NAMES


def streamed_evaluation(value: Any) -> bool:
    """The `streamed_evaluation` hyperparameter checked; unset: false."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(
            f"hyperparameters.streamed_evaluation is {value!r}: use true (each rank matches its "
            "images as it predicts them; the report then has no TIDE, calibration or confusion "
            "matrix) or false (the default)."
        )
    return value


def coco_backend(name: str | None) -> str:
    """The `coco_backend` hyperparameter checked; unset: hotcoco where installed."""
    if name is None:
        if importlib.util.find_spec("hotcoco") is not None:
            return DEFAULT_BACKEND
        logger.warning("hotcoco is not installed: COCO metrics by pycocotools (slower).")
        return "pycocotools"
    if name not in BACKENDS:
        raise ConfigError(
            f"hyperparameters.coco_backend is {name!r}: use one of {', '.join(BACKENDS)}."
        )
    return name


class CocoEvaluator:
    """Collects per-image metric entries with `update`; `compute` evaluates them once per image."""

    def __init__(
        self,
        cfg: Config,
        backend: str | None = None,
        streamed: bool | None = False,
        *,
        meta: dict[str, Any],
    ) -> None:
        """`meta`: the validation dataset's `metainfo` (its classes name the per-class metrics).
        `backend`: the COCO engine of CocoMetrics (`BACKENDS`); None: the default.
        `streamed` (the `streamed_evaluation` hyperparameter): each rank matches the images of
        the CocoMetrics that can be streamed as they come (utils/evaluation/streaming.py);
        `stream_states` is then what it shares besides the image ids."""
        self.backend = coco_backend(backend)
        self.streamed = streamed_evaluation(streamed)
        self.metrics = []
        for metric_cfg in evaluator_configs(cfg.val_evaluator):
            metric_cfg = copy.deepcopy(metric_cfg)
            if metric_cfg.type not in ("CocoMetric", "mmdet.CocoMetric"):
                self.metrics.append(METRICS.build(metric_cfg))
                continue
            metric_cfg.pop("type")
            metric_cfg.pop("_scope_", None)  # a registry key; the class is built directly here
            metric_cfg.setdefault("metric_items", list(COCO_ITEMS))
            self.metrics.append(BackendCocoMetric(backend=self.backend, **metric_cfg))
        for metric in self.metrics:
            metric.dataset_meta = meta
        self.entries: list[tuple[Any, list[list[Any]]]] = []
        self.streams: dict[int, Any] = {}  # streaming.CocoStream by metric
        self.reset()
        gathered = [m for i, m in enumerate(self.metrics) if i not in self.streams]
        if self.streamed and any(isinstance(m, BackendCocoMetric) for m in gathered):
            logger.warning(
                "streamed_evaluation: a CocoMetric is gathered to the chief instead; streaming "
                "needs coco_backend hotcoco, an ann_file and the bbox or segm metric only."
            )

    def coco_metric(self) -> BackendCocoMetric | None:
        """The first COCO metric: its last evaluation is what the evaluation plots show."""
        return next((m for m in self.metrics if isinstance(m, BackendCocoMetric)), None)

    def reset(self) -> None:
        self.entries = []
        if self.streamed:  # hotcoco's alone: imported only then
            from utils.evaluation.streaming import CocoStream, streamable

            self.streams = {i: CocoStream(m) for i, m in enumerate(self.metrics) if streamable(m)}

    def update(self, data_samples: list[Any]) -> None:
        """Add the predictions (DetDataSample with `pred_instances`) of one batch."""
        batch: dict[int, list[Any]] = {index: [] for index in self.streams}
        for sample in data_samples:
            output = sample.to_dict()
            pred = output["pred_instances"]
            if isinstance(pred.get("masks"), torch.Tensor):
                # Once for all metrics and in one call: the metrics take encoded masks as they are.
                pred["masks"] = encode_masks(pred["masks"].detach(), pred.get("bboxes"))
            per_metric = []
            for index, metric in enumerate(self.metrics):
                metric.process({}, [output])
                if index in self.streams:  # matched below, with the rest of the batch
                    batch[index] += metric.results
                    per_metric.append([])
                else:
                    per_metric.append(metric.results)
                metric.results = []
            # COCO ids are ints, VOC ids file names: keep them as the dataset gives them.
            self.entries.append((output["img_id"], per_metric))
        for index, results in batch.items():
            self.streams[index].add(results)

    def stream_states(self) -> dict[int, dict[str, Any]]:
        """This rank's streamed evaluations, by metric (empty unless `streamed`)."""
        return {index: stream.state() for index, stream in self.streams.items()}

    def compute(
        self,
        entries_per_rank: list[list[tuple[int, list[list[Any]]]]],
        states_per_rank: list[dict[int, dict[str, Any]]] | None = None,
    ) -> dict[str, float]:
        """Evaluate the union of the ranks' entries, each image once, and merge the ranks'
        streamed evaluations (`stream_states`; None: this process's own); returns flat float
        metrics."""
        if self.streams:
            predicted_once(entries_per_rank)
            for index, stream in self.streams.items():
                states = states_per_rank if states_per_rank is not None else [self.stream_states()]
                stream.finish([rank_states[index] for rank_states in states])
        by_image = {}
        for entries in entries_per_rank:
            for img_id, per_metric in entries:
                by_image.setdefault(img_id, per_metric)
        results: dict[str, Any] = {}
        for index, metric in enumerate(self.metrics):
            metric_results = [e for img_id in sorted(by_image) for e in by_image[img_id][index]]
            results.update(metric.compute_metrics(metric_results))
        metrics = flatten_metrics(results)
        metrics["num_images"] = float(len(by_image))
        return metrics


def predicted_once(entries_per_rank: list[list[tuple[Any, Any]]]) -> None:
    """Fail if an image reached two ranks: their streams have both counted it."""
    rank_of: dict[Any, int] = {}
    for rank, entries in enumerate(entries_per_rank):
        for img_id, _ in entries:
            if rank_of.setdefault(img_id, rank) != rank:
                raise ConfigError(
                    f"Image {img_id!r} was predicted on ranks {rank_of[img_id]} and {rank}: a "
                    "streamed evaluation has counted it on both. Deal each validation image "
                    "to one rank, or set hyperparameters.streamed_evaluation: false."
                )


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
