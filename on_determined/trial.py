"""The PyTorchTrial: Determined's way of driving the engine-free training session.

Every step hands over to `utils.session.TrainingSession`; what is left here is Determined's:
wrapping the model, optimizer, scaler and LR schedule so that its Trainer steps, syncs and
checkpoints them, its data loaders, and the callbacks (`on_determined/callbacks.py`).

A validation that fails (an image that does not load, a prediction, the evaluation) does not
raise where it fails: a rank raising alone would leave the others waiting in Determined's
collectives. Each rank keeps its failures, the chief reports them as the validation's
`VALIDATION_FAILURE`, and the last callback ends the run on every rank once Determined has
checkpointed the trained weights (`callbacks.SessionState`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import determined as det
import torch
from determined import pytorch

from on_determined.callbacks import VALIDATION_FAILURE, build_callbacks
from utils.errors import USER_ERRORS
from utils.evaluation import CocoEvaluator
from utils.files import allow_numpy_globals
from utils.plan import RunPlan, config_seed, plan_run
from utils.session import TrainingSession

logger = logging.getLogger(__name__)
# A validation batch's key for its samples that did not load (LoadFailure).
LOAD_FAILURES = "load_failures"


def describe(err: Exception) -> str:
    """A failure in one line: a user error's own message (it names the file and what to do),
    else its type and message; the traceback of an unexpected error goes to the log."""
    if isinstance(err, USER_ERRORS):
        return str(err)
    logger.error("Validation failed", exc_info=err)
    return f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class LoadFailure:
    """In place of a validation sample that did not load (picklable, for loader workers)."""

    message: str

    def to(self, device: Any) -> LoadFailure:
        return self  # what Determined calls to move a batch's items to the device


class KeepLoadFailures(torch.utils.data.Dataset):
    """The validation dataset, with a LoadFailure for each sample that fails to load."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as err:
            return LoadFailure(describe(err))


class CollateLoaded:
    """A validation batch of the samples that loaded, with the others under LOAD_FAILURES."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list[Any]) -> Any:
        loaded = [sample for sample in samples if not isinstance(sample, LoadFailure)]
        batch = self.collate(loaded) if loaded else {"inputs": [], "data_samples": []}
        failures = [sample for sample in samples if isinstance(sample, LoadFailure)]
        if failures:
            batch[LOAD_FAILURES] = failures
        return batch


class EvaluatorReducer(pytorch.MetricReducer):
    """Gathers every rank's COCO entries and evaluates them once, on the chief; a failure on
    any rank becomes the chief's VALIDATION_FAILURE (see the module's docstring)."""

    def __init__(self, evaluator: CocoEvaluator, chief: bool) -> None:
        self.evaluator = evaluator
        self.chief = chief
        self.failures: list[str] = []

    def reset(self) -> None:
        self.evaluator.reset()
        self.failures = []

    def update(self, batch: Any, predict: Callable[[Any], list[Any]]) -> None:
        """Predict a validation batch and add its entries; once this rank has a failure, the
        rest of its batches are not predicted."""
        self.failures += [failure.message for failure in batch.get(LOAD_FAILURES, [])]
        if self.failures:
            return
        try:
            self.evaluator.update(predict(batch))
        except Exception as err:
            self.failures.append(describe(err))

    def per_slot_reduce(self) -> Any:
        return self.evaluator.entries, self.failures

    def cross_slot_reduce(self, per_slot_metrics: list[Any]) -> dict[str, Any]:
        # Every rank gets every rank's entries; the chief's metrics are broadcast to the others
        # before the callbacks see them (Determined does when a callback reads them: ours do).
        if not self.chief:
            return {}
        failures = [failure for _, rank_failures in per_slot_metrics for failure in rank_failures]
        if not failures:
            try:
                return self.evaluator.compute([entries for entries, _ in per_slot_metrics])
            except Exception as err:
                failures = [describe(err)]
        first = f"{len(failures)} failures, the first: " if len(failures) > 1 else ""
        return {VALIDATION_FAILURE: first + failures[0]}


def plan_trial(context: pytorch.PyTorchTrialContext) -> RunPlan:
    """The run plan of the trial's hyperparameters, data section, slots and searcher."""
    return plan_run(
        context.get_hparams(),
        context.get_data_config(),
        world_size=context.distributed.get_size(),
        searcher=context.get_experiment_config().get("searcher") or {},
    )


def trial_seed(plan: RunPlan, context: pytorch.PyTorchTrialContext) -> int:
    """The config's `randomness.seed`, else Determined's trial seed, else 0 (local runs)."""
    seed = config_seed(plan.cfg)
    if seed is not None:
        return seed
    try:
        return context.get_trial_seed()
    except det.errors.InternalException:
        return 0


class MMDetTrial(pytorch.PyTorchTrial):
    """Any MMDetection 3.x detector config, trained and evaluated by Determined.

    Args:
        context: Determined's trial context.
        resumed_batches: batches already trained by a local checkpoint being resumed (Determined's
            local mode restarts the data, so the session skips them).
        max_batches: a local run's cap on the training length.
        report_to: a local run's `metrics.jsonl` (console progress and every reported step).
    """

    def __init__(
        self,
        context: pytorch.PyTorchTrialContext,
        resumed_batches: int = 0,
        max_batches: int | None = None,
        report_to: Path | None = None,
    ) -> None:
        allow_numpy_globals()  # Determined restores its checkpoints with torch.load
        self.context = context
        plan = plan_trial(context)
        self.session = session = TrainingSession(
            plan,
            seed=trial_seed(plan, context),
            rank=context.distributed.rank,
            device=context.device,
            resumed_batches=resumed_batches,
        )
        # Determined requires the scaler before the model; its wrapper is what runs forward.
        if session.scaler is not None:
            context.wrap_scaler(session.scaler)
        session.model = context.wrap_model(session.detector)
        self.optimizer = context.wrap_optimizer(session.optimizer)
        # The session steps the schedule (after_step); Determined checkpoints it.
        context.wrap_lr_scheduler(
            session.lr_schedulers, step_mode=pytorch.LRScheduler.StepMode.MANUAL_STEP
        )
        self.reducer = context.wrap_reducer(
            EvaluatorReducer(session.evaluator, chief=context.distributed.rank == 0),
            for_training=False,
        )
        schedule_length = session.schedule.max_batches
        self.max_batches = (
            schedule_length if max_batches is None else min(max_batches, schedule_length)
        )
        self.report_to = report_to

    def build_training_data_loader(self) -> pytorch.DataLoader:
        # Determined deals each global batch's slices to the ranks round-robin.
        return self.session.train_loader(pytorch.DataLoader, rank=None)

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        def loader(dataset: Any, collate_fn: Callable[[list[Any]], Any], **kwargs: Any) -> Any:
            return pytorch.DataLoader(
                KeepLoadFailures(dataset), collate_fn=CollateLoaded(collate_fn), **kwargs
            )

        return self.session.val_loader(loader, rank=None)

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        session = self.session
        # Locally resumed runs count batches from 0 again; on a cluster batch_idx continues.
        index = batch_idx + session.resumed_batches
        loss, metrics = session.training_loss(batch, index)
        self.context.backward(loss)

        def clip(params: Any) -> None:
            norm = session.clip(params)
            if session.schedule.accumulation == 1:  # else not every batch has one to report
                metrics["grad_norm"] = norm

        self.context.step_optimizer(
            self.optimizer,
            clip_grads=clip if session.clip_grad else None,
            scaler=session.scaler,
        )
        session.after_step(index, metrics)
        return metrics

    def evaluate_batch(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        self.reducer.update(batch, self.session.predict)
        return {}

    def build_callbacks(self) -> dict[str, pytorch.PyTorchCallback]:
        return build_callbacks(self.session, self.context, self.report_to, self.max_batches)
