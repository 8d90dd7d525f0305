"""A generated validation at COCO val2017's size, with Mask R-CNN-like predictions.

Ground truth: 5,000 images of COCO's sizes (640x480 and the like), about 7.3 objects per image as
in val2017 (geometric counts, some images empty), 80 categories with COCO's gaps in their ids
and a long-tailed class frequency, sides log-uniform from 4 px to most of the image (COCO's mix
of small, medium and large), a few crowd regions. Predictions: 100 per image, as Mask R-CNN's
`max_per_img` gives them: most objects found once with a high score, duplicates and wrong
classes overlapping them with lower scores, the rest low-scoring false positives, some of them
near objects. Every object and prediction is a polygon; prediction masks are drawn from it per
batch (`dense_masks`), so the set is small in memory and a batch is built in a few ms.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from bench import coco_data
from bench.startup import COCO_IDS, SIZES

VAL_IMAGES = 5000
OBJECTS_PER_IMAGE = 7.3  # val2017: 36,781 instances in 5,000 images
DETECTIONS = 100  # Mask R-CNN's test_cfg.rcnn.max_per_img
VERTICES = 16
CLASSES = tuple(f"class{c}" for c in COCO_IDS)
# Long-tailed like COCO's (person is about a quarter of the instances).
CLASS_WEIGHTS = 1 / np.arange(1, len(COCO_IDS) + 1) ** 1.1
CLASS_WEIGHTS /= CLASS_WEIGHTS.sum()


@dataclass
class ValSet:
    """COCO ground truth (a json dict) and one prediction record per image."""

    gt: dict[str, Any]
    # img_id, height, width, bboxes (N, 4) xyxy, scores (N,), labels (N,), polygons (N, V, 2)
    predictions: list[dict[str, Any]]


def shapes(rng: np.random.Generator, count: int, width: int, height: int) -> np.ndarray:
    """`count` star-shaped polygons (count, VERTICES, 2) of sides 4 px to 90 % of the image."""
    side = np.exp(rng.uniform(np.log(4), np.log(0.9 * min(width, height)), count))
    aspect = np.exp(rng.normal(0, 0.35, count))
    half = np.stack([side * aspect, side / aspect], 1).clip(2, [width, height]) / 2
    center = rng.uniform(half, [width, height] - half)
    turns = np.linspace(0, 2 * np.pi, VERTICES, endpoint=False)
    radius = rng.uniform(0.7, 1.0, (count, VERTICES))
    return center[:, None] + half[:, None] * radius[..., None] * np.stack(
        [np.cos(turns), np.sin(turns)], -1
    )


def jitter(rng: np.random.Generator, polys: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """The polygons moved and scaled by `amount` of their size, each vertex a little more."""
    size = np.ptp(polys, axis=1).max(axis=1)[:, None, None]
    center = polys.mean(axis=1, keepdims=True)
    scale = 1 + rng.normal(0, 1, (len(polys), 1, 1)) * amount[:, None, None]
    shift = rng.normal(0, 1, (len(polys), 1, 2)) * amount[:, None, None] * size
    wobble = rng.normal(0, 0.03, polys.shape) * size
    return center + (polys - center) * scale + shift + wobble


def generate(num_images: int = VAL_IMAGES, seed: int = 0) -> ValSet:
    """A deterministic set of `num_images` images with their objects and 100 predictions each."""
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], []
    for index in range(num_images):
        img_id = index + 1
        width, height = SIZES[int(rng.integers(len(SIZES)))]
        images.append({"id": img_id, "width": width, "height": height,
                       "file_name": f"{img_id:012d}.jpg"})  # fmt: skip
        count = 0 if rng.random() < 0.01 else int(rng.geometric(1 / OBJECTS_PER_IMAGE))
        objects = shapes(rng, count, width, height)
        labels = rng.choice(len(COCO_IDS), count, p=CLASS_WEIGHTS)
        crowd = rng.random(count) < 0.01
        for poly, label, is_crowd in zip(objects, labels, crowd, strict=True):
            flat = poly.ravel().round(2).tolist()
            rle = mask_utils.frPyObjects([flat], height, width)[0]
            annotations.append({
                "id": len(annotations) + 1, "image_id": img_id, "iscrowd": int(is_crowd),
                "category_id": COCO_IDS[label], "segmentation": [flat],
                "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
            })  # fmt: skip
        predictions.append(predict(rng, img_id, width, height, objects, labels))
    categories = [{"id": c, "name": n} for c, n in zip(COCO_IDS, CLASSES, strict=True)]
    return ValSet({"images": images, "annotations": annotations, "categories": categories},
                  predictions)  # fmt: skip


def predict(
    rng: np.random.Generator, img_id: int, width: int, height: int, objects: np.ndarray,
    labels: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    """A detector's 100 predictions for one image's objects (see the module's docstring)."""
    hit = rng.random(len(objects)) < 0.85
    found, found_labels = objects[hit], labels[hit]
    copies = rng.poisson(1.5, len(found))
    near = np.repeat(np.arange(len(found)), copies)
    parts = [
        (jitter(rng, found, np.full(len(found), 0.04)), rng.uniform(0.4, 1.0, len(found)),
         found_labels),
        (jitter(rng, found[near], rng.uniform(0.1, 0.3, len(near))),
         rng.uniform(0.05, 0.6, len(near)),
         np.where(rng.random(len(near)) < 0.2, rng.integers(0, 80, len(near)), found_labels[near])),
    ]  # fmt: skip
    rest = max(0, DETECTIONS - len(found) - len(near))
    anywhere = shapes(rng, rest, width, height)
    if len(objects):  # half of the false positives around objects, shifted by about a side
        around = rng.random(rest) < 0.5
        source = objects[rng.integers(0, len(objects), int(around.sum()))]
        anywhere[around] = jitter(rng, source, np.full(len(source), 0.8))
    fp_scores = 0.01 + 0.6 * rng.beta(1, 5, rest)
    parts.append((anywhere, fp_scores, rng.choice(80, rest, p=CLASS_WEIGHTS)))
    polys = np.concatenate([p[0] for p in parts]).reshape(-1, VERTICES, 2)
    scores = np.concatenate([p[1] for p in parts])
    det_labels = np.concatenate([p[2] for p in parts]).astype(np.int64)
    order = np.argsort(-scores, kind="stable")[:DETECTIONS]
    polys = polys[order].clip(0, [width - 1, height - 1])
    xyxy = np.concatenate([polys.min(axis=1), polys.max(axis=1)], 1)
    return {
        "img_id": img_id, "height": height, "width": width,
        "bboxes": xyxy.astype(np.float32), "scores": scores[order].astype(np.float32),
        "labels": det_labels[order], "polygons": polys.astype(np.float32),
    }  # fmt: skip


def dense_masks(record: dict[str, Any]) -> np.ndarray:
    """The record's masks at full image size (N, H, W) bool, as Mask R-CNN's are pasted."""
    polys = record["polygons"]
    masks = np.zeros((len(polys), record["height"], record["width"]), np.uint8)
    fixed = np.round(polys * 16).astype(np.int32)  # 4 bits of sub-pixel precision
    for mask, poly in zip(masks, fixed, strict=True):
        cv2.fillPoly(mask, [poly], 1, lineType=cv2.LINE_8, shift=4)
    return masks.view(bool)


to_samples = functools.partial(coco_data.to_samples, masks_of=dense_masks)
