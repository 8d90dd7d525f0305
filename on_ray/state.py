"""A Ray checkpoint folder: what a restarted worker group needs to go on exactly, plus the same
mmdet export (`mmdet/model.pth`, `mmdet/config.py`) and prediction drawings as Determined's.

    training_state.pth   the chief's: model, optimizer, LR schedule, loss scaler, session state
    rng/rank_<r>.pth     each rank's random generators (merged into one folder by Ray)
    metadata.json        {"batches_trained": N, "engine": "ray", "experiment": {...}}
    mmdet/               the export `predict`, `export` and mmdet's tools load
    predictions/         the last validation's drawings
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.base.errors import ExperimentError
from utils.base.files import safe_load
from utils.training.outputs import RunOutputs
from utils.training.session import TrainingSession

STATE_FILE = "training_state.pth"
METADATA_FILE = "metadata.json"
RNG_DIR = "rng"
# report(metrics, checkpoint folder or None): Ray's train or tune report, called on every rank.
Report = Callable[[dict[str, Any], "Path | None"], None]


def checkpoint(
    session: TrainingSession,
    rank: int,
    metrics: dict[str, Any],
    report: Report,
    outputs: RunOutputs | None,
    experiment: dict[str, Any],
) -> None:
    """Write this rank's part of the checkpoint and hand it to Ray with the metrics."""
    with tempfile.TemporaryDirectory(prefix="mmdet-ray-") as folder:
        folder = Path(folder)
        write_rank_state(folder, rank, session.device)
        if outputs is not None:
            write_chief_state(folder, session, experiment)
            outputs.checkpoint(folder)
        batches = session.batches_trained
        reported = {
            **metrics,
            "batches": batches,
            "epochs": batches / session.schedule.epoch_length,
        }
        report(reported, folder)


def write_chief_state(folder: Path, session: TrainingSession, experiment: dict[str, Any]) -> None:
    """The chief's part: training state and metadata (the mmdet export and the drawings are the
    run's outputs, `utils.training.outputs.RunOutputs.checkpoint`)."""
    state = {
        "model": session.detector.state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "lr_schedulers": session.lr_schedulers.state_dict(),
        "scaler": session.scaler.state_dict() if session.scaler is not None else None,
        "session": session.state_dict(),
        "batches_trained": session.batches_trained,
    }
    torch.save(state, folder / STATE_FILE)
    # The experiment, as Determined keeps it with a checkpoint: later commands (evaluate) log to
    # the MLflow settings of its data section and environment.
    metadata = {
        "batches_trained": session.batches_trained,
        "engine": "ray",
        "experiment": experiment,
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata))


def write_rank_state(folder: Path, rank: int, device: torch.device) -> None:
    """Every rank's random generators: the model's own draws (e.g. Mask R-CNN's samplers) go
    on as in an uninterrupted run."""
    (folder / RNG_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(device), folder / RNG_DIR / f"rank_{rank}.pth")


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {
        "torch": torch.random.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def experiment_of(folder: Path) -> dict[str, Any]:
    """The experiment a checkpoint (or the one around its `mmdet/` export) was trained by; {} if
    it does not say (not ours, or written before checkpoints kept it)."""
    for candidate in (folder, folder.parent):
        metadata = candidate / METADATA_FILE
        if metadata.is_file():
            return json.loads(metadata.read_text()).get("experiment") or {}
    return {}


def batches_of(folder: Path) -> int:
    """The batches a checkpoint folder trained; an error naming it if it is not ours."""
    metadata = folder / METADATA_FILE
    if not (folder / STATE_FILE).is_file() or not metadata.is_file():
        raise ExperimentError(
            f"{folder}: not a checkpoint of `python -m on_ray train` (no {STATE_FILE} or "
            f"{METADATA_FILE}); pass a folder under the run's storage path, e.g. "
            "<storage>/<run>/checkpoint_*."
        )
    return int(json.loads(metadata.read_text())["batches_trained"])


def load_state(folder: Path, session: TrainingSession, rank: int) -> None:
    """Restore a checkpoint into a freshly built session (the same run's config)."""
    state = safe_load(folder / STATE_FILE)
    session.detector.load_state_dict(state["model"])
    session.optimizer.load_state_dict(state["optimizer"])
    session.lr_schedulers.load_state_dict(state["lr_schedulers"])
    if session.scaler is not None and state["scaler"] is not None:
        session.scaler.load_state_dict(state["scaler"])
    session.load_state_dict(state["session"])
    session.continue_from(int(state["batches_trained"]))  # in "session" too, since 2026-12
    rng_file = folder / RNG_DIR / f"rank_{rank}.pth"
    if rng_file.is_file():  # absent when the run resumes on more ranks than it had
        rng = safe_load(rng_file)
        torch.random.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["random"])
        if "cuda" in rng and session.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], session.device)
