"""Where a trial's data comes from: generated, a COCO or VOC folder on disk, or a GCS bucket.

Points the config's train/val datasets and evaluator at the data the experiment's `data` section
names, with the classes of the annotation file, and fails with the key to fix when data is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmengine.config import Config

from utils.data import synthetic
from utils.data.annotations import AnnotationReport, check_coco_file
from utils.config.tree import SPLITS, base_dataset, set_num_classes
from utils.base.errors import DataError
from utils.config.evaluators import evaluator_configs
from utils.base.files import CACHE_ROOT
from utils.data.voc import apply_voc_section, use_coco_format

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


def apply_data_section(cfg: Config, data: dict[str, Any], verify_paths: bool = True) -> None:
    """Point the config's train/val datasets and evaluator at the data the experiment names.

    `verify_paths=False` (for checks on a machine without the data) skips reading the data.
    """
    backend = data.get("backend", "disk")
    data_format = data.get("format", "coco")
    if data_format not in FORMATS:
        raise DataError(f"data.format {data_format!r} is unknown; use one of {', '.join(FORMATS)}.")
    if data_format == "voc" and backend != "synthetic":
        if backend != "disk":
            raise DataError(f"data.format voc reads from data.backend disk, not {backend!r}.")
        apply_voc_section(cfg, data, verify_paths)
        return
    if data_format == "voc":
        logger.warning("data.backend=synthetic: the generated data are COCO, not VOC.")
    use_coco_format(cfg)
    layout = {key: data.get(key, default) for key, default in DISK_DEFAULTS.items()}
    if backend == "synthetic":
        spec = synthetic.SyntheticSpec(**(data.get("synthetic") or {}))
        root = str(synthetic.ensure_dataset(Path(data.get("cache_dir") or CACHE_ROOT), spec))
        layout = SYNTHETIC_LAYOUT
        # Generated shapes need no ImageNet features, and tests and demos must not download.
        # The config's detector weights too (a `load_from` hyperparameter is the user's choice).
        dropped = drop_pretrained(cfg.model) + bool(cfg.pop("load_from", None))
        if dropped:
            logger.warning("data.backend=synthetic: the model's pretrained weights are not loaded.")
        ann_files = {split: Path(root, layout[f"{split}_ann"]) for split in SPLITS}
        data = {**data, "classes": data.get("classes") or list(synthetic.CLASSES)}
    elif backend == "disk":
        if not data.get("root"):
            raise DataError("data.root is not set: name the folder that holds the COCO dataset.")
        root = str(Path(data["root"]).expanduser())
        ann_files = {split: Path(root, layout[f"{split}_ann"]) for split in SPLITS}
        if verify_paths:
            for split in SPLITS:
                check_split_paths(
                    split, ann_files[split], Path(root, layout[f"{split}_img_prefix"])
                )
    elif backend in ("gcs", "gcp"):  # "gcp" is the name the original example documented
        from utils.data import gcs  # lazily: only gs:// data need the Cloud Storage client

        # The gs:// file backend that mmcv's LoadImageFromFile and mmdet's datasets read through.
        gcs.register_gcs_backend()
        if not data.get("bucket"):
            raise DataError("data.bucket is not set: name the GCS bucket that holds the dataset.")
        prefix = (data.get("prefix") or "").strip("/")
        root = f"gs://{data['bucket']}/{prefix + '/' if prefix else ''}"
        blobs = [f"{prefix}/{layout[f'{split}_ann']}".lstrip("/") for split in SPLITS]
        if verify_paths:
            cache = Path(data.get("cache_dir") or CACHE_ROOT) / "gcs"
            local = gcs.download_annotations(data["bucket"], blobs, cache)
        else:
            local = [Path(blob) for blob in blobs]
        ann_files = dict(zip(SPLITS, local, strict=True))
    else:
        raise DataError(f"data.backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}.")

    classes = data.get("classes")
    if verify_paths:
        reports = {split: check_coco_file(ann_files[split]) for split in SPLITS}
        classes = classes_of(reports["val"], classes)
    for split in SPLITS:
        dataset = base_dataset(cfg[f"{split}_dataloader"].dataset)
        dataset.data_root = root
        dataset.ann_file = str(ann_files[split]) if verify_paths else layout[f"{split}_ann"]
        dataset.data_prefix = dict(img=layout[f"{split}_img_prefix"])
        if classes:
            dataset.metainfo = dict(classes=tuple(classes))
            if backend == "synthetic" and tuple(classes) == synthetic.CLASSES:
                # COCO's palette would draw circles and squares in two close reds.
                dataset.metainfo["palette"] = list(synthetic.PALETTE)
        if data.get("image_cache_bytes") and backend in ("gcs", "gcp"):
            # Each process keeps up to this many bytes of images in memory: later epochs re-read
            # them without network traffic.
            args = dict(backend="gcs", cache_bytes=int(data["image_cache_bytes"]))
            for step in dataset.pipeline:
                if step.type == "LoadImageFromFile":
                    step.backend_args = args
    evaluators = evaluator_configs(cfg.val_evaluator)
    for evaluator in evaluators:
        evaluator.ann_file = str(ann_files["val"])
    if classes:
        set_num_classes(cfg.model, len(classes))


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


def drop_pretrained(model_cfg: Any) -> int:
    """Remove every `init_cfg` of type Pretrained from the model config; return how many."""
    count = 0
    if isinstance(model_cfg, dict):
        init_cfg = model_cfg.get("init_cfg")
        if isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained":
            model_cfg["init_cfg"] = None
            count += 1
        count += sum(drop_pretrained(v) for k, v in model_cfg.items() if k != "init_cfg")
    elif isinstance(model_cfg, (list, tuple)):
        count += sum(drop_pretrained(item) for item in model_cfg)
    return count
