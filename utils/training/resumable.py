"""Whether a checkpoint can be resumed by this run: the same model, whatever the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmengine.config import Config

from utils.base.errors import ExperimentError
from utils.training.export import CONFIG_FILE, EXPORT_DIR

# Model keys that do not shape the weights: a resumed run may change them.
NOT_WEIGHTS = ("init_cfg", "pretrained", "train_cfg", "test_cfg", "data_preprocessor")
UNSET = object()  # a key one of two model configs does not have


def model_difference(saved: Any, current: Any, where: str = "model") -> str | None:
    """The first key where two model configs differ in what shapes the weights (the `type`
    first), as `key is <saved> there and <current> here`; None if they build the same weights."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current), key=lambda key: (key != "type", str(key)))
        for key in keys:
            if key in NOT_WEIGHTS:
                continue
            found = model_difference(
                saved.get(key, UNSET), current.get(key, UNSET), f"{where}.{key}"
            )
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for index, (a, b) in enumerate(zip(saved, current, strict=True)):
            found = model_difference(a, b, f"{where}.{index}")
            if found:
                return found
        return None
    if saved != current:
        return f"{where} is {_brief(saved)} there and {_brief(current)} here"
    return None


def _brief(value: Any) -> str:
    """A config value in a few words: a mapping by its type."""
    if value is UNSET:
        return "unset"
    if isinstance(value, dict):
        return f"a {value['type']}" if "type" in value else "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resumable(resume: str, cfg: Config) -> None:
    """Refuse, before Determined loads it, a checkpoint whose model is not this run's (another
    detector, backbone or class count), naming the first difference."""
    saved_config = Path(resume).resolve() / EXPORT_DIR / CONFIG_FILE
    if not saved_config.is_file():  # a checkpoint of an older version: Determined will tell
        return
    saved = json.loads(json.dumps(Config.fromfile(saved_config).model.to_dict(), default=str))
    current = json.loads(json.dumps(cfg.model.to_dict(), default=str))
    difference = model_difference(saved, current)
    if difference:
        raise ExperimentError(
            f"--resume {resume}: the checkpoint is of another model ({difference}, per "
            f"{saved_config}). Resume it with the experiment, hyperparameters and data it was "
            f"trained with, or start a new run from its weights with "
            f"--set hyperparameters.load_from={saved_config.parent / 'model.pth'}."
        )
