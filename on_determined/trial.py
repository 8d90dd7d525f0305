"""The PyTorchTrial: Determined's way of driving the engine-free training session.

Every step hands over to `utils.training.session.TrainingSession`; what is left here is
Determined's:
wrapping the model, optimizer, scaler and LR schedule so that its Trainer steps, syncs and
checkpoints them, its data loaders, and the callbacks (`on_determined/callbacks.py`).

A validation that fails (an image that does not load, a prediction, the evaluation) does not
raise where it fails: a rank raising alone would leave the others waiting in Determined's
collectives. Each rank keeps its failures, the chief reports them as the validation's
`VALIDATION_FAILURE`, and the last callback ends the run on every rank once Determined has
checkpointed the trained weights (`callbacks.SessionState`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import determined as det
from determined import pytorch

from on_determined.callbacks import build_callbacks
from utils.base.files import allow_numpy_globals
from utils.evaluation.evaluator import CocoEvaluator
from utils.evaluation.validation import RankValidation, combine, failure_keeping_loader
from utils.training.plan import RunPlan, config_seed, plan_run
from utils.training.session import TrainingSession


class EvaluatorReducer(pytorch.MetricReducer):
    """Gathers every rank's COCO entries and evaluates them once, on the chief; a failure on
    any rank becomes the chief's VALIDATION_FAILURE (see the module's docstring)."""

    def __init__(self, evaluator: CocoEvaluator, chief: bool) -> None:
        self.rank = RankValidation(evaluator)
        self.chief = chief

    def reset(self) -> None:
        self.rank.reset()

    def update(self, batch: Any, predict: Callable[[Any], list[Any]]) -> None:
        self.rank.update(batch, predict)

    def per_slot_reduce(self) -> bytes:
        # Determined's allgather sends every rank's share to every rank. As one pickled blob,
        # the other ranks get bytes they never decode instead of building every rank's entries
        # (at COCO val size, hundreds of thousands of objects per rank, on shared cores).
        return pickle.dumps(self.rank.share(), protocol=pickle.HIGHEST_PROTOCOL)

    def cross_slot_reduce(self, per_slot_metrics: list[bytes]) -> dict[str, Any]:
        # The chief's metrics are broadcast to the others before the callbacks see them
        # (Determined does when a callback reads them: ours do).
        if not self.chief:
            return {}
        return combine(self.rank.evaluator, [pickle.loads(share) for share in per_slot_metrics])


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
        return self.session.val_loader(failure_keeping_loader(pytorch.DataLoader), rank=None)

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
