"""What the predict command reads: image files, folders (recursively), or a COCO annotation file.

Images get ids: the annotation file's, else 0, 1, ... in the order given (folders sorted).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from utils.base.errors import PredictError
from utils.data.annotations import check_coco_file

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Inputs:
    """The images to predict, by id, and the COCO annotation file they came from (if any)."""

    images: list[tuple[int, Path]]
    ann_file: Path | None = None
    categories: dict[str, int] = field(default_factory=dict)  # file's category id by name


def collect_inputs(inputs: list[str], image_root: str | None = None) -> Inputs:
    """Image files, folders (recursively, sorted) or one COCO annotation file.

    The annotation file's `file_name`s are relative to `image_root`, by default its own folder.
    Other images get ids 0, 1, ... in the order given.
    """
    jsons = [name for name in inputs if name.lower().endswith(".json")]
    if jsons and len(inputs) > 1:
        raise PredictError(
            f"Got a COCO annotation file ({jsons[0]}) and other inputs: pass either one annotation "
            "file or image files and folders."
        )
    if jsons:
        return coco_inputs(Path(jsons[0]), image_root)
    paths: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise PredictError(
                    f"Folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})."
                )
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise PredictError(f"Input {path} does not exist: pass image files or folders.")
    return Inputs(list(enumerate(p.resolve() for p in paths)))


def coco_inputs(ann_file: Path, image_root: str | None) -> Inputs:
    check_coco_file(ann_file)  # loud on structural problems, naming the entry
    coco = json.loads(ann_file.read_text())
    root = Path(image_root) if image_root else ann_file.resolve().parent
    images = [(image["id"], (root / image["file_name"]).resolve()) for image in coco["images"]]
    missing = [path for _, path in images if not path.is_file()]
    if missing:
        raise PredictError(
            f"{len(missing)} of {len(images)} images of {ann_file} are missing, e.g. {missing[0]}: "
            "pass --image-root, the folder that their file_name is relative to (default: the "
            "annotation file's folder)."
        )
    categories = {c["name"]: c["id"] for c in coco["categories"]}
    return Inputs(images, ann_file, categories)


def category_ids(inputs: Inputs, classes: tuple[str, ...], source: Path) -> list[int]:
    """The annotation file's category id of each class; 1, 2, ... without one."""
    if inputs.ann_file is None:
        return list(range(1, len(classes) + 1))
    missing = [name for name in classes if name not in inputs.categories]
    if missing:
        raise PredictError(
            f"The model of {source} has {len(classes)} classes, {inputs.ann_file} has "
            f"{len(inputs.categories)} categories, and {missing[:5]} are not among them: evaluate "
            f"on an annotation file of the classes it was trained on ({list(classes)[:10]})."
        )
    extra = len(inputs.categories) - len(classes)
    if extra:  # a model trained on some of the file's classes (data.classes), as the trial does
        logger.warning(
            "%s has %d categories the model of %s does not predict: evaluating its %d classes.",
            inputs.ann_file,
            extra,
            source,
            len(classes),
        )
    return [inputs.categories[name] for name in classes]
