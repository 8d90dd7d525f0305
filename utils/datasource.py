"""Where a trial's data comes from: generated, a COCO folder on disk, or a GCS bucket.

Points the config's train/val datasets and evaluator at the data the experiment's `data` section
names, with the classes of the annotation file, and fails with the key to fix when data is missing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict

from utils import synthetic

logger = logging.getLogger(__name__)

BACKENDS = ("synthetic", "disk", "gcs")
SPLITS = ("train", "val")
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
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmdet-determined"


class DataError(ValueError):
    """A problem in the experiment's `data` section or in the data, with what to do about it."""


def apply_data_section(cfg: Config, data: dict[str, Any], verify_paths: bool = True) -> None:
    """Point the config's train/val datasets and evaluator at the data the experiment names.

    `verify_paths=False` (for checks on a machine without the data) skips reading the data.
    """
    backend = data.get("backend", "disk")
    layout = {key: data.get(key, default) for key, default in DISK_DEFAULTS.items()}
    if backend == "synthetic":
        spec = synthetic.SyntheticSpec(**(data.get("synthetic") or {}))
        root = str(synthetic.ensure_dataset(Path(data.get("cache_dir") or DEFAULT_CACHE), spec))
        layout = SYNTHETIC_LAYOUT
        # Generated shapes need no ImageNet features, and tests and demos must not download.
        if drop_pretrained(cfg.model):
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
        from utils import gcs  # registers the gs:// file backend that LoadImageFromFile uses

        if not data.get("bucket"):
            raise DataError("data.bucket is not set: name the GCS bucket that holds the dataset.")
        prefix = (data.get("prefix") or "").strip("/")
        root = f"gs://{data['bucket']}/{prefix + '/' if prefix else ''}"
        blobs = [f"{prefix}/{layout[f'{split}_ann']}".lstrip("/") for split in SPLITS]
        if verify_paths:
            cache = Path(data.get("cache_dir") or DEFAULT_CACHE) / "gcs"
            local = gcs.download_annotations(data["bucket"], blobs, cache)
        else:
            local = [Path(blob) for blob in blobs]
        ann_files = dict(zip(SPLITS, local, strict=True))
    else:
        raise DataError(f"data.backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}.")

    classes = data.get("classes")
    if verify_paths:
        classes = classes_of(ann_files["val"], classes)
    for split in SPLITS:
        dataset = base_dataset(cfg[f"{split}_dataloader"].dataset)
        dataset.data_root = root
        dataset.ann_file = str(ann_files[split]) if verify_paths else layout[f"{split}_ann"]
        dataset.data_prefix = dict(img=layout[f"{split}_img_prefix"])
        if classes:
            dataset.metainfo = dict(classes=tuple(classes))
    evaluators = cfg.val_evaluator if isinstance(cfg.val_evaluator, list) else [cfg.val_evaluator]
    for evaluator in evaluators:
        evaluator.ann_file = str(ann_files["val"])
    if classes:
        set_num_classes(cfg.model, len(classes))


def classes_of(ann_file: Path, classes: list[str] | None) -> list[str]:
    """The class names to train: `data.classes`, else the annotation file's categories by id.

    mmdet maps names to category ids through the annotation file, so ids need not be contiguous;
    a named class missing from the file would silently get no boxes, hence the error.
    """
    try:
        categories = json.loads(ann_file.read_text()).get("categories")
    except (OSError, ValueError) as err:
        raise DataError(f"{ann_file}: cannot read the annotation file ({err}).") from err
    if not isinstance(categories, list) or not categories:
        raise DataError(f"{ann_file}: no 'categories' list; COCO annotation files need one.")
    names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    if not classes:
        return names
    missing = [name for name in classes if name not in names]
    if missing:
        raise DataError(
            f"data.classes names {missing} that {ann_file} does not have; its categories are "
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


def set_num_classes(model_cfg: Any, num_classes: int) -> int:
    """Set every `num_classes` in the model config (all heads); return how many were set."""
    count = 0
    if isinstance(model_cfg, dict):
        for key, value in model_cfg.items():
            if key == "num_classes":
                model_cfg[key] = num_classes
                count += 1
            else:
                count += set_num_classes(value, num_classes)
    elif isinstance(model_cfg, (list, tuple)):
        count += sum(set_num_classes(item, num_classes) for item in model_cfg)
    return count


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


def base_dataset(dataset_cfg: ConfigDict) -> ConfigDict:
    """The innermost dataset of wrappers such as RepeatDataset or ClassBalancedDataset."""
    while "ann_file" not in dataset_cfg and "dataset" in dataset_cfg:
        dataset_cfg = dataset_cfg.dataset
    return dataset_cfg
