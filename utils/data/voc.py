"""Pascal VOC data: a VOCdevkit folder as VOCDatasets, VOC mAP results named `voc_mAP`, ...

Also turns a VOC config's datasets and metric into COCO ones when it trains COCO data.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict

from utils.base.errors import DataError
from utils.config.evaluators import evaluator_configs
from utils.config.tree import SPLITS, base_dataset, dataset_slot, set_num_classes

VOC_SPLIT_DEFAULTS = {"train_split": "trainval", "val_split": "test"}
# The registered name of VOCMetric with prefixed results (see `register_voc_metric`).
VOC_METRIC = "PrefixedVOCMetric"


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
    evaluators = evaluator_configs(evaluator_cfg)
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
    evaluators = evaluator_configs(cfg.val_evaluator)
    if any(e.get("type") in ("VOCMetric", VOC_METRIC) for e in evaluators):
        cfg.val_evaluator = ConfigDict(type="CocoMetric", metric="bbox", format_only=False)
