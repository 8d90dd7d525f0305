"""The loop's semantics, once for every engine: one training step and one validation pass.

An engine supplies only what is its own: the backward pass and optimizer step of the objects it
wraps (`OptimizerSteps`; `TorchSteps` is plain PyTorch, DDP or not) and, for a loop it does not
drive itself, its collectives (`Collectives`). Determined's Trainer drives its own loop and calls
`train_step` from `train_batch` and the `ValidationPass` steps from its callbacks and reducer; the
Ray worker and the tests' plain loop call `train_step` and `validate` directly:

    steps = TorchSteps(session)
    for batch in train_loader(session, rank=rank):
        metrics = train_step(session, batch, steps)
        if session.batches_trained % session.schedule.validation_period == 0:
            metrics = validate(ValidationPass(session), batches, collectives)
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils.base.errors import StageError
from utils.evaluation.validation import RankValidation, combine
from utils.training.diagnosis import explain_prediction
from utils.training.session import TrainingSession

# clip(params): clips the gradients of `params` before the optimizer steps.
Clip = Callable[[list[torch.nn.Parameter]], None]


class OptimizerSteps(Protocol):
    """What an engine owns of a training step."""

    def backward(self, loss: torch.Tensor, steps: bool) -> None:
        """Back-propagate `loss`; `steps`: whether the optimizer steps after this batch (a
        distributed engine syncs the gradients only then)."""

    def step(self, steps: bool, clip: Clip | None) -> None:
        """After every batch: when `steps`, the accumulated gradients averaged over the batches
        of the step, clipped by `clip`, the optimizer (and loss scaler) stepped, gradients
        zeroed."""


def train_step(session: TrainingSession, batch: Any, optimizer: OptimizerSteps) -> dict[str, Any]:
    """The session's next batch: loss, backward, optimizer step (every `accumulation` batches),
    after-step; returns the batch's metrics (loss terms, `lr`, `grad_norm` when clipping without
    accumulation: with accumulation, not every batch has a norm to report)."""
    index = session.batches_trained  # the one loop position: the batches trained so far
    loss, metrics = session.training_loss(batch, index)
    steps = session.steps_optimizer(index)
    optimizer.backward(loss, steps)

    def clip(params: list[torch.nn.Parameter]) -> None:
        norm = session.clip(params)
        if session.schedule.accumulation == 1:
            metrics["grad_norm"] = norm

    optimizer.step(steps, clip if session.clip_grad else None)
    session.after_step(index, metrics)
    return metrics


class TorchSteps:
    """The optimizer steps of plain PyTorch, with Determined's semantics (which Determined's own
    `context.backward` / `step_optimizer` implement for its trial): gradients held back from
    DDP's all-reduce while accumulating, the accumulated sum divided by the batches of the step,
    then clipping, the (scaled) step and zeroing."""

    def __init__(self, session: TrainingSession) -> None:
        self.session = session

    def backward(self, loss: torch.Tensor, steps: bool) -> None:
        model = self.session.model
        ddp = isinstance(model, DistributedDataParallel)
        with model.no_sync() if ddp and not steps else contextlib.nullcontext():
            loss.backward()

    def step(self, steps: bool, clip: Clip | None) -> None:
        if not steps:
            return
        session = self.session
        optimizer = session.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        accumulation = session.schedule.accumulation
        if accumulation > 1:
            for param in params:
                if param.grad is not None:
                    param.grad.div_(float(accumulation))
        if clip is not None:
            clip(params)
        if session.scaler is not None:
            session.scaler.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad()


class ValidationPass:
    """One validation, in the order every engine runs it: `start` on every rank, `add` each of
    the rank's batches, `share` what the chief gathers, `result` on the chief (the metrics, or
    VALIDATION_FAILURE: a rank's failure never leaves the others waiting), `end` on every rank."""

    def __init__(self, session: TrainingSession) -> None:
        self.session = session
        self.rank = RankValidation(session.evaluator)

    def start(self) -> None:
        """Norm sync and averaged weights in (mmengine's order), the model in eval mode."""
        self.session.before_validation()
        self.session.model.eval()
        self.rank.reset()

    def add(self, batch: Any) -> None:
        self.rank.update(batch, self.predict)

    def predict(self, batch: Any) -> list[Any]:
        """The session's predictions; mmdet's bare errors explained where the cause is known."""
        session = self.session
        try:
            return session.predict(batch)
        except Exception as err:
            known = explain_prediction(err, batch, session.detector, session.val_dataset)
            if known is None:
                raise
            raise StageError(known) from err

    def share(self) -> bytes:
        # One pickled blob: an engine that gathers to every rank moves bytes the other ranks never
        # decode (at COCO val size, hundreds of thousands of objects per rank, on shared cores).
        return pickle.dumps(self.rank.share(), protocol=pickle.HIGHEST_PROTOCOL)

    def result(self, shares: list[bytes]) -> dict[str, Any]:
        """On the chief: every rank's entries evaluated once."""
        return combine(self.session.evaluator, [pickle.loads(share) for share in shares])

    def end(self) -> None:
        """The trained weights back, the model in training mode."""
        self.session.after_validation()
        self.session.model.train()


class Collectives(Protocol):
    """What a loop the core drives needs of the engine's process group."""

    def gather_to_chief(self, item: Any) -> list[Any] | None:
        """Every rank's `item` in rank order on the chief, None elsewhere."""

    def broadcast_from_chief(self, item: Any) -> Any:
        """The chief's `item`, on every rank."""


def validate(
    validation: ValidationPass,
    batches: Iterable[Any],
    collectives: Collectives,
    before_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """A whole validation pass over this rank's `batches`; every rank gets the chief's metrics.
    `before_end(metrics)` runs while the validated (averaged) weights are still in place."""
    validation.start()
    for batch in batches:
        validation.add(batch)
    shares = collectives.gather_to_chief(validation.share())
    metrics = collectives.broadcast_from_chief(
        validation.result(shares) if shares is not None else None
    )
    if before_end is not None:
        before_end(metrics)
    validation.end()
    return metrics


class TorchCollectives:
    """`Collectives` over torch.distributed's default process group (gloo or NCCL), or none for
    a single process."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def gather_to_chief(self, item: Any) -> list[Any] | None:
        if self.world_size == 1:
            return [item]
        chief = dist.get_rank() == 0
        items: list[Any] | None = [None] * self.world_size if chief else None
        dist.gather_object(item, items, dst=0)
        return items

    def broadcast_from_chief(self, item: Any) -> Any:
        if self.world_size == 1:
            return item
        holder = [item]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
