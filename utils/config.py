"""The MMDetection config of a trial, from its hyperparameters and the experiment's data section.

The MMDetection config stays the single source of truth; hyperparameters only name it and override
a few keys (learning rate, weight decay, momentum, batch size, dotted `override_mmdet_config` keys).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict

from utils import synthetic

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
# The hyperparameters the trial reads; anything else in an experiment is a typo or unused.
KNOWN_HPARAMS = (
    "config_file",
    "merge_config",
    "override_mmdet_config",
    "global_batch_size",
    "lr",
    "weight_decay",
    "momentum",
    "auto_scale_lr",
)
BACKENDS = ("synthetic", "disk")
DISK_DEFAULTS = {
    "train_ann": "annotations/instances_train2017.json",
    "val_ann": "annotations/instances_val2017.json",
    "train_img_prefix": "train2017/",
    "val_img_prefix": "val2017/",
}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmdet-determined"


class ConfigError(ValueError):
    """A problem in the trial's hyperparameters or config files, with what to do about it."""


def resolve_config_path(name: str) -> Path:
    """Find `mmdet::group/file.py` in the installed mmdet, else a path (relative to cwd or repo)."""
    if name.startswith("mmdet::"):
        spec = importlib.util.find_spec("mmdet")
        path = Path(spec.origin).parent / ".mim" / "configs" / name.removeprefix("mmdet::")
        hint = "a path under mmdet's configs/, e.g. mmdet::retinanet/retinanet_r50_fpn_1x_coco.py"
    else:
        path = Path(name)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / name
        hint = "a file under configs/ or an mmdet:: config"
    if not path.is_file():
        raise ConfigError(
            f"hyperparameters.config_file: config {name!r} not found ({path}); use {hint}."
        )
    return path


def build_config(
    hparams: dict[str, Any], data: dict[str, Any], slots: int = 1, verify_paths: bool = True
) -> Config:
    """The trial's config: `config_file`, `merge_config` on top, hyperparameters, data, overrides.

    Args:
        hparams: the trial's hyperparameters (`config_file`, `global_batch_size`, `lr`, ...).
        data: the experiment's `data` section (`backend`, paths).
        slots: processes sharing the global batch (`resources.slots_per_trial`).
        verify_paths: check that the data's files exist (off for checks without the data).
    """
    if "config_file" not in hparams:
        raise ConfigError("hyperparameters.config_file is missing: name an mmdet config to train.")
    cfg = Config.fromfile(resolve_config_path(hparams["config_file"]))
    if hparams.get("merge_config"):
        extra = Config.fromfile(resolve_config_path(hparams["merge_config"]))
        cfg.merge_from_dict(extra.to_dict(), allow_list_keys=True)
    apply_hparams(cfg, hparams)
    apply_data_section(cfg, data, verify_paths)
    global_batch = hparams.get("global_batch_size")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(
            f"hyperparameters.global_batch_size is {global_batch!r}: set a positive integer."
        )
    if global_batch % slots:
        raise ConfigError(
            f"hyperparameters.global_batch_size {global_batch} does not divide by "
            f"resources.slots_per_trial {slots}: make it a multiple."
        )
    cfg.train_dataloader.batch_size = global_batch // slots
    scale_lr(cfg, global_batch, hparams.get("auto_scale_lr"))
    overrides = hparams.get("override_mmdet_config") or {}
    if "train_dataloader.batch_size" in overrides:
        raise ConfigError(
            "override_mmdet_config: train_dataloader.batch_size follows "
            "hyperparameters.global_batch_size / resources.slots_per_trial; set those instead."
        )
    apply_overrides(cfg, overrides)
    return cfg


def apply_hparams(cfg: Config, hparams: dict[str, Any]) -> None:
    """Map the named searchable hyperparameters onto the optimizer config."""
    optimizer = cfg.optim_wrapper.optimizer
    for name in ("lr", "weight_decay", "momentum"):
        if hparams.get(name) is None:
            continue
        if name == "momentum" and "momentum" not in optimizer and optimizer.type != "SGD":
            raise ConfigError(
                f"hyperparameters.momentum is set but the optimizer {optimizer.type} takes no "
                "momentum; remove it or set the optimizer's own keys via override_mmdet_config."
            )
        optimizer[name] = float(hparams[name])


def scale_lr(cfg: Config, global_batch: int, enable: bool | None) -> None:
    """Linear LR scaling as mmengine's runner does it with the config's `auto_scale_lr`.

    The hyperparameter `auto_scale_lr` (true/false) overrides the config's `enable`; the LR in the
    config or in `lr` is then the one for `auto_scale_lr.base_batch_size` images per step.
    """
    auto = cfg.get("auto_scale_lr") or {}
    if enable is not None:
        auto = {**auto, "enable": bool(enable)}
    if not auto.get("enable"):
        return
    if "base_batch_size" not in auto:
        raise ConfigError(
            "auto_scale_lr is enabled but the config has no auto_scale_lr.base_batch_size: "
            "add it (mmdet's COCO configs use 16)."
        )
    ratio = global_batch / auto["base_batch_size"]
    cfg.optim_wrapper.optimizer.lr *= ratio
    logger.info(
        "LR scaled by %d/%d to %g.",
        global_batch,
        auto["base_batch_size"],
        cfg.optim_wrapper.optimizer.lr,
    )


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> None:
    """Apply `override_mmdet_config`: each dotted key must already exist in the config."""
    for key, value in overrides.items():
        parts = key.split(".")
        parent: Any = None
        node: Any = cfg
        for depth, part in enumerate(parts):
            if isinstance(node, (dict, Config)):
                options = list(node)
            elif isinstance(node, list):
                options = [str(i) for i in range(len(node))]
            else:
                options = []
            if part not in options:
                close = difflib.get_close_matches(part, options, n=3)
                raise ConfigError(
                    f"override_mmdet_config: unknown key {key!r} ({part!r} is not in "
                    f"{'.'.join(parts[:depth]) or 'the config'}"
                    + (f"; did you mean {', '.join(close)}?" if close else "")
                    + "). Check the key against the resolved config."
                )
            parent, node = node, node[int(part) if isinstance(node, list) else part]
        leaf = int(parts[-1]) if isinstance(parent, list) else parts[-1]
        parent[leaf] = ConfigDict(value) if isinstance(value, dict) else value


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


def training_length(cfg: Config) -> tuple[int, str]:
    """The config's `train_cfg` length: `(max_epochs, "epochs")` or `(max_iters, "batches")`."""
    train_cfg = cfg.get("train_cfg") or {}
    if "max_epochs" in train_cfg:
        return int(train_cfg.max_epochs), "epochs"
    if "max_iters" in train_cfg:
        return int(train_cfg.max_iters), "batches"
    raise ConfigError(
        "The config's train_cfg names no max_epochs or max_iters, and the experiment's searcher no "
        "max_time: set one of them."
    )


def apply_data_section(cfg: Config, data: dict[str, Any], verify_paths: bool = True) -> None:
    """Point the config's train/val datasets and evaluator at the data the experiment names.

    `verify_paths=False` (for checks on a machine without the data) skips the existence checks.
    """
    backend = data.get("backend", "disk")
    if backend == "synthetic":
        spec = synthetic.SyntheticSpec(**(data.get("synthetic") or {}))
        root = synthetic.ensure_dataset(Path(data.get("cache_dir") or DEFAULT_CACHE), spec)
        layout = {
            "train_ann": "annotations/instances_train.json",
            "val_ann": "annotations/instances_val.json",
            "train_img_prefix": "train/",
            "val_img_prefix": "val/",
        }
        classes = list(synthetic.CLASSES)
        # Generated shapes need no ImageNet features, and tests and demos must not download.
        if drop_pretrained(cfg.model):
            logger.warning("data.backend=synthetic: the model's pretrained weights are not loaded.")
    elif backend == "disk":
        if not data.get("root"):
            raise ConfigError("data.root is not set: name the folder that holds the COCO dataset.")
        root = Path(data["root"]).expanduser()
        layout = {key: data.get(key, default) for key, default in DISK_DEFAULTS.items()}
        classes = data.get("classes")
    else:
        raise ConfigError(f"data.backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}.")

    for split in ("train", "val"):
        ann_file = root / layout[f"{split}_ann"]
        img_dir = root / layout[f"{split}_img_prefix"]
        if verify_paths:
            check_split_paths(split, ann_file, img_dir)
        dataset = base_dataset(cfg[f"{split}_dataloader"].dataset)
        dataset.data_root = str(root)
        dataset.ann_file = layout[f"{split}_ann"]
        dataset.data_prefix = dict(img=layout[f"{split}_img_prefix"])
        if classes:
            dataset.metainfo = dict(classes=tuple(classes))
    evaluators = cfg.val_evaluator if isinstance(cfg.val_evaluator, list) else [cfg.val_evaluator]
    for evaluator in evaluators:
        evaluator.ann_file = str(root / layout["val_ann"])
    if classes:
        set_num_classes(cfg.model, len(classes))


def check_split_paths(split: str, ann_file: Path, img_dir: Path) -> None:
    """Fail with the data key to fix when a split's annotation file or image folder is missing."""
    if not ann_file.is_file():
        raise ConfigError(
            f"data.{split}_ann: annotation file {ann_file} does not exist; check data.root and "
            f"data.{split}_ann."
        )
    if not img_dir.is_dir():
        raise ConfigError(
            f"data.{split}_img_prefix: image folder {img_dir} does not exist; check data.root "
            f"and data.{split}_img_prefix."
        )
