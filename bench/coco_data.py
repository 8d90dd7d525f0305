"""A generated COCO validation set with detector-like predictions, for evaluator tests and benches.

Ground truth: polygons of all three COCO area ranges, crowd regions (uncompressed RLE and
polygons, `iscrowd: 1`) and images without annotations. Predictions: several jittered detections
per object with varying scores, some with the wrong class, false positives, detections inside
crowd regions, images without predictions and one image with more than 100 detections of a class
(where pycocotools' AP at 100 detections and the AP at 1000 part).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData
from pycocotools import mask as mask_utils

CLASSES = ("circle", "square", "triangle")
CATEGORY_IDS = (1, 3, 7)  # not contiguous: label -> category id goes through the mapping
VERTICES = {"circle": 24, "square": 4, "triangle": 3}


@dataclass
class GeneratedSet:
    """COCO ground truth (a json dict) and one prediction record per image."""

    gt: dict[str, Any]
    # img_id, height, width, bboxes (N, 4) xyxy, scores (N,), labels (N,), masks (N compressed RLEs)
    predictions: list[dict[str, Any]]


def polygon(label: int, center: np.ndarray, size: float, angle: float) -> np.ndarray:
    """The class's regular shape (circle as a 24-gon) as flat [x0, y0, x1, y1, ...] vertices."""
    count = VERTICES[CLASSES[label]]
    turns = angle + np.linspace(0, 2 * np.pi, count, endpoint=False)
    points = center + size / 2 * np.stack([np.cos(turns), np.sin(turns)], axis=1)
    return points.ravel()


def rle_of(poly: np.ndarray, height: int, width: int) -> dict[str, Any]:
    return mask_utils.merge(mask_utils.frPyObjects([poly.tolist()], height, width))


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's crowd format: run lengths (column-major, starting with a zero run) as ints."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": list(mask.shape)}


def generate(num_images: int, image_size: int = 256, seed: int = 0) -> GeneratedSet:
    """A deterministic set of `num_images` square images of `image_size` px."""
    rng = np.random.default_rng(seed)
    size = image_size
    images, annotations, predictions = [], [], []
    for index in range(num_images):
        img_id = index + 1
        images.append({"id": img_id, "width": size, "height": size, "file_name": f"{img_id}.jpg"})
        crowded = index == 1  # the image with more than 100 detections of one class
        empty = index % 10 == 3
        objects = 0 if empty else (40 if crowded else int(rng.integers(1, 8)))
        dets: list[tuple[np.ndarray, float, int]] = []
        for _ in range(objects):
            label = 0 if crowded else int(rng.integers(len(CLASSES)))
            # Side log-uniform from 6 px to 80 % of the image: small, medium and large areas.
            side = float(np.exp(rng.uniform(np.log(6), np.log(0.8 * size))))
            center = rng.uniform(side / 2, size - side / 2, 2)
            angle = rng.uniform(0, np.pi)
            poly = polygon(label, center, side, angle)
            rle = rle_of(poly, size, size)
            if mask_utils.area(rle) == 0:
                continue
            annotations.append({
                "id": len(annotations) + 1, "image_id": img_id, "iscrowd": 0,
                "category_id": CATEGORY_IDS[label], "segmentation": [poly.tolist()],
                "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
            })  # fmt: skip
            copies = 4 if crowded else int(rng.integers(0, 5))  # 0: a missed object
            for _ in range(copies):
                scale = 1 + rng.normal(0, 0.08)
                shift = rng.normal(0, 0.05 * side, 2)
                wrong = rng.random() < 0.1
                det_label = (label + 1) % len(CLASSES) if wrong else label
                det_poly = polygon(label, center + shift, side * scale, angle + rng.normal(0, 0.1))
                dets.append((det_poly, float(rng.uniform(0.05, 1.0)), det_label))
        if not crowded and rng.random() < 0.2:
            add_crowd(rng, img_id, size, annotations, dets)
        for _ in range(int(rng.integers(0, 4))):  # false positives
            label = int(rng.integers(len(CLASSES)))
            side = float(rng.uniform(8, size / 3))
            center = rng.uniform(side / 2, size - side / 2, 2)
            dets.append((polygon(label, center, side, 0.0), float(rng.uniform(0.01, 0.6)), label))
        if rng.random() < 0.05:
            dets = []  # an image the detector found nothing in
        predictions.append(prediction_record(img_id, size, dets))
    categories = [{"id": i, "name": n} for i, n in zip(CATEGORY_IDS, CLASSES, strict=True)]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return GeneratedSet(gt, predictions)


def add_crowd(
    rng: np.random.Generator, img_id: int, size: int, annotations: list, dets: list
) -> None:
    """A crowd region (uncompressed RLE or polygon) with a few detections of its class inside."""
    label = int(rng.integers(len(CLASSES)))
    x0, y0 = rng.uniform(0, size / 2, 2)
    w, h = rng.uniform(size / 4, size / 2, 2)
    box_poly = np.array([x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h])
    rle = rle_of(box_poly, size, size)
    if rng.random() < 0.5:
        segmentation: Any = uncompressed_rle(mask_utils.decode(rle))
    else:
        segmentation = [box_poly.tolist()]
    annotations.append({
        "id": len(annotations) + 1, "image_id": img_id, "iscrowd": 1,
        "category_id": CATEGORY_IDS[label], "segmentation": segmentation,
        "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
    })  # fmt: skip
    for _ in range(int(rng.integers(1, 4))):
        side = float(rng.uniform(8, min(w, h) / 2))
        center = np.array([x0, y0]) + rng.uniform(side / 2, [w - side / 2, h - side / 2])
        dets.append((polygon(label, center, side, 0.0), float(rng.uniform(0.1, 0.9)), label))


def prediction_record(img_id: int, size: int, dets: list) -> dict[str, Any]:
    """Boxes (tight around each mask, plus noise), scores, labels and RLE masks of one image."""
    rles = [rle_of(poly, size, size) for poly, _, _ in dets]
    keep = [i for i, rle in enumerate(rles) if mask_utils.area(rle) > 0]
    rles = [rles[i] for i in keep]
    boxes = mask_utils.toBbox(rles).reshape(-1, 4) if rles else np.zeros((0, 4))
    noise = np.random.default_rng(img_id).normal(0, 1.0, boxes.shape)
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1) + noise
    return {
        "img_id": img_id,
        "height": size,
        "width": size,
        "bboxes": xyxy.astype(np.float32),
        "scores": np.array([dets[i][1] for i in keep], np.float32),
        "labels": np.array([dets[i][2] for i in keep], np.int64),
        "masks": rles,
    }


def decoded_masks(record: dict[str, Any]) -> np.ndarray:
    """The record's RLE masks as (N, H, W) bool, row-major as a detector's mask tensors are."""
    if not record["masks"]:
        return np.zeros((0, record["height"], record["width"]), bool)
    dense = mask_utils.decode(record["masks"]).transpose(2, 0, 1)
    return np.ascontiguousarray(dense, dtype=bool)


def to_samples(
    records: list[dict[str, Any]],
    with_masks: bool,
    masks_of: Callable[[dict[str, Any]], np.ndarray] = decoded_masks,
) -> list[DetDataSample]:
    """Predictions as a detector returns them: DetDataSamples, masks (`masks_of` each record)
    as dense bool tensors."""
    samples = []
    for record in records:
        shape = (record["height"], record["width"])
        sample = DetDataSample(metainfo={"img_id": record["img_id"], "ori_shape": shape})
        instances = InstanceData(
            bboxes=torch.from_numpy(record["bboxes"]),
            scores=torch.from_numpy(record["scores"]),
            labels=torch.from_numpy(record["labels"]),
        )
        if with_masks:
            instances.masks = torch.from_numpy(masks_of(record))
        sample.pred_instances = instances
        samples.append(sample)
    return samples
