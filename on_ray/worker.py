"""What every Ray worker runs: a plain loop over the core (`utils/training/loop.py`), the same
training step and validation pass as Determined's trial, so both engines give the same losses,
weights and metrics, and the same outputs (`utils/training/outputs.py`) on the chief.

What is Ray's here: DDP over Ray Train's process group, reports and checkpoints through Ray's
`report` (`on_ray/train.py`, `on_ray/tune.py`), and the training metrics averaged as
Determined reports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from on_ray import state
from on_ray.chief import chief_outputs, close_tensorboard, resume_run_id, run_status
from on_ray.spec import WorkerSpec
from on_ray.state import Report
from utils.base.files import allow_numpy_globals
from utils.evaluation.validation import VALIDATION_FAILURE, failure_keeping_loader
from utils.training.loaders import train_loader, val_loader
from utils.training.loop import (
    TorchCollectives,
    TorchSteps,
    ValidationPass,
    train_step,
    validate,
)
from utils.training.outputs import RunOutputs
from utils.training.sanity import run_sanity_pass
from utils.training.session import TrainingSession


def run_worker(
    spec: WorkerSpec, rank: int, world_size: int, restored: Path | None, report: Report
) -> None:
    """Train this rank's share of the run; `restored`: the checkpoint Ray restarts from."""
    allow_numpy_globals()
    if spec.cwd and Path(spec.cwd).is_dir():
        os.chdir(spec.cwd)
    # Planned once by the driver (a Tune trial: by the trial) for this many workers; a worker
    # does not plan again. The session readies the data on this host (`prepare_data`).
    plan = spec.plan
    if plan.world_size != world_size:
        raise RuntimeError(f"The run was planned for {plan.world_size} workers, not {world_size}.")
    start = restored or (Path(spec.resume) if spec.resume else None)
    resumed = state.batches_of(start) if start else 0
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    session = TrainingSession(plan, rank=rank, device=device, resumed_batches=resumed)
    # Every rank, on the bare detector before DDP wraps it, before the chief's MLflow run.
    run_sanity_pass(session)
    if world_size > 1:
        session.model = DistributedDataParallel(
            session.detector, device_ids=[device.index] if cuda else None
        )
    if start:
        state.load_state(start, session, rank)
    total = min(spec.max_batches or session.schedule.max_batches, session.schedule.max_batches)
    outputs = chief_outputs(spec, session, total) if rank == 0 else None
    try:
        if outputs is not None:
            outputs.started(resume_run_id(start))
        train(spec, session, rank, world_size, total, report, outputs)
    finally:
        if outputs is not None:
            outputs.ended(run_status(session.batches_trained >= total))
            close_tensorboard(outputs)


def train(
    spec: WorkerSpec,
    session: TrainingSession,
    rank: int,
    world_size: int,
    total: int,
    report: Report,
    outputs: RunOutputs | None,
) -> None:
    """The plain loop over the core: train steps, reports, validations and checkpoints."""
    steps = TorchSteps(session)
    collectives = TorchCollectives(world_size)
    validation = ValidationPass(session)
    period = session.schedule.validation_period
    window: list[dict[str, Any]] = []
    loader = train_loader(session, rank=rank)
    while session.batches_trained < total:
        for batch in loader:
            if spec.batch_hook is not None:
                spec.batch_hook(session.batches_trained, rank)
            window.append(train_step(session, batch, steps))
            batches = session.batches_trained
            due = batches % period == 0 or batches == total
            if batches % spec.report_every == 0 or due:
                records = collectives.gather_to_chief(window)
                window = []
                if outputs is not None and records is not None:
                    outputs.training(average([r for share in records for r in share]))
            if due:
                val_batches = val_loader(session, failure_keeping_loader(DataLoader), rank=rank)
                after = outputs.validation if outputs is not None else None
                metrics = validate(validation, val_batches, collectives, before_end=after)
                state.checkpoint(session, rank, metrics, report, outputs, spec.experiment)
                if VALIDATION_FAILURE in metrics:
                    return  # the driver says what failed and where the weights are
            if batches >= total:
                break


def average(records: list[dict[str, Any]]) -> dict[str, float]:
    """Each metric's mean over the batches of all ranks, as Determined reports them."""
    keys = sorted({key for record in records for key in record})
    return {
        key: sum(values) / len(values)
        for key in keys
        if (values := [r[key] for r in records if r.get(key) is not None])
    }
