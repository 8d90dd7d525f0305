"""Where a trial's data comes from: generated, a COCO or VOC folder on disk, or a GCS bucket.

Two steps, so that a run's plan reads nothing but config files (it is made once and shipped to
other processes and hosts):

- `plan_data` points the config's train/val datasets and evaluator at the data the experiment's
  `data` section names, with the classes it names, and fails with the key to fix when the
  section is wrong; it returns a `DataPlan`: what the data needs on a host.
- `prepare_source` makes that true on this host: generates the synthetic set, fetches the GCS
  annotation files, checks the paths and annotation files, and gives the config the annotation
  file's classes when the section names none. The per-host caches and file locks of
  `synthetic`, `gcs` and `annotations` make it cheap to repeat, from every rank of a host.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmengine.config import Config

from utils.base.errors import DataError
from utils.base.files import CACHE_ROOT
from utils.config.tree import SPLITS, point_at_coco, set_classes
from utils.data import synthetic
from utils.data.annotations import AnnotationReport, check_coco_file
from utils.data.voc import VOC_SPLIT_DEFAULTS, apply_voc_section, check_voc_folders

logger = logging.getLogger(__name__)

BACKENDS = ("synthetic", "disk", "gcs")
FORMATS = ("coco", "voc")
DISK_DEFAULTS = {
    "train_ann": "annotations/instances_train2017.json",
    "val_ann": "annotations/instances_val2017.json",
    "train_img_prefix": "train2017/",
    "val_img_prefix": "val2017/",
}
SYNTHETIC_LAYOUT = {
    "train_ann": "annotations/instances_train.json",
    "val_ann": "annotations/instances_val.json",
    "train_img_prefix": "train/",
    "val_img_prefix": "val/",
}


@dataclass(frozen=True)
class DataPlan:
    """What a run's data needs on a host before its datasets are built; picklable.

    Attributes:
        backend: synthetic, disk or gcs.
        format: coco or voc.
        root: the datasets' `data_root`.
        ann_files: split -> the local COCO annotation file the datasets read (none for VOC).
        img_dirs: split -> the image folder that must exist (COCO on disk).
        classes: the classes the section names (the generated set's by default); None: the
            validation annotation file's categories, read by `prepare_source`.
        spec: the generated set's parameters (synthetic).
        cache_dir: where generated sets (synthetic) and annotation downloads (`gcs/`) are kept.
        bucket: the GCS bucket (gcs).
        blobs: the annotation objects fetched into `ann_files`, in SPLITS order (gcs).
        years: the VOC years (voc).
        voc_splits: `train_split` and `val_split` (voc).
    """

    backend: str
    format: str
    root: str
    ann_files: dict[str, str] = field(default_factory=dict)
    img_dirs: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None
    spec: synthetic.SyntheticSpec | None = None
    cache_dir: str = str(CACHE_ROOT)
    bucket: str | None = None
    blobs: tuple[str, ...] = ()
    years: tuple[int | str, ...] = ()
    voc_splits: dict[str, str] = field(default_factory=dict)


def plan_data(cfg: Config, data: dict[str, Any]) -> DataPlan:
    """Point the config's train/val datasets and evaluator at the data the experiment names.

    Reads no data (nothing is generated, fetched or checked: `prepare_source` does that); a
    section that cannot work (an unknown backend, a missing root or bucket) fails here.
    """
    backend = data.get("backend", "disk")
    data_format = data.get("format", "coco")
    if data_format not in FORMATS:
        raise DataError(f"data.format {data_format!r} is unknown; use one of {', '.join(FORMATS)}.")
    if data_format == "voc" and backend != "synthetic":
        if backend != "disk":
            raise DataError(f"data.format voc reads from data.backend disk, not {backend!r}.")
        apply_voc_section(cfg, data, verify_paths=False)  # the folders: prepare_source's
        years = data.get("years", [2007])  # valid: apply_voc_section checked them
        return DataPlan(
            backend,
            data_format,
            str(Path(data["root"]).expanduser()),
            years=tuple([years] if isinstance(years, int | str) else years),
            voc_splits={key: data.get(key, value) for key, value in VOC_SPLIT_DEFAULTS.items()},
        )
    if data_format == "voc":
        logger.warning("data.backend=synthetic: the generated data are COCO, not VOC.")
    layout = {key: data.get(key, default) for key, default in DISK_DEFAULTS.items()}
    cache_dir = str(Path(data.get("cache_dir") or CACHE_ROOT))
    classes = data.get("classes")
    extra: dict[str, Any] = {}
    if backend == "synthetic":
        spec = synthetic.SyntheticSpec(**(data.get("synthetic") or {}))
        root = str(synthetic.dataset_root(Path(cache_dir), spec))
        layout = SYNTHETIC_LAYOUT
        ann_files = {split: str(Path(root, layout[f"{split}_ann"])) for split in SPLITS}
        classes = classes or list(synthetic.CLASSES)
        extra = dict(spec=spec)
    elif backend == "disk":
        if not data.get("root"):
            raise DataError("data.root is not set: name the folder that holds the COCO dataset.")
        root = str(Path(data["root"]).expanduser())
        ann_files = {split: str(Path(root, layout[f"{split}_ann"])) for split in SPLITS}
        img_dirs = {split: str(Path(root, layout[f"{split}_img_prefix"])) for split in SPLITS}
        extra = dict(img_dirs=img_dirs)
    elif backend in ("gcs", "gcp"):  # "gcp" is the name the original example documented
        from utils.data import gcs  # lazily: only gs:// data need the Cloud Storage client

        if not data.get("bucket"):
            raise DataError("data.bucket is not set: name the GCS bucket that holds the dataset.")
        bucket = data["bucket"]
        prefix = (data.get("prefix") or "").strip("/")
        root = f"gs://{bucket}/{prefix + '/' if prefix else ''}"
        blobs = tuple(f"{prefix}/{layout[f'{split}_ann']}".lstrip("/") for split in SPLITS)
        # The datasets read the local copies that prepare_source downloads.
        local = [gcs.cached_path(Path(cache_dir, "gcs"), bucket, blob) for blob in blobs]
        ann_files = {split: str(path) for split, path in zip(SPLITS, local, strict=True)}
        extra = dict(bucket=bucket, blobs=blobs)
    else:
        raise DataError(f"data.backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}.")

    plan = DataPlan(
        "gcs" if backend == "gcp" else backend,
        "coco",  # generated data are COCO whatever the section says (warned above)
        root,
        ann_files=ann_files,
        classes=tuple(classes) if classes else None,
        cache_dir=cache_dir,
        **extra,
    )
    cache_bytes = data.get("image_cache_bytes") if plan.backend == "gcs" else None
    dropped = point_at_coco(
        cfg,
        root,
        ann_files,
        {split: layout[f"{split}_img_prefix"] for split in SPLITS},
        classes=plan.classes,
        palette=palette(plan),
        # Each process keeps up to this many bytes of images in memory: later epochs re-read
        # them without network traffic.
        image_backend_args=dict(backend="gcs", cache_bytes=int(cache_bytes))
        if cache_bytes
        else None,
        # Generated shapes need no ImageNet features, and tests and demos must not download.
        # The config's detector weights too (a `load_from` hyperparameter is the user's choice).
        drop_weights=plan.backend == "synthetic",
    )
    if dropped:
        logger.warning("data.backend=synthetic: the model's pretrained weights are not loaded.")
    return plan


def prepare_source(cfg: Config, plan: DataPlan) -> Config:
    """Make the planned data readable on this host and check it; returns the config to build
    from: `cfg` itself, or a copy with the annotation file's classes when the section names none.

    Generates the synthetic set, fetches the GCS annotation files (and registers the gs:// file
    backend in this process), checks that the paths exist and the annotation files are sound
    (`check_coco_file`) and that named classes are in them. Safe and cheap to repeat from every
    rank of a host: each step keeps its outcome in a per-host cache, behind a file lock.
    """
    ann_files = {split: Path(path) for split, path in plan.ann_files.items()}
    for split, img_dir in plan.img_dirs.items():  # COCO on disk
        check_split_paths(split, ann_files[split], Path(img_dir))
    if plan.format == "voc":
        check_voc_folders(plan.root, list(plan.years), plan.voc_splits)
        return cfg
    if plan.backend == "synthetic":
        synthetic.ensure_dataset(Path(plan.cache_dir), plan.spec)
    elif plan.backend == "gcs":
        from utils.data import gcs

        # The gs:// file backend that mmcv's LoadImageFromFile and mmdet's datasets read through.
        gcs.register_gcs_backend()
        gcs.download_annotations(plan.bucket, list(plan.blobs), Path(plan.cache_dir, "gcs"))
    reports = {split: check_coco_file(ann_files[split]) for split in SPLITS}
    classes = classes_of(reports["val"], list(plan.classes) if plan.classes else None)
    if plan.classes:
        return cfg  # given to the config when planned, and now checked against the file
    colours = palette(plan, tuple(classes))
    cfg = copy.deepcopy(cfg)  # the plan's config stays as planned
    set_classes(cfg, tuple(classes), colours)
    return cfg


def palette(plan: DataPlan, classes: tuple[str, ...] | None = None) -> list | None:
    """The drawing colours of the generated set's classes: COCO's palette would draw circles and
    squares in two close reds. None for other data (mmdet's palette)."""
    classes = classes or plan.classes
    generated = plan.backend == "synthetic" and tuple(classes or ()) == synthetic.CLASSES
    return list(synthetic.PALETTE) if generated else None


def classes_of(report: AnnotationReport, classes: list[str] | None) -> list[str]:
    """The class names to train: `data.classes`, else the annotation file's categories by id.

    mmdet maps names to category ids through the annotation file, so ids need not be contiguous;
    a named class missing from the file would silently get no boxes, hence the error.
    """
    names = report.categories
    if not classes:
        return names
    missing = [name for name in classes if name not in names]
    if missing:
        raise DataError(
            f"data.classes names {missing} that {report.path} does not have; its categories are "
            f"{names[:10]}{' ...' if len(names) > 10 else ''}."
        )
    return list(classes)


def check_split_paths(split: str, ann_file: Path, img_dir: Path) -> None:
    """Fail with the data key to fix when a split's annotation file or image folder is missing."""
    if not ann_file.is_file():
        raise DataError(
            f"data.{split}_ann: annotation file {ann_file} does not exist; check data.root and "
            f"data.{split}_ann."
        )
    if not img_dir.is_dir():
        raise DataError(
            f"data.{split}_img_prefix: image folder {img_dir} does not exist; check data.root "
            f"and data.{split}_img_prefix."
        )
