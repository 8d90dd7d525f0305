"""What the Determined adapter adds to the `export`, `predict` and `evaluate` commands
(utils/inference/commands.py, the same from `python -m on_ray`): a checkpoint folder, or a
checkpoint UUID fetched from the master; Determined checkpoints exported from their training
state, their MLflow run read from their experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from on_determined.checkpoints import (
    checkpoint_tracking,
    export_determined_checkpoint,
    local_checkpoint,
)
from utils.inference.commands import Checkpoints, copy_export


def export_checkpoint(checkpoint: Path, out: Path, experiment_conf: dict[str, Any] | None) -> Path:
    """A Determined checkpoint's export rebuilt from its hyperparameters and weights (so one
    written before the export existed has one too; `experiment_conf`'s data section rebuilds
    the config); another engine's checkpoint, or an export folder, exported as any engine does."""
    has_export = any(
        (folder / "model.pth").is_file() for folder in (checkpoint / "mmdet", checkpoint)
    )
    if has_export and not (checkpoint / "load_data.json").is_file():
        return copy_export(checkpoint, out, experiment_conf)
    return export_determined_checkpoint(checkpoint, out, experiment_conf)


CHECKPOINTS = Checkpoints(
    locate=local_checkpoint, export=export_checkpoint, tracking=checkpoint_tracking
)
