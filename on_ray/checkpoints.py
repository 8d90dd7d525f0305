"""Ray's checkpoints as the shared commands (`export`, `predict`, `evaluate`) and serving read
them: a checkpoint folder (`<storage>/<run>/checkpoint_*`, with the mmdet export and the
experiment that trained it), or any folder model_def.py takes; a Determined UUID once the
Determined adapter has fetched it (the Ray adapter talks to no master)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.base.errors import PredictError
from utils.experiment.load import environment_variables
from utils.inference.commands import FETCHED, UUID, Checkpoints, checkpoint_run


def ray_checkpoint(checkpoint: str) -> str:
    """The CHECKPOINT of `export`, `predict` and `evaluate` as a local folder: a Ray checkpoint
    (`<storage>/<run>/checkpoint_*`), a Determined checkpoint or an export folder as it is; a
    Determined checkpoint UUID once model_def.py has fetched it (on_ray talks to no master)."""
    path = Path(checkpoint)
    if "://" in checkpoint:  # a --storage URI: the cloud's own tools copy it
        raise PredictError(
            f"Checkpoint {checkpoint} is in cloud storage: copy its folder here first (e.g. "
            "`gsutil cp -r` or `aws s3 cp --recursive`), then pass that folder."
        )
    runs = sorted(path.glob("checkpoint_*")) if path.is_dir() else []
    if runs and not (path / "mmdet").is_dir():  # names sort by batches (zero-padded)
        raise PredictError(
            f"{path} is a Ray run's folder: pass one of its checkpoints, e.g. its last, {runs[-1]}."
        )
    if path.exists() or not UUID.fullmatch(checkpoint):
        return checkpoint
    if (FETCHED / checkpoint).is_dir():
        return str(FETCHED / checkpoint)
    raise PredictError(
        f"Checkpoint {checkpoint} is not a folder here, nor a Determined checkpoint fetched "
        f"before: run `python model_def.py export {checkpoint} --out DIR` once (DET_MASTER and "
        f"`det user login`), then pass DIR or the UUID (kept in {FETCHED})."
    )


def ray_tracking(checkpoint: Path, environ: Mapping[str, str]) -> tuple[Any, str | None]:
    """The MLflow settings and run of a Ray checkpoint: its experiment's `data.mlflow` and
    environment variables (the shell's win, as in a run), the run its RUN_FILE names."""
    from on_ray.state import experiment_of  # the command's own imports stay light for --help

    conf = experiment_of(checkpoint)
    variables = {**environment_variables(conf, torch_cuda()), **environ}
    return checkpoint_run(checkpoint, variables, conf)


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Ray's checkpoints hold the mmdet export, their experiment, and name their MLflow run.
CHECKPOINTS = Checkpoints(locate=ray_checkpoint, tracking=ray_tracking)
