"""What every Ray worker runs: the engine-free training session, step by step, as Determined's
Trainer drives it (`on_determined/trial.py`), so both engines give the same losses and weights.

Per batch: the session's loss, backward (gradients all-reduced by DDP, held back with `no_sync`
while accumulating), Determined's averaging of accumulated gradients, clipping, the optimizer
step and the session's after-step. Per validation period: every rank predicts its share, the
chief computes the COCO metrics once, then a checkpoint goes to Ray with the metrics.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from on_ray import state
from on_ray.chief import ChiefLog
from on_ray.spec import WorkerSpec
from utils.base.files import allow_numpy_globals
from utils.evaluation.validation import (
    VALIDATION_FAILURE,
    RankValidation,
    combine,
    failure_keeping_loader,
)
from utils.training.plan import config_seed, plan_run
from utils.training.session import TrainingSession

# report(metrics, checkpoint folder or None): Ray's train or tune report, called on every rank.
Report = Callable[[dict[str, Any], "Path | None"], None]


def run_worker(
    spec: WorkerSpec, rank: int, world_size: int, restored: Path | None, report: Report
) -> None:
    """Train this rank's share of the run; `restored`: the checkpoint Ray restarts from."""
    allow_numpy_globals()
    if spec.cwd and Path(spec.cwd).is_dir():
        os.chdir(spec.cwd)
    exp = spec.experiment
    plan = plan_run(
        spec.hparams, exp.get("data") or {}, world_size=world_size, searcher=exp.get("searcher")
    )
    start = restored or (Path(spec.resume) if spec.resume else None)
    resumed = state.batches_of(start) if start else 0
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    session = TrainingSession(
        plan, seed=config_seed(plan.cfg) or 0, rank=rank, device=device, resumed_batches=resumed
    )
    if world_size > 1:
        session.model = DistributedDataParallel(
            session.detector, device_ids=[device.index] if cuda else None
        )
    if start:
        state.load_state(start, session, rank)
    schedule = session.schedule
    total = min(spec.max_batches or schedule.max_batches, schedule.max_batches)
    chief = ChiefLog(spec, session, total, start) if rank == 0 else None
    validation = RankValidation(session.evaluator)
    window: list[dict[str, Any]] = []
    loader = session.train_loader(rank=rank)
    index = resumed
    try:
        while index < total:
            for batch in loader:
                if spec.batch_hook is not None:
                    spec.batch_hook(index, rank)
                window.append(train_step(session, batch, index))
                index += 1
                due = index % schedule.validation_period == 0 or index == total
                if index % spec.report_every == 0 or due:
                    averaged = average(gather(window, world_size))
                    window = []
                    if chief:
                        chief.training(index, averaged)
                if due:
                    metrics = validate(session, validation, rank, world_size, chief)
                    checkpoint(session, rank, metrics, report, chief)
                    if VALIDATION_FAILURE in metrics:
                        return  # the driver says what failed and where the weights are
                if index >= total:
                    break
    finally:
        if chief:
            chief.close(finished=index >= total)


def train_step(session: TrainingSession, batch: Any, index: int) -> dict[str, Any]:
    """One batch as Determined's `context.backward` and `step_optimizer` run it."""
    loss, metrics = session.training_loss(batch, index)
    steps = session.steps_optimizer(index)
    accumulation = session.schedule.accumulation
    ddp = isinstance(session.model, DistributedDataParallel)
    with session.model.no_sync() if ddp and not steps else contextlib.nullcontext():
        loss.backward()
    if steps:
        params = [p for group in session.optimizer.param_groups for p in group["params"]]
        if accumulation > 1:  # Determined averages the accumulated gradients
            for param in params:
                if param.grad is not None:
                    param.grad.div_(float(accumulation))
        norm = session.clip(params)
        if norm is not None and accumulation == 1:
            metrics["grad_norm"] = norm
        if session.scaler is not None:
            session.scaler.step(session.optimizer)
        else:
            session.optimizer.step()
        session.optimizer.zero_grad()
    session.after_step(index, metrics)
    return metrics


def gather(items: list[Any], world_size: int) -> list[Any]:
    """Every rank's items, on every rank, in rank order."""
    if world_size == 1:
        return list(items)
    shares: list[Any] = [None] * world_size
    dist.all_gather_object(shares, items)
    return [item for share in shares for item in share]


def average(records: list[dict[str, Any]]) -> dict[str, float]:
    """Each metric's mean over the batches of all ranks, as Determined reports them."""
    keys = sorted({key for record in records for key in record})
    return {
        key: sum(values) / len(values)
        for key in keys
        if (values := [r[key] for r in records if r.get(key) is not None])
    }


def validate(
    session: TrainingSession,
    validation: RankValidation,
    rank: int,
    world_size: int,
    chief: ChiefLog | None,
) -> dict[str, Any]:
    """Every rank predicts its share; the chief evaluates them all once; all get its metrics.
    A failure on any rank becomes the chief's VALIDATION_FAILURE
    (utils/evaluation/validation.py)."""
    session.before_validation()
    session.model.eval()
    validation.reset()
    loader = failure_keeping_loader(dealt_loader(rank, world_size))
    for batch in session.val_loader(loader, rank=None):
        validation.update(batch, session.predict)
    shares: list[Any] = [validation.share()]
    if world_size > 1:
        shares = [None] * world_size if rank == 0 else None
        dist.gather_object(validation.share(), shares, dst=0)
    result = [combine(session.evaluator, shares) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(result, src=0)
    metrics = result[0]
    if chief:  # drawn with the validated (averaged) weights, as Determined's callbacks do
        chief.validation(session.batches_trained, metrics)
    session.after_validation()
    session.model.train()
    return metrics


def dealt_loader(rank: int, world_size: int) -> Callable[..., DataLoader]:
    """Determined's validation shards: the loader's batches dealt to the ranks round-robin, so
    each image is predicted in the same batch (mmdet pads a batch to its largest image)."""

    def loader(dataset: Any, batch_size: int, shuffle: bool, **kwargs: Any) -> DataLoader:
        order = SequentialSampler(range(len(dataset)))
        batches = list(BatchSampler(order, batch_size, drop_last=False))
        return DataLoader(dataset, batch_sampler=batches[rank::world_size], **kwargs)

    return loader


def checkpoint(
    session: TrainingSession,
    rank: int,
    metrics: dict[str, Any],
    report: Report,
    chief: ChiefLog | None,
) -> None:
    """Write this rank's part of the checkpoint and hand it to Ray with the metrics."""
    with tempfile.TemporaryDirectory(prefix="mmdet-ray-") as folder:
        folder = Path(folder)
        state.write_rank_state(folder, rank, session.device)
        if chief:
            state.write_chief_state(folder, session)
            chief.checkpoint_written(folder)
        schedule = session.schedule
        reported = {
            **metrics,
            "batches": session.batches_trained,
            "epochs": session.batches_trained / schedule.epoch_length,
        }
        report(reported, folder)
