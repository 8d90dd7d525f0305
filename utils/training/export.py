"""Checkpoints that MMDetection's own tools load: `model.pth` and `config.py` in one folder.

`model.pth` is what mmengine's runner saves, `{"state_dict", "meta"}`, with the bare detector's
weights and `meta.dataset_meta` (classes, palette), so `mmdet.apis.init_detector(config.py,
model.pth)`, mmdet's `tools/test.py` and the predict command read it. `config.py` is the trial's
resolved config: its test split is the trial's validation split, with absolute data paths.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import mmdet
import mmengine
import torch
from mmengine.config import Config

from utils.base.errors import ExportError
from utils.base.files import strip_module_prefix
from utils.config.tree import base_dataset, evaluator_configs
from utils.data.voc import VOC_METRIC

MODEL_FILE = "model.pth"
CONFIG_FILE = "config.py"
# The folder a training checkpoint (of any engine) keeps its export in.
EXPORT_DIR = "mmdet"


def export_config(cfg: Config) -> Config:
    """The config as mmdet's tools read it: test = the trial's validation, mmdet's own types."""
    cfg = copy.deepcopy(cfg)
    evaluators = evaluator_configs(cfg.val_evaluator)
    for evaluator in evaluators:
        if evaluator.get("type") == VOC_METRIC:  # registered by this package only
            evaluator.type = "VOCMetric"
    # Only train/val point at the experiment's data; tools/test.py and init_detector read test.
    cfg.test_dataloader = copy.deepcopy(cfg.val_dataloader)
    cfg.test_evaluator = copy.deepcopy(cfg.val_evaluator)
    return cfg


def dataset_meta(metainfo: dict[str, Any]) -> dict[str, Any]:
    """`classes` and one `palette` colour per class from a dataset's metainfo."""
    classes = tuple(metainfo["classes"])
    palette = [tuple(int(c) for c in color) for color in metainfo.get("palette") or []]
    return {"classes": classes, "palette": palette[: len(classes)]}


def config_dataset_meta(cfg: Config) -> dict[str, Any]:
    """The validation dataset's `dataset_meta`, built lazily (no annotation file is read)."""
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)  # mmdet's transforms, not mmcv's
    dataset_cfg = copy.deepcopy(base_dataset(cfg.val_dataloader.dataset))
    dataset_cfg.lazy_init = True
    return dataset_meta(DATASETS.build(dataset_cfg).metainfo)


def write_export(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    cfg: Config,
    meta: dict[str, Any],
    batches: int | None = None,
) -> Path:
    """Write `out_dir/model.pth` and `out_dir/config.py`; returns `out_dir`.

    Args:
        out_dir: the folder to write (created if needed).
        state_dict: the bare detector's weights (no DDP `module.` prefix).
        cfg: the trial's resolved config.
        meta: the dataset's `dataset_meta` (`classes`, `palette`).
        batches: batches trained, stored as mmengine's `meta.iter`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = export_config(cfg)
    text = cfg.pretty_text
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in strip_module_prefix(state_dict).items()},
        "meta": {
            "dataset_meta": meta,
            "cfg": text,
            "mmdet_version": mmdet.__version__,
            "mmengine_version": mmengine.__version__,
            "iter": batches,
        },
    }
    # Written under temporary names and renamed: a reader never sees half a file.
    for name, write in (
        (MODEL_FILE, lambda path: torch.save(checkpoint, path)),
        (CONFIG_FILE, lambda path: path.write_text(text)),
    ):
        partial = out_dir / f".{name}.partial"
        write(partial)
        partial.replace(out_dir / name)
    return out_dir


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} is missing: pass a Determined checkpoint folder.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON ({err}).") from err
