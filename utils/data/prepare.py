"""The one step that reads, writes or fetches a run's data, on each host that builds datasets:
`prepare_source` makes a `DataPlan` (`utils.data.source`) true here. It generates the synthetic
set, fetches the GCS annotation files, checks the paths and annotation files, and gives the config
the annotation file's classes when the data section names none. The per-host caches and file
locks of `synthetic`, `gcs` and `annotations` make it cheap to repeat, from every rank of a host.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mmengine.config import Config

from utils.base.errors import DataError
from utils.config.build import apply_overrides
from utils.config.tree import SPLITS, set_classes
from utils.data import synthetic
from utils.data.annotations import check_coco_file
from utils.data.source import DataPlan


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
    classes = reports["val"].classes_to_train(list(plan.classes) if plan.classes else None)
    if plan.classes:
        return cfg  # given to the config when planned, and now checked against the file
    cfg = copy.deepcopy(cfg)  # the plan's config stays as planned
    # mmdet's palette: only generated data have their own, and they name their classes when planned.
    set_classes(cfg, tuple(classes))
    return cfg


def prepared_config(cfg: Config, data_plan: DataPlan, hparams: dict[str, Any]) -> Config:
    """`cfg` with its data ready here (`prepare_source`); the hyperparameters' overrides stay on
    top of the classes it may set, as they are on top of everything else the data section sets."""
    prepared = prepare_source(cfg, data_plan)
    if prepared is not cfg:
        apply_overrides(prepared, hparams.get("override_mmdet_config") or {})
    return prepared


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


def check_voc_folders(root: str, years: list[int | str], splits: dict[str, str]) -> None:
    """Every year's training split and the first year's validation split are there."""
    for year in years:
        check_voc_paths(Path(root), year, "train_split", splits["train_split"])
    check_voc_paths(Path(root), years[0], "val_split", splits["val_split"])


def check_voc_paths(root: Path, year: int | str, split_key: str, split: str) -> None:
    """Fail with the data key to fix when a year's folder, split file or sub-folder is missing."""
    year_dir = root / f"VOC{year}"
    if not year_dir.is_dir():
        raise DataError(
            f"data.years: folder {year_dir} does not exist; data.root must be the VOCdevkit "
            f"folder that holds VOC{year}/."
        )
    split_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(
            f"data.{split_key}: split file {split_file} does not exist; check data.root, "
            f"data.years and data.{split_key}."
        )
    for folder in ("Annotations", "JPEGImages"):
        if not (year_dir / folder).is_dir():
            raise DataError(
                f"data.root: folder {year_dir / folder} does not exist; a VOC year needs "
                "Annotations/, JPEGImages/ and ImageSets/Main/."
            )
