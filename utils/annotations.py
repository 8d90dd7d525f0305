"""Loud checks of a COCO annotation file, before MMDetection reads it.

mmdet drops some problems silently (annotations of unknown categories, empty or outside boxes);
here structural problems fail with the file, the annotation and what to do, and the boxes mmdet
would drop are counted and reported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import AnnotationError

logger = logging.getLogger(__name__)


@dataclass
class AnnotationReport:
    """What a COCO annotation file holds, and the boxes mmdet will skip."""

    path: Path
    categories: list[str]  # names, ordered by id
    images: int
    annotations: int
    skipped: list[int] = field(default_factory=list)  # annotation ids of empty/outside boxes


def check_coco_file(path: Path) -> AnnotationReport:
    """Check a COCO instances file; raise AnnotationError on what would break or mislead."""
    try:
        coco = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(
            f"{path}: cannot read it as JSON ({err}); re-export the file."
        ) from err
    if not isinstance(coco, dict):
        raise AnnotationError(f"{path}: holds a {type(coco).__name__}, not a COCO mapping.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise AnnotationError(f"{path}: no '{key}' list; COCO instance files need one.")
    if not coco["categories"]:
        raise AnnotationError(f"{path}: 'categories' is empty; list the classes with ids.")
    images = {image["id"]: image for image in coco["images"]}
    if len(images) != len(coco["images"]):
        raise AnnotationError(f"{path}: image ids repeat; each image needs its own id.")
    category_ids = {category["id"] for category in coco["categories"]}
    report = AnnotationReport(
        path=Path(path),
        categories=[c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])],
        images=len(images),
        annotations=len(coco["annotations"]),
    )
    for ann in coco["annotations"]:
        where = f"{path}: annotation {ann.get('id')}"
        image = images.get(ann.get("image_id"))
        if image is None:
            raise AnnotationError(
                f"{where} names image_id {ann.get('image_id')}, which is not in 'images'; add the "
                "image or remove the annotation."
            )
        if ann.get("category_id") not in category_ids:
            raise AnnotationError(
                f"{where} has category_id {ann.get('category_id')}, not among the categories "
                f"{sorted(category_ids)}; mmdet would drop it silently. Fix the id or add the "
                "category."
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise AnnotationError(f"{where}: bbox {bbox!r} is not [x, y, width, height].")
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            for polygon in segmentation:
                if len(polygon) < 6 or len(polygon) % 2:
                    raise AnnotationError(
                        f"{where}: a polygon has {len(polygon)} coordinates; polygons need at "
                        "least 3 (x, y) points. Fix or drop it."
                    )
        x, y, w, h = bbox
        # mmdet skips these boxes: say how many, so a broken export does not go unnoticed.
        inside_w = min(x + w, image["width"]) - max(x, 0)
        inside_h = min(y + h, image["height"]) - max(y, 0)
        if w < 1 or h < 1 or inside_w <= 0 or inside_h <= 0 or ann.get("area", 1) <= 0:
            report.skipped.append(ann.get("id"))
    if report.skipped:
        logger.warning(
            "%s: %d of %d boxes are empty or outside their image and are skipped (ids %s%s).",
            path,
            len(report.skipped),
            report.annotations,
            report.skipped[:5],
            " ..." if len(report.skipped) > 5 else "",
        )
    return report
