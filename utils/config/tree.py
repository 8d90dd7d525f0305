"""Finding things in an mmdet config: the datasets inside wrappers, every head's class count."""

from __future__ import annotations

from typing import Any

from mmengine.config import ConfigDict

# The config's data loaders: `train_dataloader` and `val_dataloader`.
SPLITS = ("train", "val")


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
