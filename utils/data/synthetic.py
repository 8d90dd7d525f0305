"""Deterministic synthetic COCO instance-segmentation dataset (coloured shapes on textures).

It is the default data of the local demo and of the tests, so it needs no download and is cheap
enough to build on a CPU in a few seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
# Drawing colours, one per class: red, blue, orange.
PALETTE: tuple[tuple[int, int, int], ...] = ((220, 20, 60), (0, 110, 230), (255, 160, 0))
SPLITS: tuple[str, ...] = ("train", "val")
MARKER = ".complete"
# Part of the cache key: bump it whenever the generator's output changes, so stale caches are
# not silently reused.
GENERATOR_VERSION = 1
MARGIN = 2.0  # px between boxes, so the rasterised masks cannot touch either
MAX_TRIES = 30  # placement attempts before an instance is dropped
MIN_CONTRAST = 100.0  # L2 distance in RGB between a shape and its local background mean


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic dataset; equal specs give byte-identical datasets."""

    num_train: int = 160
    num_val: int = 40
    image_size: int = 128
    max_instances: int = 4
    seed: int = 0

    def key(self) -> str:
        """Short stable hash of the fields (and generator version), used as cache folder name."""
        payload = json.dumps({**dataclasses.asdict(self), "v": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth gradient, optionally with stripes or blobs, plus gaussian noise (uint8 HxWx3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
    start = rng.uniform(40, 215, 3)
    image = start + rng.uniform(-60, 60, 3) * ramp[..., None]
    style = rng.integers(3)
    if style == 1:
        theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 10)
        wave = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy))
        image += rng.uniform(8, 25, 3) * wave[..., None]
    elif style == 2:
        cells = int(rng.integers(3, 8))
        blobs = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        image += rng.uniform(8, 20) * cv2.resize(blobs, (size, size), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, rng.uniform(2, 10), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _shape(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Vertices (N, 2) of one shape around the origin; `size` is its diameter or side length."""
    if label == 0:
        angles, radius = np.arange(32) * 2 * np.pi / 32, size / 2
    elif label == 1:
        angles, radius = np.arange(4) * np.pi / 2 + np.pi / 4, size / np.sqrt(2)
    else:
        angles, radius = np.arange(3) * 2 * np.pi / 3 - np.pi / 2, size / np.sqrt(3)
    if label != 0:
        angles = angles + rng.uniform(0, 2 * np.pi)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two (x0, y0, x1, y1) boxes come closer than MARGIN."""
    return bool(np.all(a[:2] - MARGIN < b[2:]) and np.all(b[:2] - MARGIN < a[2:]))


def _render(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, list[dict]]:
    """One image and its annotations (without ids)."""
    size = spec.image_size
    image = _background(rng, size)
    boxes: list[np.ndarray] = []
    annotations = []
    for _ in range(int(rng.integers(1, spec.max_instances + 1))):
        # The first instance always fits on the empty canvas, so no image ends up empty.
        for _ in range(MAX_TRIES):
            label = int(rng.integers(len(CLASSES)))
            poly = _shape(rng, label, rng.uniform(0.15, 0.45) * size)
            low, high = poly.min(axis=0), poly.max(axis=0)
            # Rounded before use so the JSON polygon is exactly the one rasterised below.
            poly = np.round(poly + rng.uniform(0.5 - low, size - 0.5 - high), 2)
            box = np.concatenate([poly.min(axis=0), poly.max(axis=0)])
            if not any(_overlaps(box, other) for other in boxes):
                break
        else:
            continue
        boxes.append(box)
        segmentation = [poly.ravel().tolist()]
        # Painted with the COCO rasteriser (not cv2.fillPoly, which covers ~half a pixel more
        # along the edges) so the pixels are exactly the mask that training decodes.
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, size, size))
        mask = mask_utils.decode(rle).astype(bool)
        x0, y0, x1, y1 = np.floor(box).astype(int)
        local = image[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3).mean(axis=0)
        candidates = rng.integers(0, 256, (16, 3))
        distance = np.linalg.norm(candidates - local, axis=1)
        good = distance >= MIN_CONTRAST
        image[mask] = candidates[np.argmax(good) if good.any() else np.argmax(distance)]
        annotations.append(
            {
                "category_id": label + 1,
                "segmentation": segmentation,
                "bbox": [float(v) for v in (*box[:2], *np.round(box[2:] - box[:2], 2))],
                "area": float(mask_utils.area(rle)),
                "iscrowd": 0,
            }
        )
    return image, annotations


def generate(root: Path, spec: SyntheticSpec) -> None:
    """Write `root/annotations/instances_{split}.json` and `root/{split}/NNNNNN.png` per split.

    Args:
        root: Output folder (created if needed).
        spec: Dataset parameters; each split and image gets its own seed derived from `spec.seed`.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    counts = (spec.num_train, spec.num_val)
    for split_index, (split, count) in enumerate(zip(SPLITS, counts, strict=True)):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for index in tqdm(range(count), desc=f"synthetic {split}"):
            # Per-image seeds: an image does not depend on how many images precede it.
            seed = np.random.SeedSequence(spec.seed, spawn_key=(split_index, index))
            image, instances = _render(np.random.default_rng(seed), spec)
            file_name = f"{index:06d}.png"
            if not cv2.imwrite(str(root / split / file_name), image):
                raise OSError(f"could not write {root / split / file_name}")
            # Ids start at 1: COCO tools treat id 0 as falsy in places.
            size = spec.image_size
            images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
            for instance in instances:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **instance})
        coco = {
            "info": {"description": f"synthetic shapes, spec {dataclasses.asdict(spec)}"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _discard(folder: Path) -> None:
    """Remove a folder by first renaming it away, so no process sees it half-deleted."""
    trash = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".trash-"))
    try:
        os.rename(folder, trash / "old")
        # Lost a race: someone published a complete dataset between our check and the rename.
        if _is_complete(trash / "old"):
            os.rename(trash / "old", folder)
    except OSError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def dataset_root(cache_dir: Path, spec: SyntheticSpec) -> Path:
    """Where `ensure_dataset` keeps the dataset of `spec`: known without generating it."""
    return Path(cache_dir) / f"synthetic-{spec.key()}"


def ensure_dataset(cache_dir: Path, spec: SyntheticSpec | None = None) -> Path:
    """Return `cache_dir/synthetic-<key>`, generating it once; safe for concurrent callers.

    Args:
        cache_dir: Folder holding the generated datasets (created if needed).
        spec: Dataset parameters; defaults to `SyntheticSpec()`.

    Returns:
        The dataset root, which contains the marker file `.complete`.
    """
    spec = spec or SyntheticSpec()
    cache_dir = Path(cache_dir)
    target = dataset_root(cache_dir, spec)
    if _is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{target.name}-"))
    try:
        generate(tmp, spec)
        (tmp / MARKER).write_text(json.dumps(dataclasses.asdict(spec)) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        for _ in range(3):
            try:
                os.rename(tmp, target)  # atomic: readers see nothing or the whole dataset
                return target
            except OSError:
                if _is_complete(target):  # another process won the race
                    shutil.rmtree(tmp, ignore_errors=True)
                    return target
                _discard(target)  # incomplete leftover (no marker) blocking the name
        raise RuntimeError(f"could not move the synthetic dataset into {target}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def palette(backend: str, classes: tuple[str, ...] | None) -> list | None:
    """The drawing colours of the generated set's classes: COCO's palette would draw circles and
    squares in two close reds. None for other data (mmdet's palette)."""
    generated = backend == "synthetic" and tuple(classes or ()) == CLASSES
    return list(PALETTE) if generated else None
