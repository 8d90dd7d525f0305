"""The PyTorchTrial: Determined's way of driving the engine-free training session.

The training step and the validation pass are the core's (`utils/training/loop.py`), on the
session of `utils/training/session.py`; what is left here is Determined's: wrapping the model,
optimizer, scaler and LR schedule so that its Trainer steps, syncs and checkpoints them, its
data loaders, its optimizer steps and reducer (`on_determined/steps.py`), and the callbacks
(`on_determined/callbacks.py`).

A validation that fails (an image that does not load, a prediction, the evaluation) does not
raise where it fails: a rank raising alone would leave the others waiting in Determined's
collectives. Each rank keeps its failures, the chief reports them as the validation's
`VALIDATION_FAILURE`, and the last callback ends the run on every rank once Determined has
checkpointed the trained weights (`callbacks.SessionState`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import determined as det
from determined import pytorch

from on_determined.callbacks import build_callbacks
from on_determined.steps import DeterminedSteps, EvaluatorReducer
from utils.base.files import allow_numpy_globals
from utils.evaluation.validation import failure_keeping_loader
from utils.training.loaders import train_loader, val_loader
from utils.training.loop import ValidationPass, train_step
from utils.training.plan import RunPlan, plan_run
from utils.training.sanity import run_sanity_pass
from utils.training.session import TrainingSession


def plan_trial(context: pytorch.PyTorchTrialContext) -> RunPlan:
    """The run plan of the trial's hyperparameters, data section, slots and searcher, from
    Determined's context: on a cluster (a local run plans before the context exists and hands
    its plan to the trial)."""
    searcher = context.get_experiment_config().get("searcher") or {}
    plan = plan_run(
        context.get_hparams(),
        context.get_data_config(),
        world_size=context.distributed.get_size(),
        searcher=searcher,
        # The cluster's searcher reads `searcher.metric` from every validation: a name the run
        # never reports would fail the trial at its first validation, a validation period later.
        refuse_searcher=True,
    )
    return plan


def trial_seed(context: pytorch.PyTorchTrialContext) -> int:
    """Determined's trial seed, or 0 in a local run (the config's `randomness.seed` wins over
    both: the session applies it)."""
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
        plan: RunPlan | None = None,
    ) -> None:
        allow_numpy_globals()  # Determined restores its checkpoints with torch.load
        self.context = context
        # `plan`: a local run's, made once before Determined's context (it needed the plan's
        # accumulation); on a cluster Determined builds the trial, which plans from its context.
        seed = trial_seed(context)
        plan = plan if plan is not None else plan_trial(context)
        self.session = session = TrainingSession(
            plan,
            seed=seed,
            rank=context.distributed.rank,
            device=context.device,
            resumed_batches=resumed_batches,
        )
        # Before Determined wraps or restores anything: a broken pipeline or model stops the run
        # here, in one line; None when switched off, else its seconds (the benchmarks read them).
        self.sanity_seconds = run_sanity_pass(session)
        # Determined requires the scaler before the model; its wrapper is what runs forward.
        if session.scaler is not None:
            context.wrap_scaler(session.scaler)
        session.model = context.wrap_model(session.detector)
        self.optimizer = context.wrap_optimizer(session.optimizer)
        # The session steps the schedule (after_step); Determined checkpoints it.
        context.wrap_lr_scheduler(
            session.lr_schedulers, step_mode=pytorch.LRScheduler.StepMode.MANUAL_STEP
        )
        self.steps = DeterminedSteps(context, self.optimizer, session.scaler)
        self.validation = ValidationPass(session)
        context.wrap_reducer(
            EvaluatorReducer(self.validation, chief=context.distributed.rank == 0),
            for_training=False,
        )
        schedule_length = session.schedule.max_batches
        self.max_batches = (
            schedule_length if max_batches is None else min(max_batches, schedule_length)
        )
        self.report_to = report_to

    def build_training_data_loader(self) -> pytorch.DataLoader:
        # Determined deals each global batch's slices to the ranks round-robin.
        return train_loader(self.session, pytorch.DataLoader, rank=None)

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        return val_loader(self.session, failure_keeping_loader(pytorch.DataLoader), rank=None)

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        return train_step(self.session, batch, self.steps)

    def evaluate_batch(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        self.validation.add(batch)
        return {}

    def build_callbacks(self) -> dict[str, pytorch.PyTorchCallback]:
        return build_callbacks(
            self.session, self.validation, self.context, self.report_to, self.max_batches
        )
