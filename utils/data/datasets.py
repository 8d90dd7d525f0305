"""The mmdet datasets of a resolved config, and the loud checks of their image files."""

from __future__ import annotations

import os
from typing import Any

from mmdet.registry import DATASETS
from mmengine.config import Config

from utils.base.errors import DataError


def build_dataset(cfg: Config, split: str) -> Any:
    """The split's mmdet dataset; an empty one is an error naming what to check."""
    empty = DataError(
        f"The {split} dataset is empty after mmdet's filtering ({split}_dataloader.dataset."
        f"filter_cfg drops images without objects and small images): check data.{split}_ann "
        "and the filter settings."
    )
    try:
        dataset = DATASETS.build(cfg[f"{split}_dataloader"].dataset)
    except ValueError as err:
        # mmengine fails to serialise an empty data list with numpy's bare message.
        if "need at least one array to concatenate" in str(err):
            raise empty from err
        raise
    if len(dataset) == 0:
        raise empty
    return dataset


def leaf_datasets(dataset: Any) -> list[Any]:
    """The datasets inside wrappers (ConcatDataset, RepeatDataset, MultiImageMixDataset, ...)."""
    if hasattr(dataset, "datasets"):
        return [leaf for inner in dataset.datasets for leaf in leaf_datasets(inner)]
    if hasattr(dataset, "dataset"):
        return leaf_datasets(dataset.dataset)
    return [dataset]


def image_problems(dataset: Any, split: str) -> list[str]:
    """The split's image files that are missing or empty (a stat each; decoding is the run's)."""
    bad, total = [], 0
    for leaf in leaf_datasets(dataset):
        for index in range(len(leaf)):
            path = leaf.get_data_info(index).get("img_path")
            if not path or "://" in str(path):
                continue
            total += 1
            try:
                empty = os.stat(path).st_size == 0
            except OSError:
                empty = True
            if empty:
                bad.append(str(path))
    if not bad:
        return []
    return [
        f"data.{split}_img_prefix: {len(bad)} of {total} {split} images are missing or empty, "
        f"e.g. {bad[0]}: check data.root and data.{split}_img_prefix, or restore the files."
    ]
