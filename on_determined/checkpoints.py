"""Determined checkpoint folders: fetched by UUID, read for their weights and config, exported.

A PyTorchTrial checkpoint holds `state_dict.pth` (models, optimizers, callbacks' states),
`load_data.json` (the trial's hyperparameters and experiment config), `metadata.json` and the
code it trained with (`code/`); this package's trials add the mmdet export (`mmdet/`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config

from utils.base.errors import ConfigError, DataError, ExportError
from utils.base.files import safe_load, strip_module_prefix
from utils.experiment.load import environment_variables
from utils.inference.commands import FETCHED, UUID, checkpoint_run
from utils.training import export
from utils.training.plan import build_config
from utils.training.tracking import RUN_FILE
from utils.training.tracking_settings import MlflowSettings

logger = logging.getLogger(__name__)
# The callback keys the session's state was kept under: "session" now, "ema" (EMA weights
# only) in checkpoints written before the session existed.
SESSION_KEYS = ("session", "ema")


def load_determined_weights(checkpoint_dir: Path, averaged: bool = True) -> dict[str, torch.Tensor]:
    """The detector's weights from a Determined checkpoint's `state_dict.pth`: with `averaged`,
    those of the run's EMAHook if it has one (as mmengine exports them), else the trained ones."""
    path = checkpoint_dir / "state_dict.pth"
    if not path.is_file():
        raise ExportError(
            f"{checkpoint_dir}: no state_dict.pth; pass a Determined checkpoint folder."
        )
    try:
        state = safe_load(path)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        reason = str(err).splitlines()[0][:200]  # torch's first line says what failed
        raise ExportError(
            f"{path} cannot be loaded ({reason}); is the checkpoint complete?"
        ) from err
    models = state.get("models_state_dict") if isinstance(state, dict) else None
    if not models:
        raise ExportError(f"{path} holds no models_state_dict: not a PyTorchTrial checkpoint.")
    callbacks = state.get("callbacks") or {}
    ema = callbacks.get("session", {}).get("ema") or callbacks.get("ema")
    if ema and averaged:  # utils.training.hooks.EmaWeights.state_dict(): the averaged model's
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
    load_data = export.read_json(checkpoint_dir / "load_data.json")
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
    batches = export.read_json(metadata).get("steps_completed") if metadata.is_file() else None
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
    return export.write_export(out_dir, weights, cfg, export.config_dataset_meta(cfg), batches)


def local_checkpoint(checkpoint: str) -> str:
    """A local folder as it is; a Determined checkpoint UUID downloaded (once) into the cache.

    The master and login are the `det` CLI's (DET_MASTER, `det user login`).
    """
    if Path(checkpoint).exists() or not UUID.fullmatch(checkpoint):
        return checkpoint
    from determined.experimental import client

    folder = FETCHED / checkpoint
    if not folder.is_dir():
        logger.info("Downloading checkpoint %s into %s", checkpoint, folder)
        partial = folder.with_name(f"{checkpoint}.partial")  # renamed once complete
        shutil.rmtree(partial, ignore_errors=True)
        try:
            client.get_checkpoint(checkpoint).download(str(partial))
        except Exception as err:  # Determined's errors: master unreachable, login, not found
            raise ExportError(
                f"Checkpoint {checkpoint}: cannot fetch it from the Determined master ({err}). "
                "Set DET_MASTER and log in with `det user login`, or pass a local folder."
            ) from err
        partial.rename(folder)
    if not (folder / export.EXPORT_DIR / export.MODEL_FILE).is_file():  # an older checkpoint
        export_determined_checkpoint(folder, folder / export.EXPORT_DIR)
    return str(folder)


def checkpoint_tracking(
    checkpoint: str | Path, environ: dict[str, str]
) -> tuple[MlflowSettings | None, str | None]:
    """Where an evaluation of a checkpoint logs to, as its training did: the MLflow settings
    from its experiment (`data.mlflow`, the experiment's environment variables under `environ`)
    or `environ`, and the id of its training's run (RUN_FILE, else the MLflow callback's state in
    `state_dict.pth`); None for what is not known. A folder inside the checkpoint (its `mmdet/`
    export) counts as the checkpoint."""
    folder = Path(checkpoint)
    if folder.name == export.EXPORT_DIR and (folder.parent / "load_data.json").is_file():
        folder = folder.parent
    conf: dict[str, Any] = {}
    if (folder / "load_data.json").is_file():
        conf = export.read_json(folder / "load_data.json").get("experiment_config") or {}
    variables = {**environment_variables(conf, torch.cuda.is_available()), **environ}
    settings, run = checkpoint_run(folder, variables, conf)
    if (
        settings is None
        or (folder / RUN_FILE).is_file()
        or not (folder / "state_dict.pth").is_file()
    ):
        return settings, run
    try:  # a checkpoint written before RUN_FILE was
        state = safe_load(folder / "state_dict.pth", mmap=True)
    except Exception:  # torch raises many types for a truncated or foreign file
        logger.warning("%s cannot be read for its MLflow run.", folder / "state_dict.pth")
        return settings, None
    return settings, ((state.get("callbacks") or {}).get("mlflow") or {}).get("run_id")
