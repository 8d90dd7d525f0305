"""Finding and setting things in an mmdet config: the datasets inside wrappers, the evaluator's
metrics, every head's class count, and the data a run trains on, written into the tree in one pass.

The data layer (`utils.data.source`, `utils.data.voc`) decides where the data is and what it
holds; `point_at_coco` and `point_at_voc` write that into the config.
"""

from __future__ import annotations

import copy
from typing import Any

from mmengine.config import Config, ConfigDict

# The config's data loaders: `train_dataloader` and `val_dataloader`.
SPLITS = ("train", "val")
# mmdet's VOCMetric with prefixed results, as `utils.data.voc.register_voc_metric` registers it.
VOC_METRIC = "PrefixedVOCMetric"


def evaluator_configs(evaluator: Any) -> list[Any]:
    """The metric configs of a `val_evaluator` (mmengine lets it be one mapping, a list of them,
    or None) as a list; the items are the config's own, so changing one changes the config."""
    if evaluator is None:
        return []
    return list(evaluator) if isinstance(evaluator, list | tuple) else [evaluator]


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


def set_classes(cfg: Config, classes: tuple[str, ...], palette: list | None = None) -> None:
    """The classes (and their drawing colours) into both datasets' metainfo, and every head's
    `num_classes`."""
    for split in SPLITS:
        dataset = base_dataset(cfg[f"{split}_dataloader"].dataset)
        dataset.metainfo = dict(classes=tuple(classes))
        if palette is not None:
            dataset.metainfo["palette"] = list(palette)
    set_num_classes(cfg.model, len(classes))


def point_at_coco(
    cfg: Config,
    root: str,
    ann_files: dict[str, str],
    img_prefixes: dict[str, str],
    *,
    classes: tuple[str, ...] | None = None,
    palette: list | None = None,
    image_backend_args: dict[str, Any] | None = None,
    drop_weights: bool = False,
) -> int:
    """Point the config's datasets and evaluators at COCO data: a VOC recipe's datasets and
    metric become COCO ones (`use_coco_format`), each split reads `ann_files[split]` under
    `root` with images under `img_prefixes[split]` (through `image_backend_args` when given),
    the evaluators score against the validation file, and `classes` (when given) are trained.

    `drop_weights`: remove the model's pretrained `init_cfg`s and the config's `load_from`.
    Returns how many weights were dropped.
    """
    use_coco_format(cfg)
    dropped = drop_pretrained(cfg.model) + bool(cfg.pop("load_from", None)) if drop_weights else 0
    for split in SPLITS:
        dataset = base_dataset(cfg[f"{split}_dataloader"].dataset)
        dataset.data_root = root
        dataset.ann_file = ann_files[split]
        dataset.data_prefix = dict(img=img_prefixes[split])
        if image_backend_args:
            for step in dataset.pipeline:
                if step.type == "LoadImageFromFile":
                    step.backend_args = dict(image_backend_args)
    for evaluator in evaluator_configs(cfg.val_evaluator):
        evaluator.ann_file = ann_files["val"]
    if classes:
        set_classes(cfg, classes, palette)
    return dropped


def point_at_voc(
    cfg: Config,
    root: str,
    years: list[int | str],
    splits: dict[str, str],
    classes: tuple[str, ...] | None,
    evaluator: ConfigDict,
) -> None:
    """Point the config at a VOCdevkit folder: one VOCDataset per year (training concatenates
    the years' `train_split`s, validation reads the first year's `val_split`, as mmdet's
    VOC0712 configs do) and `evaluator` as the config's `val_evaluator`.

    classes: the ones to train; None: the config's dataset classes, else VOC's 20."""
    classes = classes or config_classes(cfg)
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
    cfg.val_evaluator = evaluator
    set_num_classes(cfg.model, len(classes))


def config_classes(cfg: Config) -> tuple[str, ...]:
    """The config's dataset classes, else VOC's 20."""
    metainfo = base_dataset(cfg.train_dataloader.dataset).get("metainfo") or {}
    if metainfo.get("classes"):
        return tuple(metainfo["classes"])
    from mmdet.datasets.voc import VOCDataset  # slow import, only for VOC data

    return tuple(VOCDataset.METAINFO["classes"])


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
