"""What batch inference reads: a folder of images (recursively), one image, a text file listing
image paths (one a line), a COCO annotation file with its image root, or a `gs://` prefix
(listed through the project's Cloud Storage client). The root of an annotation file's images may
itself be a folder or a `gs://` prefix.

Paths are kept as strings (a `gs://` URI would lose a slash as a Path); ids are the annotation
file's, else 0, 1, ... in the order listed (folders and prefixes sorted).
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.base.errors import PredictError
from utils.data.annotations import check_coco_file
from utils.data.gcs_client import SCHEME, GCSError, RetryPolicy, call_with_retries, get_client
from utils.inference.inputs import IMAGE_EXTENSIONS, Inputs, coco_inputs, collect_inputs


def batch_inputs(source: str, annotations: str | None, image_root: str | None) -> Inputs:
    """The images of `source`, and the annotation file that evaluates them (if any).

    Args:
        source: a folder, an image, a text file of paths, a COCO annotation file or a `gs://`
            prefix; with `annotations`, the folder or prefix its `file_name`s are relative to.
        annotations: a COCO annotation file: its images (under `source`) are predicted and
            evaluated.
        image_root: for a COCO `source`, where its images are (default: its folder).
    """
    if source.lower().endswith(".json"):
        if annotations:
            raise PredictError(
                f"INPUT {source} is an annotation file and --annotations {annotations} another: "
                "pass the images' folder (or gs:// prefix) as INPUT with --annotations, or the "
                "annotation file as INPUT with --image-root."
            )
        return annotated_inputs(Path(source), image_root)
    if annotations:
        return annotated_inputs(Path(annotations), source)
    if source.startswith(SCHEME):
        images = [name for name in object_names(source) if is_image(name)]
        if not images:
            raise PredictError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        return Inputs(list(enumerate(images)))
    path = Path(source)
    if path.is_file() and not is_image(path.name):
        return Inputs(list(enumerate(listed_paths(path))))
    inputs = collect_inputs([source])  # a folder or one image; missing ones are named
    return Inputs([(i, str(p)) for i, p in inputs.images])


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def listed_paths(listing: Path) -> list[str]:
    """The paths of a text file, one a line (blank lines and `#` comments skipped); relative
    ones are relative to its folder; local files must exist."""
    paths = []
    for line in listing.read_text(errors="replace").splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        paths.append(name if name.startswith(SCHEME) else str((listing.parent / name).resolve()))
    if not paths:
        raise PredictError(f"{listing} lists no image paths (one a line).")
    missing = [p for p in paths if not p.startswith(SCHEME) and not Path(p).is_file()]
    if missing:
        raise PredictError(
            f"{len(missing)} of the {len(paths)} paths {listing} lists do not exist, e.g. "
            f"{missing[0]}: fix the list (relative paths are relative to its folder)."
        )
    return paths


def annotated_inputs(ann_file: Path, root: str | None) -> Inputs:
    """A COCO file's images under `root` (a folder or a gs:// prefix; default: its folder)."""
    if not ann_file.is_file():
        raise PredictError(f"Annotation file {ann_file} does not exist.")
    if not (root or "").startswith(SCHEME):
        inputs = coco_inputs(ann_file, root)  # checks the file and that every image exists
        return Inputs([(i, str(p)) for i, p in inputs.images], inputs.ann_file, inputs.categories)
    check_coco_file(ann_file)
    coco = json.loads(ann_file.read_text())
    prefix = root.rstrip("/") + "/"
    images = [(image["id"], prefix + image["file_name"]) for image in coco["images"]]
    present = set(object_names(prefix))
    missing = [uri for _, uri in images if uri not in present]
    if missing:
        raise PredictError(
            f"{len(missing)} of {len(images)} images of {ann_file} are not in {root}, e.g. "
            f"{missing[0]}: pass the prefix their file_name is relative to."
        )
    categories = {c["name"]: c["id"] for c in coco["categories"]}
    return Inputs(images, ann_file, categories)


def object_names(prefix: str) -> list[str]:
    """The `gs://` URIs of the objects under a prefix (a folder's: `a/b` lists `a/b/...`),
    sorted; a bucket that does not exist or refuses us is a PredictError."""
    bucket, _, name = prefix.removeprefix(SCHEME).partition("/")
    if not bucket:
        raise PredictError(f"{prefix} names no bucket: write gs://BUCKET/PREFIX.")
    folder = name if not name or name.endswith("/") else name + "/"

    def listing() -> list[str]:
        blobs = get_client().list_blobs(bucket, prefix=folder, timeout=60, retry=None)
        return [f"{SCHEME}{bucket}/{blob.name}" for blob in blobs if not blob.name.endswith("/")]

    try:
        return sorted(call_with_retries(listing, bucket, folder, RetryPolicy()))
    except GCSError as err:
        raise PredictError(f"Listing {prefix}: {err}") from err
