"""Checkpoints that MMDetection's own tools load: `model.pth` and `config.py` in one folder.

`model.pth` is what mmengine's runner saves, `{"state_dict", "meta"}`, with the bare detector's
weights and `meta.dataset_meta` (classes, palette), so `mmdet.apis.init_detector(config.py,
model.pth)`, mmdet's `tools/test.py` and the predict command read it. `config.py` is the trial's
resolved config: its test split is the trial's validation split, with absolute data paths.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import mmdet
import mmengine
import numpy as np
import torch
from mmengine.config import Config

from utils.config import ConfigError, build_config
from utils.datasource import VOC_METRIC, DataError, base_dataset
from utils.experiment import load_experiment

MODEL_FILE = "model.pth"
CONFIG_FILE = "config.py"
# The folder a Determined checkpoint keeps its export in.
EXPORT_DIR = "mmdet"


class ExportError(ValueError):
    """A checkpoint that cannot be exported or loaded, with what to do about it."""


def export_config(cfg: Config) -> Config:
    """The config as mmdet's tools read it: test = the trial's validation, mmdet's own types."""
    cfg = copy.deepcopy(cfg)
    evaluators = cfg.val_evaluator if isinstance(cfg.val_evaluator, list) else [cfg.val_evaluator]
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


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The weights of a DistributedDataParallel-wrapped model under the bare model's names."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key.removeprefix("module."): value for key, value in state_dict.items()}
    return dict(state_dict)


def load_determined_weights(checkpoint_dir: Path, averaged: bool = True) -> dict[str, torch.Tensor]:
    """The detector's weights from a Determined checkpoint's `state_dict.pth`: with `averaged`,
    those of the run's EMAHook if it has one (as mmengine exports them), else the trained ones."""
    path = checkpoint_dir / "state_dict.pth"
    if not path.is_file():
        raise ExportError(
            f"{checkpoint_dir}: no state_dict.pth; pass a Determined checkpoint folder."
        )
    # Determined stores numpy's RNG state next to the weights; nothing else needs unpickling.
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    # Only those not yet allowed: leaving the context removes its globals, even if the caller
    # (model_def, for Determined's own restores) had allowed them before.
    missing = [name for name in allowed if name not in torch.serialization.get_safe_globals()]
    try:
        with torch.serialization.safe_globals(missing):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        reason = str(err).splitlines()[0][:200]  # torch's first line says what failed
        raise ExportError(
            f"{path} cannot be loaded ({reason}); is the checkpoint complete?"
        ) from err
    models = state.get("models_state_dict") if isinstance(state, dict) else None
    if not models:
        raise ExportError(f"{path} holds no models_state_dict: not a PyTorchTrial checkpoint.")
    ema = (state.get("callbacks") or {}).get("ema")  # utils.hooks.EmaWeights.state_dict()
    if ema and averaged:
        return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    return strip_module_prefix(models[0])


def determined_config(
    checkpoint_dir: Path, experiment_conf: dict[str, Any] | None = None
) -> tuple[Config, int | None]:
    """The trial's config rebuilt from a Determined checkpoint, and the batches it trained.

    Hyperparameters are the checkpoint's own (`load_data.json`: a search trial's sampled values,
    not the experiment's ranges); the config files are the ones saved in its `code/` folder, as
    trained. The `data` section is `experiment_conf`'s when given (data moved or on another
    machine), else the checkpoint's experiment's; the classes come from its annotation files.
    """
    load_data = read_json(checkpoint_dir / "load_data.json")
    hparams = dict(load_data.get("hparams") or {})
    saved_conf = load_data.get("experiment_config") or {}
    conf = experiment_conf or saved_conf
    if not hparams.get("config_file"):
        raise ExportError(f"{checkpoint_dir / 'load_data.json'} names no hparams.config_file.")
    for key in ("config_file", "merge_config"):
        saved = checkpoint_dir / "code" / str(hparams.get(key) or "")
        if hparams.get(key) and not str(hparams[key]).startswith("mmdet::") and saved.is_file():
            hparams[key] = str(saved)
    slots = (conf.get("resources") or {}).get("slots_per_trial") or 1
    try:
        cfg = build_config(hparams, conf.get("data") or {}, max(int(slots), 1))
    except (ConfigError, DataError) as err:
        raise ExportError(
            f"{checkpoint_dir}: cannot rebuild its config ({err}). The export needs the "
            "annotation files for the class names: pass --experiment with a data section that "
            "points at the data here."
        ) from err
    metadata = checkpoint_dir / "metadata.json"
    batches = read_json(metadata).get("steps_completed") if metadata.is_file() else None
    return cfg, batches


def export_determined_checkpoint(
    checkpoint_dir: str | Path, out_dir: str | Path, experiment_conf: dict[str, Any] | None = None
) -> Path:
    """Write the mmdet export of an existing Determined checkpoint folder into `out_dir`."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ExportError(f"{checkpoint_dir}: no such checkpoint folder.")
    cfg, batches = determined_config(checkpoint_dir, experiment_conf)
    weights = load_determined_weights(checkpoint_dir)
    return write_export(out_dir, weights, cfg, config_dataset_meta(cfg), batches)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} is missing: pass a Determined checkpoint folder.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON ({err}).") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `export` command's arguments."""
    parser.add_argument("checkpoint", help="Determined checkpoint folder (or checkpoint UUID)")
    parser.add_argument("--out", required=True, help="folder for model.pth and config.py")
    parser.add_argument(
        "--experiment",
        help="experiment YAML whose data section to use instead of the checkpoint's (for data "
        "that moved); hyperparameters and config files stay the checkpoint's",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of it"
    )


def run(args: argparse.Namespace) -> Path:
    """The `export` command: writes the export of `args.checkpoint` into `args.out`."""
    conf = load_experiment(args.experiment, args.set) if args.experiment else None
    out = export_determined_checkpoint(args.checkpoint, args.out, conf)
    print(f"Wrote {out / MODEL_FILE} and {out / CONFIG_FILE}.")
    return out
