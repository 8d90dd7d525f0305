"""The trial's callbacks: Determined's events forwarded to the core (`utils/training/loop.py`'s
validation pass, `utils/training/outputs.py`'s list of outputs); `build_callbacks` lists them in
the order Determined calls them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import determined as det
from determined import pytorch

from utils.base.errors import TrainingStopped
from utils.evaluation.validation import VALIDATION_FAILURE
from utils.training.loop import ValidationPass
from utils.training.outputs import OutputSettings, RunOutputs, output_settings
from utils.training.progress import RunReport
from utils.training.session import TrainingSession


class ValidationFailed(TrainingStopped):
    """A validation failed; the message says what, and which checkpoint has the trained weights."""


class CheckpointFirst(det.InvalidHP):
    """Raised on every rank as a failed validation ends: Determined's Trainer writes a checkpoint
    before an InvalidHP ends the trial, then SessionState raises ValidationFailed."""


def build_callbacks(
    session: TrainingSession,
    validation: ValidationPass,
    context: pytorch.PyTorchTrialContext,
    report_to: Path | None = None,
    max_batches: int | None = None,
) -> dict[str, pytorch.PyTorchCallback]:
    """The callbacks in order: Determined calls them in this (insertion) order at each event."""
    callbacks: dict[str, pytorch.PyTorchCallback] = {}
    # First, as validation starts: norm sync and the averaged weights into the model, so that the
    # outputs (prediction drawings) see the validated weights.
    callbacks["validation_start"] = ValidationStart(validation)
    # The chief's outputs, in the core's order (drawings, evaluation plots, metrics, MLflow, the
    # export into each checkpoint).
    if context.distributed.rank == 0:
        outputs = RunOutputs(session, determined_outputs(context, report_to, max_batches))
        callbacks["outputs"] = Outputs(outputs, context)
    # Last: the trained weights back once the outputs have seen the validated ones; it also
    # carries the session's state (loop position, EMA weights) in every checkpoint, and ends a
    # run whose validation failed once Determined has checkpointed it.
    callbacks["session"] = SessionState(session, validation)
    return callbacks


def determined_outputs(
    context: pytorch.PyTorchTrialContext, report_to: Path | None, max_batches: int | None
) -> OutputSettings:
    """Where the chief's outputs go on Determined: its TensorBoard writer (it writes the
    scalars itself), the trial's MLflow run named after the trial, a local run's metrics.jsonl."""
    exp_conf = context.get_experiment_config()
    name = exp_conf.get("name") or "mmdet"
    tags: dict[str, str] = {}
    info = det.get_cluster_info()
    if info is not None and info.task_type == "TRIAL":
        experiment_id, trial_id = info.trial.experiment_id, info.trial.trial_id
        name = f"{name} trial {trial_id}"
        tags = {
            "determined.experiment_id": str(experiment_id),
            "determined.trial_id": str(trial_id),
            "determined.trial_url": f"{info.master_url.rstrip('/')}/det/experiments/"
            f"{experiment_id}/trials/{trial_id}",
        }
    return output_settings(
        context.get_hparams(),
        {**exp_conf, "data": context.get_data_config()},
        run_name=name,
        tags=tags,
        progress=RunReport(report_to, max_batches or 0) if report_to is not None else None,
        tensorboard=(
            context.get_tensorboard_writer() if context.get_enable_tensorboard_logging() else None
        ),
    )


class ValidationStart(pytorch.PyTorchCallback):
    def __init__(self, validation: ValidationPass) -> None:
        self.validation = validation

    def on_validation_start(self) -> None:
        self.validation.start()


class Outputs(pytorch.PyTorchCallback):
    """Chief only: Determined's events as the core's output moments."""

    def __init__(self, outputs: RunOutputs, context: pytorch.PyTorchTrialContext) -> None:
        self.outputs = outputs
        self.context = context
        self.resume_run_id: str | None = None  # from the checkpoint of a resumed trial

    def state_dict(self) -> dict[str, Any]:
        mlflow = self.outputs.mlflow
        return {"run_id": mlflow.run_id if mlflow is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_run_id = state_dict.get("run_id")

    def on_training_start(self) -> None:  # after a resumed trial's checkpoint is loaded
        self.outputs.started(self.resume_run_id)

    def on_training_workload_end(
        self, avg_metrics: dict[str, Any], batch_metrics: dict[str, Any]
    ) -> None:
        self.outputs.training({k: v for k, v in avg_metrics.items() if k != "batches"})

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.outputs.validation(metrics)

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        # Determined saves PyTorchTrial checkpoints (and calls this) on the chief only, into the
        # folder it then uploads.
        self.outputs.checkpoint(Path(checkpoint_dir))

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        if self.outputs.mlflow is not None:
            self.outputs.mlflow.set_tag("determined.checkpoint_uuid", uuid)

    def on_trial_shutdown(self) -> None:
        # Determined calls this in a `finally`: while an exception (e.g. the non-finite loss
        # guard's) unwinds the trainer, sys.exc_info() holds it.
        error = sys.exc_info()[1]
        session = self.outputs.session
        if isinstance(error, KeyboardInterrupt):
            status = "KILLED"
        elif error is not None:
            status = "FAILED"
        elif (
            det.get_cluster_info() is not None
            and session.batches_trained < session.schedule.max_batches
        ):
            status = "KILLED"  # paused, preempted or stopped early; a resumed trial reopens it
        else:
            status = "FINISHED"
        self.outputs.ended(status)


class SessionState(pytorch.PyTorchCallback):
    """The session's state in checkpoints, the end of each validation pass (trained weights
    back), and the end of a run whose validation failed, once a checkpoint holds its weights."""

    def __init__(self, session: TrainingSession, validation: ValidationPass) -> None:
        self.session = session
        self.validation = validation
        self.failure: str | None = None
        # The latest checkpoint: (batches trained, uuid, folder written on this rank or None).
        self.checkpoint: tuple[int, str, str | None] | None = None
        self.written: str | None = None

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: str | None) -> None:
        if checkpoint_uuid:
            self.checkpoint = (self.session.batches_trained, checkpoint_uuid, None)

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.validation.end()  # first, so that a checkpoint holds the trained weights
        problem = metrics.get(VALIDATION_FAILURE)
        if problem is None:
            return
        batches = self.session.batches_trained
        self.failure = f"The validation after {batches} batches failed: {problem}"
        if self.checkpoint is not None and self.checkpoint[0] == batches:  # a restarted trial's
            raise ValidationFailed(self.failure_message())
        raise CheckpointFirst(self.failure)  # on every rank: the metrics are the chief's

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        self.written = checkpoint_dir  # the chief's; locally the checkpoint folder itself

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        self.checkpoint = (self.session.batches_trained, uuid, self.written)
        self.written = None
        if self.failure is not None:
            # Not the InvalidHP: a trial that ends with one counts as done (exit 0), not failed.
            raise ValidationFailed(self.failure_message()) from None

    def failure_message(self) -> str:
        assert self.checkpoint is not None
        _, uuid, folder = self.checkpoint
        where = folder if folder and det.get_cluster_info() is None else uuid
        return (
            f"{self.failure} The trained weights are in checkpoint {where}: fix the cause, then "
            "resume from it."
        )

    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)
