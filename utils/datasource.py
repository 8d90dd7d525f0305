"""Where a trial's data comes from: generated, a COCO or VOC folder on disk, or a GCS bucket.

Points the config's train/val datasets and evaluator at the data the experiment's `data` section
names, with the classes of the annotation file, and fails with the key to fix when data is missing.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict

from utils import synthetic
from utils.annotations import AnnotationReport, check_coco_file

logger = logging.getLogger(__name__)

BACKENDS = ("synthetic", "disk", "gcs")
FORMATS = ("coco", "voc")
SPLITS = ("train", "val")
VOC_SPLIT_DEFAULTS = {"train_split": "trainval", "val_split": "test"}
# The registered name of VOCMetric with prefixed results (see `register_voc_metric`).
VOC_METRIC = "PrefixedVOCMetric"
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
        root = str(synthetic.ensure_dataset(Path(data.get("cache_dir") or DEFAULT_CACHE), spec))
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
    evaluators = cfg.val_evaluator if isinstance(cfg.val_evaluator, list) else [cfg.val_evaluator]
    for evaluator in evaluators:
        evaluator.ann_file = str(ann_files["val"])
    if classes:
        set_num_classes(cfg.model, len(classes))


def apply_voc_section(cfg: Config, data: dict[str, Any], verify_paths: bool = True) -> None:
    """Point the config at a VOCdevkit folder: one VOCDataset per year, VOC mAP evaluation.

    Training concatenates `data.years`' `train_split`s; validation uses the first year's
    `val_split`, as mmdet's VOC0712 configs do.
    """
    if not data.get("root"):
        raise DataError("data.root is not set: name the VOCdevkit folder (it holds VOC2007/).")
    root = str(Path(data["root"]).expanduser())
    years = data.get("years", [2007])
    years = [years] if isinstance(years, int | str) else years
    if not isinstance(years, list) or not years:
        raise DataError(f"data.years is {years!r}: list VOC years, e.g. [2007, 2012].")
    splits = {key: data.get(key, default) for key, default in VOC_SPLIT_DEFAULTS.items()}
    if verify_paths:
        for year in years:
            check_voc_paths(Path(root), year, "train_split", splits["train_split"])
        check_voc_paths(Path(root), years[0], "val_split", splits["val_split"])
    classes = tuple(data.get("classes") or voc_classes(cfg))
    for split, split_years in (("train", years), ("val", years[:1])):
        slot = dataset_slot(cfg[f"{split}_dataloader"])
        template = base_dataset(slot.dataset)
        datasets = []
        for year in split_years:
            dataset = copy.deepcopy(template)
            # Assigned, not update()d: ConfigDict.update would merge COCO's data_prefix in.
            dataset["type"] = "VOCDataset"
            dataset["data_root"] = root
            dataset["ann_file"] = f"VOC{year}/ImageSets/Main/{splits[f'{split}_split']}.txt"
            dataset["data_prefix"] = dict(sub_data_root=f"VOC{year}/")
            dataset["metainfo"] = dict(classes=classes)
            datasets.append(dataset)
        # VOCDataset names its year in metainfo['dataset_type'], which ConcatDataset compares.
        slot.dataset = (
            datasets[0]
            if len(datasets) == 1
            else ConfigDict(type="ConcatDataset", ignore_keys=["dataset_type"], datasets=datasets)
        )
    cfg.val_evaluator = voc_evaluator(cfg.val_evaluator, years[0])
    set_num_classes(cfg.model, len(classes))


def voc_classes(cfg: Config) -> tuple[str, ...]:
    """The config's dataset classes, else VOC's 20."""
    metainfo = base_dataset(cfg.train_dataloader.dataset).get("metainfo") or {}
    if metainfo.get("classes"):
        return tuple(metainfo["classes"])
    from mmdet.datasets.voc import VOCDataset  # slow import, only for VOC data

    return tuple(VOCDataset.METAINFO["classes"])


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


def voc_evaluator(evaluator_cfg: Any, val_year: int | str) -> ConfigDict:
    """mmdet's VOCMetric (mAP) with the config's settings; its results named `voc_mAP`, ...

    eval_mode: the config's VOCMetric's (mmdet's VOC0712 configs say '11points'), else mmdet's
    default for the validation year ('11points' for 2007, 'area' after); `override_mmdet_config`
    `val_evaluator.eval_mode` changes it.
    """
    evaluators = evaluator_cfg if isinstance(evaluator_cfg, list) else [evaluator_cfg]
    voc = [e for e in evaluators if e.get("type") in ("VOCMetric", VOC_METRIC)]
    settings = copy.deepcopy(voc[0]) if voc else ConfigDict()
    settings.setdefault("eval_mode", "11points" if str(val_year) == "2007" else "area")
    settings.setdefault("prefix", "voc")
    settings.update(type=register_voc_metric(), metric="mAP")
    return settings


def register_voc_metric() -> str:
    """Register, once, mmdet's VOCMetric with results named `<prefix>_mAP`, `<prefix>_AP50`.

    The trial reports `compute_metrics`' keys as they are, and VOCMetric's bare `mAP` would not
    say what it measures. Registered on first use: importing mmdet's metrics takes seconds.
    """
    from mmdet.evaluation import VOCMetric
    from mmdet.registry import METRICS

    if VOC_METRIC not in METRICS.module_dict:

        class PrefixedVOCMetric(VOCMetric):
            def compute_metrics(self, results: list) -> dict[str, float]:
                computed = super().compute_metrics(results)
                return {f"{self.prefix}_{key}": value for key, value in computed.items()}

        METRICS.register_module(name=VOC_METRIC, module=PrefixedVOCMetric)
    return VOC_METRIC


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
    """The innermost dataset of wrappers such as RepeatDataset, the first one of a ConcatDataset."""
    while "ann_file" not in dataset_cfg:
        if "dataset" in dataset_cfg:
            dataset_cfg = dataset_cfg.dataset
        elif dataset_cfg.get("datasets"):
            dataset_cfg = dataset_cfg.datasets[0]
        else:
            break
    return dataset_cfg


def dataset_slot(loader_cfg: ConfigDict) -> ConfigDict:
    """The config holding, as `dataset`, the loader's dataset inside wrappers (RepeatDataset...).

    That dataset may be a ConcatDataset: the VOC formats replace it whole.
    """
    parent = loader_cfg
    while "ann_file" not in parent.dataset and "dataset" in parent.dataset:
        parent = parent.dataset
    return parent


def use_coco_format(cfg: Config) -> None:
    """Make a VOC config's datasets CocoDatasets and its VOCMetric a COCO bbox metric.

    COCO data (generated, or `data.format: coco`) then trains any VOC recipe; other configs are
    left alone.
    """
    for split in SPLITS:
        slot = dataset_slot(cfg[f"{split}_dataloader"])
        dataset = base_dataset(slot.dataset)
        if dataset.get("type") != "VOCDataset":
            continue
        dataset = copy.deepcopy(dataset)
        dataset.type = "CocoDataset"
        dataset.pop("data_prefix", None)
        if dataset.get("filter_cfg"):
            dataset.filter_cfg.pop("bbox_min_size", None)  # XMLDataset's only
        slot.dataset = dataset
    evaluators = cfg.val_evaluator if isinstance(cfg.val_evaluator, list) else [cfg.val_evaluator]
    if any(e.get("type") in ("VOCMetric", VOC_METRIC) for e in evaluators):
        cfg.val_evaluator = ConfigDict(type="CocoMetric", metric="bbox", format_only=False)
