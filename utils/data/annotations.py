"""Loud checks of a COCO annotation file, before MMDetection reads it.

mmdet drops some problems silently (annotations of unknown categories, empty or outside boxes);
here structural problems fail with the file, the annotation and what to do, and the boxes mmdet
would drop are counted and reported.

A COCO train file takes seconds and a GB to check, and every rank of every run reads it: the
outcome (the report, or the error) is kept per host by the file's content and this module's
code, so the ranks of a node, restarts and later runs check a file once. The first rank checks
while the others wait for its outcome (a file lock); each still logs the skipped boxes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from utils.base.errors import AnnotationError, DataError
from utils.base.files import CACHE_ROOT

logger = logging.getLogger(__name__)
CHECKS_DIR = CACHE_ROOT / "annotation-checks"


@dataclass
class AnnotationReport:
    """What a COCO annotation file holds, and the boxes mmdet will skip."""

    path: Path
    categories: list[str]  # names, ordered by id
    images: int
    annotations: int
    skipped: list[int] = field(default_factory=list)  # annotation ids of empty/outside boxes
    from_cache: bool = False  # checked before on this host (same content, same check)

    def classes_to_train(self, classes: list[str] | None) -> list[str]:
        """The class names to train: `classes` (`data.classes`), else the file's categories by id.

        mmdet maps names to category ids through the annotation file, so ids need not be
        contiguous; a named class missing from the file would silently get no boxes, hence the
        error.
        """
        if not classes:
            return self.categories
        missing = [name for name in classes if name not in self.categories]
        if missing:
            raise DataError(
                f"data.classes names {missing} that {self.path} does not have; its categories "
                f"are {self.categories[:10]}{' ...' if len(self.categories) > 10 else ''}."
            )
        return list(classes)


def check_coco_file(path: Path) -> AnnotationReport:
    """Check a COCO instances file; raise AnnotationError on what would break or mislead.

    The outcome is read from this host's cache when the same content was checked before."""
    path = Path(path)
    try:
        entry = CHECKS_DIR / f"{content_digest(path)}.json"
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read it ({err}); check the path.") from err
    outcome, from_cache = None, False
    try:
        with _locked(entry):
            outcome = _read_outcome(entry)
            from_cache = outcome is not None
            if outcome is None:
                outcome = _outcome(path)
                _write_outcome(entry, outcome)
    except OSError as err:  # an unwritable cache: check here, as without one
        logger.debug("Annotation check cache unusable (%s) for %s.", err, path)
        outcome = outcome or _outcome(path)
    if "error" in outcome:
        raise AnnotationError(outcome["error"].replace(outcome["path"], str(path)))
    report = AnnotationReport(**{**outcome["report"], "path": path, "from_cache": from_cache})
    _log_skipped(report)
    return report


def content_digest(path: Path) -> str:
    """SHA-256 of the file's bytes and of this module's code (a changed check re-checks)."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    with open(path, "rb") as file:
        while chunk := file.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    """Hold the entry's lock: one process of the host checks, the others wait for it."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _outcome(path: Path) -> dict:
    """The check's outcome as JSON-ready data: the report, or the error's message."""
    try:
        report = _check(path)
    except AnnotationError as err:
        return {"path": str(path), "error": str(err)}
    data = asdict(report)
    del data["path"], data["from_cache"]
    return {"path": str(path), "report": data}


def _read_outcome(entry: Path) -> dict | None:
    try:
        return json.loads(entry.read_text())
    except (OSError, ValueError):  # none yet, or a damaged entry: check again
        return None


def _write_outcome(entry: Path, outcome: dict) -> None:
    partial = entry.with_suffix(".tmp")
    partial.write_text(json.dumps(outcome))
    partial.replace(entry)  # whole or not at all, for readers without the lock


def _check(path: Path) -> AnnotationReport:
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
    names_by_id = category_names(path, coco["categories"])
    category_ids = set(names_by_id)
    report = AnnotationReport(
        path=Path(path),
        categories=[names_by_id[i] for i in sorted(names_by_id)],
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
    return report


def category_names(path: Path, categories: list) -> dict[int, str]:
    """Each category's name by its id; raise AnnotationError where mmdet cannot map names and
    ids one to one (it finds a class's id by its name: `data.classes`, or every category)."""
    names_by_id: dict[int, str] = {}
    ids_by_name: dict[str, list[int]] = {}
    for category in categories:
        cat_id, name = category.get("id"), category.get("name")
        if not isinstance(cat_id, int) or isinstance(cat_id, bool) or not isinstance(name, str):
            raise AnnotationError(
                f"{path}: category {category!r} needs an integer 'id' and a string 'name'."
            )
        if cat_id in names_by_id:
            raise AnnotationError(
                f"{path}: category id {cat_id} repeats ({names_by_id[cat_id]!r} and {name!r}); "
                "give each category its own id."
            )
        names_by_id[cat_id] = name
        ids_by_name.setdefault(name, []).append(cat_id)
    repeated = {name: ids for name, ids in ids_by_name.items() if len(ids) > 1}
    if repeated:
        listed = "; ".join(
            f"{name!r} has ids {', '.join(map(str, ids))}" for name, ids in repeated.items()
        )
        raise AnnotationError(
            f"{path}: category names repeat ({listed}). mmdet finds a class's category by its "
            "name, so these ids cannot be told apart, whether the classes are the file's or "
            "named in data.classes: rename the categories apart (e.g. 'tree_2') or merge their "
            "annotations under one id."
        )
    return names_by_id


def _log_skipped(report: AnnotationReport) -> None:
    if report.skipped:
        path = report.path
        logger.warning(
            "%s: %d of %d boxes are empty or outside their image and are skipped (ids %s%s).",
            path,
            len(report.skipped),
            report.annotations,
            report.skipped[:5],
            " ..." if len(report.skipped) > 5 else "",
        )
