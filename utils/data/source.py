"""Where a trial's data comes from: generated, a COCO or VOC folder on disk, or a GCS bucket.

Two steps, so that a run's plan reads nothing but config files (it is made once and shipped to
other processes and hosts):

- `plan_data` points the config's train/val datasets and evaluator at the data the experiment's
  `data` section names, with the classes it names, and fails with the key to fix when the
  section is wrong; it returns a `DataPlan`: what the data needs on a host.
- `utils.data.prepare.prepare_source` makes that true on this host (the only step that reads,
  writes or fetches data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmengine.config import Config

from utils.base.errors import DataError
from utils.base.files import CACHE_ROOT
from utils.config.tree import SPLITS, point_at_coco
from utils.data import synthetic
from utils.data.voc import VOC_SPLIT_DEFAULTS, apply_voc_section

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
        apply_voc_section(cfg, data)  # the folders are prepare_source's to check
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
        palette=synthetic.palette(plan.backend, plan.classes),
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
