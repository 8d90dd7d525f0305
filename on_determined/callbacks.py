"""The trial's callbacks: each takes the training session (and Determined's context where it
reports to Determined), and `build_callbacks` lists them in the order Determined calls them."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import determined as det
import numpy as np
from determined import pytorch

from on_determined.evaluation_plots import EvaluationPlots
from utils.base.errors import TrainingStopped
from utils.evaluation.drawings import (
    render_samples,
    sample_indices,
    save_pngs,
    visualization_settings,
)
from utils.evaluation.report import plot_settings
from utils.evaluation.validation import VALIDATION_FAILURE
from utils.training import export
from utils.training.progress import RunReport
from utils.training.session import TrainingSession
from utils.training.tracking import MlflowRun, mlflow_settings

logger = logging.getLogger(__name__)


class ValidationFailed(TrainingStopped):
    """A validation failed; the message says what, and which checkpoint has the trained weights."""


class CheckpointFirst(det.InvalidHP):
    """Raised on every rank as a failed validation ends: Determined's Trainer writes a checkpoint
    before an InvalidHP ends the trial, then SessionState raises ValidationFailed."""


def build_callbacks(
    session: TrainingSession,
    context: pytorch.PyTorchTrialContext,
    report_to: Path | None = None,
    max_batches: int | None = None,
) -> dict[str, pytorch.PyTorchCallback]:
    """The callbacks in order: Determined calls them in this (insertion) order at each event."""
    chief = context.distributed.rank == 0
    callbacks: dict[str, pytorch.PyTorchCallback] = {}
    # First, as validation starts: norm sync and the averaged weights into the model, so every
    # later callback (prediction images) sees the validated weights.
    callbacks["validation_start"] = ValidationStart(session)
    # The mmdet export, before MLflow logs the checkpoint's files.
    callbacks["export"] = MMDetExport(session, chief)
    # Drawn after each validation with the validated weights; saved with the next checkpoint.
    num_images, score_thr = visualization_settings(context.get_hparams())
    callbacks["predictions"] = PredictionImages(session, context, num_images, score_thr)
    # From the evaluation that has just run (no second pass); saved with the next checkpoint.
    plots_score_thr = plot_settings(context.get_hparams())
    if plots_score_thr is not None and chief:
        callbacks["evaluation_plots"] = EvaluationPlots(session, context, plots_score_thr)
    # After the export and the drawings, so a checkpoint's files exist when it logs them.
    tracking = mlflow_settings(context.get_experiment_config())
    if tracking is not None and chief:
        callbacks["mlflow"] = MlflowTracking(session, context, MlflowRun(tracking))
    if report_to is not None and chief:
        callbacks["local_report"] = LocalReport(report_to, max_batches or 0)
    # Last: the trained weights back once every other callback has seen the validated ones;
    # it also carries the session's state (EMA weights) in every checkpoint, and ends a run
    # whose validation failed once Determined has checkpointed it.
    callbacks["session"] = SessionState(session)
    return callbacks


class ValidationStart(pytorch.PyTorchCallback):
    def __init__(self, session: TrainingSession) -> None:
        self.session = session

    def on_validation_start(self) -> None:
        self.session.before_validation()


class SessionState(pytorch.PyTorchCallback):
    """The session's state in checkpoints, the trained weights back after each validation, and
    the end of a run whose validation failed, once a checkpoint holds its trained weights."""

    def __init__(self, session: TrainingSession) -> None:
        self.session = session
        self.failure: str | None = None
        # The latest checkpoint: (batches trained, uuid, folder written on this rank or None).
        self.checkpoint: tuple[int, str, str | None] | None = None
        self.written: str | None = None

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: str | None) -> None:
        # A resumed cluster trial continues its batch count; a local one counted it already.
        self.session.batches_trained = max(self.session.batches_trained, first_batch_idx)
        if checkpoint_uuid:
            self.checkpoint = (self.session.batches_trained, checkpoint_uuid, None)

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.session.after_validation()  # first, so that a checkpoint holds the trained weights
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


class MMDetExport(pytorch.PyTorchCallback):
    """Writes `<checkpoint>/mmdet/` (model.pth, config.py), which MMDetection's tools load."""

    def __init__(self, session: TrainingSession, chief: bool) -> None:
        self.session = session
        self.chief = chief

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        # Determined saves PyTorchTrial checkpoints (and calls this) on the chief only, into the
        # folder it then uploads: the rank check only guards against that changing.
        if not self.chief:
            return
        session = self.session
        export.write_export(
            Path(checkpoint_dir) / export.EXPORT_DIR,
            session.export_weights(),
            session.cfg,
            export.dataset_meta(session.val_dataset.metainfo),
            session.batches_trained,
        )


class PredictionImages(pytorch.PyTorchCallback):
    """After each validation the chief draws a fixed set of validation images with their
    predictions: into TensorBoard (`predictions/<image>`) and into the next checkpoint."""

    def __init__(
        self,
        session: TrainingSession,
        context: pytorch.PyTorchTrialContext,
        num_images: int,
        score_thr: float,
    ) -> None:
        self.session = session
        self.context = context
        self.indices = sample_indices(num_images, len(session.val_dataset))
        self.score_thr = score_thr
        self.drawings: dict[str, np.ndarray] = {}

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        context = self.context
        if context.distributed.rank != 0 or not self.indices:
            return
        self.drawings = {}
        if VALIDATION_FAILURE in metrics:
            return
        session = self.session
        try:
            self.drawings = render_samples(
                session.detector, session.val_dataset, self.indices, self.score_thr
            )
        except Exception:  # the chief's alone: raising would leave the other ranks waiting
            logger.warning("The prediction images were not drawn.", exc_info=True)
            return
        if context.get_enable_tensorboard_logging():
            writer = context.get_tensorboard_writer()
            for name, drawing in self.drawings.items():
                writer.add_image(
                    f"predictions/{name}", drawing, session.batches_trained, dataformats="HWC"
                )

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        if self.drawings:  # the last validation's, on the chief
            save_pngs(self.drawings, Path(checkpoint_dir) / "predictions")


class MlflowTracking(pytorch.PyTorchCallback):
    """Chief only: the trial as an MLflow run (utils/training/tracking.py)."""

    def __init__(
        self, session: TrainingSession, context: pytorch.PyTorchTrialContext, run: MlflowRun
    ) -> None:
        self.session = session
        self.context = context
        self.run = run
        self.resume_run_id: str | None = None  # from the checkpoint of a resumed trial

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_run_id = state_dict.get("run_id")

    def on_training_start(self) -> None:  # after a resumed trial's checkpoint is loaded
        context = self.context
        exp_conf = context.get_experiment_config()
        name = exp_conf.get("name") or "mmdet"
        tags = {"mmdet.config_file": str(context.get_hparams().get("config_file", ""))}
        info = det.get_cluster_info()
        if info is not None and info.task_type == "TRIAL":
            experiment_id, trial_id = info.trial.experiment_id, info.trial.trial_id
            name = f"{name} trial {trial_id}"
            tags |= {
                "determined.experiment_id": str(experiment_id),
                "determined.trial_id": str(trial_id),
                "determined.trial_url": f"{info.master_url.rstrip('/')}/det/experiments/"
                f"{experiment_id}/trials/{trial_id}",
            }
        description = exp_conf.get("description") or ""
        if self.run.start(name, description, tags, run_id=self.resume_run_id):
            data = {k: v for k, v in context.get_data_config().items() if k != "mlflow"}
            self.run.log_params({**context.get_hparams(), "data": data})
            self.run.log_text(self.session.cfg.pretty_text, "config.py")

    def on_training_workload_end(
        self, avg_metrics: dict[str, Any], batch_metrics: dict[str, Any]
    ) -> None:
        metrics = {k: v for k, v in avg_metrics.items() if k != "batches"}
        self.run.log_metrics(metrics, step=self.session.batches_trained)

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        if VALIDATION_FAILURE not in metrics:
            self.run.log_metrics(metrics, step=self.session.batches_trained)

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        self.run.log_checkpoint(checkpoint_dir, step=self.session.batches_trained)

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        self.run.set_tag("determined.checkpoint_uuid", uuid)

    def on_trial_shutdown(self) -> None:
        # Determined calls this in a `finally`: while an exception (e.g. the non-finite loss
        # guard's) unwinds the trainer, sys.exc_info() holds it.
        error = sys.exc_info()[1]
        session = self.session
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
        self.run.end(status)


class LocalReport(pytorch.PyTorchCallback):
    """Local runs: progress on the console and every reported step in `metrics.jsonl`."""

    def __init__(self, path: Path, total: int) -> None:
        self.report = RunReport(path, total)
        self.batches = 0

    def on_training_workload_end(
        self, avg_metrics: dict[str, Any], batch_metrics: dict[str, Any]
    ) -> None:
        # Determined adds the trial's batch count to training metrics; validations follow a
        # training workload, so they happen at the same count.
        self.batches = int(avg_metrics["batches"])
        self.report.training(self.batches, avg_metrics)

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        if VALIDATION_FAILURE not in metrics:
            self.report.validation(self.batches, metrics)
