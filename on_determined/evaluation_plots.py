"""The evaluation plots after each validation, as a trial callback: the chief draws them from the
COCO evaluation that has just run (utils/evaluation/report.py, utils/evaluation/plots.py), into
TensorBoard
(`evaluation/<plot>`, at the batch count) and into the next checkpoint (`evaluation/`: the PNGs and
`report.json`, the numbers behind them)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from determined import pytorch

from utils.evaluation.plots import draw_report
from utils.evaluation.report import REPORT_DIR, evaluation_report, report_lines, save_report
from utils.evaluation.validation import VALIDATION_FAILURE
from utils.training.session import TrainingSession

logger = logging.getLogger(__name__)


class EvaluationPlots(pytorch.PyTorchCallback):
    """Chief only: the plots of the last validation, kept for the next checkpoint.

    Args:
        session: the training session (its evaluator holds the last evaluation).
        context: Determined's trial context (rank, TensorBoard writer).
        score_thr: the confusion matrix's score threshold.
    """

    def __init__(
        self, session: TrainingSession, context: pytorch.PyTorchTrialContext, score_thr: float
    ) -> None:
        self.session = session
        self.context = context
        self.score_thr = score_thr
        self.report: dict[str, Any] | None = None
        self.drawings: dict[str, np.ndarray] = {}

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        context = self.context
        if context.distributed.rank != 0:
            return
        self.report, self.drawings = None, {}
        metric = self.session.evaluator.coco_metric()
        if VALIDATION_FAILURE in metrics or metric is None:
            return
        start = time.monotonic()
        try:
            report = evaluation_report(metric, self.score_thr)
            drawings = draw_report(report) if report is not None else {}
        except Exception:  # the chief's alone: raising would leave the other ranks waiting
            logger.warning("The evaluation plots were not drawn.", exc_info=True)
            return
        if report is None:
            logger.info("No detections: no evaluation plots.")
            return
        self.report, self.drawings = report, drawings
        batches = self.session.batches_trained
        logger.info(
            "Evaluation after %d batches (plots in %.1f s):\n%s",
            batches,
            time.monotonic() - start,
            "\n".join(report_lines(report)),
        )
        if context.get_enable_tensorboard_logging():
            writer = context.get_tensorboard_writer()
            for name, drawing in drawings.items():
                writer.add_image(f"evaluation/{name}", drawing, batches, dataformats="HWC")

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        if self.report is not None:  # the last validation's, on the chief
            save_report(self.report, self.drawings, Path(checkpoint_dir) / REPORT_DIR)
