"""The chief worker's logs: what local Determined runs show (`metrics.jsonl`, the progress line,
TensorBoard scalars and prediction drawings) and the optional MLflow run of `data.mlflow`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from on_ray.spec import WorkerSpec
from utils.evaluation.drawings import (
    render_samples,
    sample_indices,
    save_pngs,
    visualization_settings,
)
from utils.evaluation.validation import VALIDATION_FAILURE
from utils.training.progress import METRICS_FILE, RunReport
from utils.training.session import TrainingSession
from utils.training.tracking import RUN_FILE, MlflowRun, mlflow_settings

logger = logging.getLogger(__name__)


class ChiefLog:
    """Rank 0's reports of one run (or one Tune trial)."""

    def __init__(
        self, spec: WorkerSpec, session: TrainingSession, total: int, restored: Path | None
    ) -> None:
        """`restored`: the checkpoint the run starts from (its MLflow run goes on)."""
        self.session = session
        output = Path(spec.output)
        output.mkdir(parents=True, exist_ok=True)
        self.report = RunReport(output / METRICS_FILE, total)
        self.tensorboard = SummaryWriter(str(output / "tensorboard"))
        num_images, self.score_thr = visualization_settings(spec.hparams)
        self.indices = sample_indices(num_images, len(session.val_dataset))
        self.drawings: dict[str, np.ndarray] = {}
        self.mlflow: MlflowRun | None = None
        settings = mlflow_settings(spec.experiment)
        if settings is not None:
            self.mlflow = MlflowRun(settings)
            self._start_mlflow(spec, restored)

    def _start_mlflow(self, spec: WorkerSpec, restored: Path | None) -> None:
        assert self.mlflow is not None
        run_id = None
        if restored is not None and (restored / RUN_FILE).is_file():
            run_id = json.loads((restored / RUN_FILE).read_text()).get("run_id")
        exp = spec.experiment
        tags = {"mmdet.config_file": str(spec.hparams.get("config_file", "")), "engine": "ray"}
        name = spec.run_name or exp.get("name") or "mmdet"
        if self.mlflow.start(name, exp.get("description") or "", tags, run_id=run_id):
            data = {k: v for k, v in (exp.get("data") or {}).items() if k != "mlflow"}
            self.mlflow.log_params({**spec.hparams, "data": data})
            self.mlflow.log_text(self.session.cfg.pretty_text, "config.py")

    def training(self, batches: int, metrics: dict[str, float]) -> None:
        self.report.training(batches, metrics)
        for name, value in metrics.items():
            self.tensorboard.add_scalar(f"training/{name}", value, batches)
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step=batches)

    def validation(self, batches: int, metrics: dict[str, Any]) -> None:
        """After the chief computed the metrics, with the validated weights still in place."""
        self.drawings = {}
        if VALIDATION_FAILURE in metrics:
            return
        self.report.validation(batches, metrics)
        for name, value in metrics.items():
            self.tensorboard.add_scalar(f"validation/{name}", value, batches)
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step=batches)
        if not self.indices:
            return
        session = self.session
        try:
            self.drawings = render_samples(
                session.detector, session.val_dataset, self.indices, self.score_thr
            )
        except Exception:  # the chief's alone: raising would leave the other ranks waiting
            logger.warning("The prediction images were not drawn.", exc_info=True)
            return
        for name, drawing in self.drawings.items():
            self.tensorboard.add_image(f"predictions/{name}", drawing, batches, dataformats="HWC")
        self.tensorboard.flush()

    def checkpoint_written(self, folder: Path) -> None:
        if self.drawings:
            save_pngs(self.drawings, folder / "predictions")
        if self.mlflow:  # it also names the run in the checkpoint (RUN_FILE)
            self.mlflow.log_checkpoint(folder, step=self.session.batches_trained)

    def close(self, finished: bool) -> None:
        self.tensorboard.close()
        if self.mlflow:
            error = sys.exc_info()[1]
            status = "FINISHED" if finished and error is None else "FAILED"
            if isinstance(error, KeyboardInterrupt) or (error is None and not finished):
                status = "KILLED"
            self.mlflow.end(status)
