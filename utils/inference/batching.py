"""Batch inference, one batch of image paths at a time, for any engine's pool of workers.

`ImagePredictor` is what each worker holds (the model once): every image is read from its path
(a file, or a `gs://` object through the project's Cloud Storage backend) by the config's
loading step, as `predict` reads it, goes through the test pipeline, and the images of a batch
are forwarded one group per padded shape (`ServingModel`), so that an image's answer does not
depend on its batch mates. Each image gives one JSON record: its predictions as the model made
them, or why it has none (it does not decode, the pipeline or the model fails on it). The
batch goes on either way.

A run keeps the records (one JSONL line each): `record_results` turns one into the COCO results
`predict` writes, `record_sample` into the DetDataSample the evaluator takes, so the metrics are
computed as `evaluate` computes them.
"""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath
from typing import Any

import cv2
import mmcv
import numpy as np
import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData

from utils.data.gcs import register_gcs_backend
from utils.evaluation.drawings import draw_sample
from utils.evaluation.mask_rle import encode_masks
from utils.inference.serving import ServingModel

logger = logging.getLogger(__name__)


class ImagePredictor:
    """A worker's model: called with a batch `{"id": ids, "path": paths}` (numpy arrays), returns
    `{"id": ids, "record": JSON records, "png": drawings}`, one row per image, in its order.

    Args:
        export_dir: the checkpoint's export folder (`model.pth`, `config.py`).
        device: e.g. "cpu" or "cuda".
        draw_ids: the ids of the images to draw (a PNG of the predictions above `score_thr`).
        score_thr: the drawings' threshold.
        threads: torch's CPU threads (a worker's share of the node's CPUs); None: torch's own.
    """

    def __init__(
        self,
        export_dir: str,
        device: str,
        draw_ids: frozenset[int] = frozenset(),
        score_thr: float = 0.3,
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        register_gcs_backend()  # gs:// paths go through mmengine's file backends
        self.model = ServingModel(export_dir, device)
        self.draw_ids, self.score_thr = draw_ids, score_thr

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, paths = [int(i) for i in batch["id"]], [str(p) for p in batch["path"]]
        records: list[dict[str, Any]] = [{} for _ in ids]
        pngs = [b""] * len(ids)
        loaded: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (image_id, path) in enumerate(zip(ids, paths, strict=True)):
            try:
                loaded[i] = self.load(image_id, path)
            except ImageFailure as failure:
                records[i] = failure_record(image_id, path, str(failure))
                continue
            groups.setdefault(self.model.padded_shape(loaded[i][1]), []).append(i)
        for members in groups.values():
            # One forward pass a padded shape (one per image if it fails: only the culprit fails).
            items = {i: loaded[i][1] for i in members}
            for i, outcome, _ in self.model.forward_each(members, items):
                if isinstance(outcome, Exception):
                    records[i] = failure_record(
                        ids[i], paths[i], reason("the model fails", outcome)
                    )
                    continue
                records[i] = prediction_record(ids[i], paths[i], outcome)
                if ids[i] in self.draw_ids:
                    pngs[i] = self.drawing(loaded[i][0], outcome)
        return {
            "id": np.array(ids, dtype=np.int64),
            "record": np.array([json.dumps(r) for r in records], dtype=object),
            "png": np.array(pngs, dtype=object),
        }

    def load(self, image_id: int, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The original (RGB) and the test pipeline's output, as predict loads a file."""
        try:
            results = self.model.load({"img_path": path, "img_id": image_id})
        except Exception as err:  # decoders and storage raise many types
            raise ImageFailure(reason("it cannot be read as an image", err)) from err
        original = mmcv.bgr2rgb(results["img"])
        try:
            return original, self.model.pipeline(results)
        except Exception as err:  # e.g. a transform that cannot take a 1 x 5000 image
            raise ImageFailure(reason("the test pipeline fails on it", err)) from err

    def drawing(self, original: np.ndarray, sample: Any) -> bytes:
        """The PNG of the predictions above the threshold; none if drawing fails (the image's
        predictions are kept)."""
        meta = self.model.detector.dataset_meta
        try:
            drawn = draw_sample(original, sample, meta, self.score_thr, False)
            ok, png = cv2.imencode(".png", mmcv.rgb2bgr(drawn))
        except Exception:  # matplotlib and OpenCV raise many types
            logger.exception("Drawing %s failed", sample.metainfo.get("img_path"))
            return b""
        return png.tobytes() if ok else b""


class ImageFailure(Exception):
    """An image that cannot be predicted; the message says why."""


def reason(what: str, err: BaseException) -> str:
    detail = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{what} ({type(err).__name__}{': ' + detail if detail else ''})"


def failure_record(image_id: int, path: str, why: str) -> dict[str, Any]:
    return {"id": image_id, "file": path, "error": why}


def prediction_record(image_id: int, path: str, sample: Any) -> dict[str, Any]:
    """An image's predictions as lists (exact: float32 values survive JSON), masks as RLE."""
    pred = sample.pred_instances
    height, width = sample.ori_shape[:2]
    record = {
        "id": image_id,
        "file": path,
        "height": int(height),
        "width": int(width),
        "bboxes": pred.bboxes.tolist(),
        "scores": pred.scores.tolist(),
        "labels": pred.labels.tolist(),
    }
    if "masks" in pred:
        rles = encode_masks(pred.masks.detach(), pred.bboxes)
        record["masks"] = [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]
    if "mask_scores" in pred:
        record["mask_scores"] = pred.mask_scores.tolist()
    return record


def record_results(record: dict[str, Any], cat_ids: list[int]) -> tuple[list[dict], list[dict]]:
    """One record's COCO bbox and segm results, as predict writes them."""
    image_id, labels, scores = record["id"], record["labels"], record["scores"]
    bbox = [
        {"image_id": image_id, "category_id": cat_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
         "score": score}
        for label, (x1, y1, x2, y2), score in zip(labels, record["bboxes"], scores, strict=True)
    ]  # fmt: skip
    segm = [
        {"image_id": image_id, "category_id": cat_ids[label], "segmentation": mask, "score": score}
        for label, mask, score in zip(
            labels, record.get("masks", []), record.get("mask_scores", scores), strict=False
        )
    ]
    return bbox, segm


def record_sample(record: dict[str, Any]) -> DetDataSample:
    """The predicted DetDataSample a record was made from, as the evaluator takes it (masks as
    the RLEs it would encode them to)."""
    pred = InstanceData(
        bboxes=torch.tensor(record["bboxes"], dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(record["scores"], dtype=torch.float32),
        labels=torch.tensor(record["labels"], dtype=torch.int64),
    )
    if "masks" in record:
        pred.masks = [{"size": m["size"], "counts": m["counts"].encode()} for m in record["masks"]]
    if "mask_scores" in record:
        pred.mask_scores = torch.tensor(record["mask_scores"], dtype=torch.float32)
    shape = (record["height"], record["width"])
    sample = DetDataSample(metainfo={"img_id": record["id"], "ori_shape": shape})
    sample.pred_instances = pred
    return sample


def drawing_name(image_id: int, path: str) -> str:
    """The drawing's file name, as predict names it."""
    return f"{image_id}_{PurePosixPath(path).stem}.png"
