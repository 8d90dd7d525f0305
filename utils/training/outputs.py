"""What follows a run's reports, validations and checkpoints on the chief, once for every engine.

`RunOutputs` is the one ordered list; an engine calls its four moments and supplies only where
things go (its TensorBoard writer, whether it writes scalars itself, the MLflow run's name and
tags, the checkpoint folder):

    started(resume_run_id)      MLflow: a new run (params, config) or the resumed trial's
    training(metrics)           metrics.jsonl and the progress line, TensorBoard, MLflow
    validation(metrics)         with the validated (averaged) weights still in the model:
                                  1. prediction drawings of fixed validation images
                                  2. the evaluation report and plots, from the evaluation that
                                     has just run (no second pass)
                                  3. metrics.jsonl, TensorBoard, MLflow
    checkpoint(folder)          1. the mmdet export, 2. the report and plots, 3. the drawings:
                                then 4. MLflow logs the folder, whose files now all exist
    ended(status)               MLflow: the last export uploaded, the run ended

Drawings and plots are the chief's alone: a failure there is logged, never raised, since
raising would leave the other ranks waiting in the engine's collectives.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from utils.evaluation.drawings import (
    render_samples,
    sample_indices,
    save_pngs,
    visualization_settings,
)
from utils.evaluation.plots import draw_report
from utils.evaluation.report import (
    REPORT_DIR,
    evaluation_report,
    plot_settings,
    report_lines,
    save_report,
)
from utils.evaluation.validation import VALIDATION_FAILURE
from utils.training import export
from utils.training.progress import RunReport
from utils.training.session import TrainingSession
from utils.training.tracking import MlflowRun
from utils.training.tracking_settings import mlflow_settings

logger = logging.getLogger(__name__)


class ImageWriter(Protocol):
    """A TensorBoard writer (torch's SummaryWriter, or the one Determined gives a trial)."""

    def add_image(self, tag: str, image: Any, step: int, dataformats: str) -> None: ...

    def add_scalar(self, tag: str, value: float, step: int) -> None: ...


@dataclass
class OutputSettings:
    """What the run's hyperparameters and the engine ask of the outputs.

    Attributes:
        num_images, score_thr: the prediction drawings (hyperparameter `visualization`).
        plots_score_thr: the confusion matrix's threshold, or None for no evaluation plots
            (hyperparameter `evaluation_plots`).
        progress: `metrics.jsonl` with the console's progress line (local runs), or None.
        tensorboard: where drawings (and scalars, see `scalars`) go, or None.
        scalars: whether to write the metrics to `tensorboard` (Determined does it itself).
        mlflow: the MLflow run, or None.
        run_name, description, tags: the MLflow run's, as the engine names it.
        params: what MLflow logs as the run's params (hyperparameters and data section).
    """

    num_images: int
    score_thr: float
    plots_score_thr: float | None
    progress: RunReport | None = None
    tensorboard: ImageWriter | None = None
    scalars: bool = False
    mlflow: MlflowRun | None = None
    run_name: str = "mmdet"
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def output_settings(
    hparams: dict[str, Any],
    exp_conf: dict[str, Any],
    *,
    run_name: str,
    tags: dict[str, str],
    **engine: Any,
) -> OutputSettings:
    """What the hyperparameters (`visualization`, `evaluation_plots`) and the experiment (its
    description, `data.mlflow`) ask of the outputs; the engine names the MLflow run, adds its
    tags, and says where the rest goes (`progress`, `tensorboard`, `scalars`)."""
    num_images, score_thr = visualization_settings(hparams)
    tracking = mlflow_settings(exp_conf)
    data = {k: v for k, v in (exp_conf.get("data") or {}).items() if k != "mlflow"}
    return OutputSettings(
        num_images=num_images,
        score_thr=score_thr,
        plots_score_thr=plot_settings(hparams),
        mlflow=MlflowRun(tracking) if tracking is not None else None,
        run_name=run_name,
        description=exp_conf.get("description") or "",
        tags={"mmdet.config_file": str(hparams.get("config_file", "")), **tags},
        params={**hparams, "data": data},
        **engine,
    )


class RunOutputs:
    """The chief's outputs of one run (see the module's docstring for the order)."""

    def __init__(self, session: TrainingSession, settings: OutputSettings) -> None:
        self.session = session
        self.settings = settings
        self.indices = sample_indices(settings.num_images, len(session.val_dataset))
        # The last validation's, saved with the next checkpoint.
        self.drawings: dict[str, np.ndarray] = {}
        self.report: dict[str, Any] | None = None
        self.plots: dict[str, np.ndarray] = {}

    @property
    def mlflow(self) -> MlflowRun | None:
        return self.settings.mlflow

    def started(self, resume_run_id: str | None = None) -> None:
        """As training starts (after a resumed run's state is loaded)."""
        settings = self.settings
        if self.mlflow is None:
            return
        if self.mlflow.start(
            settings.run_name, settings.description, settings.tags, run_id=resume_run_id
        ):
            self.mlflow.log_params(settings.params)
            self.mlflow.log_text(self.session.cfg.pretty_text, "config.py")

    def training(self, metrics: dict[str, Any]) -> None:
        """The metrics averaged over the batches since the last report, at the loop position."""
        batches = self.session.batches_trained
        if self.settings.progress is not None:
            self.settings.progress.training(batches, metrics)
        self._log("training", metrics, batches)

    def validation(self, metrics: dict[str, Any]) -> None:
        """After the chief computed the metrics, with the validated weights still in place."""
        self.drawings, self.report, self.plots = {}, None, {}
        if VALIDATION_FAILURE in metrics:
            return
        batches = self.session.batches_trained
        self._draw_predictions(batches)
        self._draw_evaluation(batches)
        if self.settings.progress is not None:
            self.settings.progress.validation(batches, metrics)
        self._log("validation", metrics, batches)

    def checkpoint(self, folder: Path) -> None:
        """A checkpoint folder written on the chief, before the engine uploads it."""
        session = self.session
        weights = session.export_weights()
        meta = export.dataset_meta(session.val_dataset.metainfo)
        export.write_export(
            folder / export.EXPORT_DIR, weights, session.cfg, meta, session.batches_trained
        )
        if self.report is not None:
            save_report(self.report, self.plots, folder / REPORT_DIR)
        if self.drawings:
            save_pngs(self.drawings, folder / "predictions")
        if self.mlflow is not None:  # it also names the run in the checkpoint (RUN_FILE)
            self.mlflow.log_checkpoint(folder, step=session.batches_trained)

    def ended(self, status: str) -> None:
        """`status`: FINISHED, FAILED or KILLED (paused, preempted, interrupted)."""
        if self.mlflow is not None:
            self.mlflow.end(status)

    def _log(self, kind: str, metrics: dict[str, Any], batches: int) -> None:
        writer = self.settings.tensorboard
        if writer is not None and self.settings.scalars:
            for name, value in metrics.items():
                writer.add_scalar(f"{kind}/{name}", value, batches)
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=batches)

    def _images(self, prefix: str, drawings: dict[str, np.ndarray], batches: int) -> None:
        writer = self.settings.tensorboard
        if writer is not None:
            for name, drawing in drawings.items():
                writer.add_image(f"{prefix}/{name}", drawing, batches, dataformats="HWC")

    def _draw_predictions(self, batches: int) -> None:
        if not self.indices:
            return
        session = self.session
        try:
            self.drawings = render_samples(
                session.detector, session.val_dataset, self.indices, self.settings.score_thr
            )
        except Exception:  # the chief's alone (see the module's docstring)
            logger.warning("The prediction images were not drawn.", exc_info=True)
            return
        self._images("predictions", self.drawings, batches)

    def _draw_evaluation(self, batches: int) -> None:
        metric = self.session.evaluator.coco_metric()
        if self.settings.plots_score_thr is None or metric is None:
            return
        start = time.monotonic()
        try:
            report = evaluation_report(metric, self.settings.plots_score_thr)
            plots = draw_report(report) if report is not None else {}
        except Exception:  # the chief's alone (see the module's docstring)
            logger.warning("The evaluation plots were not drawn.", exc_info=True)
            return
        if report is None:
            logger.info("No detections: no evaluation plots.")
            return
        self.report, self.plots = report, plots
        logger.info(
            "Evaluation after %d batches (plots in %.1f s):\n%s",
            batches,
            time.monotonic() - start,
            "\n".join(report_lines(report)),
        )
        self._images("evaluation", plots, batches)
