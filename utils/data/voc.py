"""Pascal VOC data: a VOCdevkit folder as VOCDatasets, VOC mAP results named `voc_mAP`, ...

(A VOC config trained on COCO data is `utils.config.tree.use_coco_format`'s.)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict

from utils.base.errors import DataError
from utils.config.tree import VOC_METRIC, evaluator_configs, point_at_voc

VOC_SPLIT_DEFAULTS = {"train_split": "trainval", "val_split": "test"}


def apply_voc_section(cfg: Config, data: dict[str, Any]) -> None:
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
    evaluator = voc_evaluator(cfg.val_evaluator, years[0])
    classes = tuple(data["classes"]) if data.get("classes") else None
    point_at_voc(cfg, root, years, splits, classes, evaluator)


def voc_evaluator(evaluator_cfg: Any, val_year: int | str) -> ConfigDict:
    """mmdet's VOCMetric (mAP) with the config's settings; its results named `voc_mAP`, ...

    eval_mode: the config's VOCMetric's (mmdet's VOC0712 configs say '11points'), else mmdet's
    default for the validation year ('11points' for 2007, 'area' after); `override_mmdet_config`
    `val_evaluator.eval_mode` changes it.
    """
    name = register_voc_metric()
    evaluators = evaluator_configs(evaluator_cfg)
    voc = [e for e in evaluators if e.get("type") in ("VOCMetric", VOC_METRIC)]
    settings = copy.deepcopy(voc[0]) if voc else ConfigDict()
    settings.setdefault("eval_mode", "11points" if str(val_year) == "2007" else "area")
    settings.setdefault("prefix", "voc")
    settings.update(type=name, metric="mAP")
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
