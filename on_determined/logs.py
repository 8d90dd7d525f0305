"""The console of local runs and commands: Determined's own INFO lines kept out of it.

Without a master, Determined's Trainer logs at INFO what it would send to one. Around every
progress line come `status: ...`, `report_training_metrics(...)` (the metrics dict again),
`report_progress with progress=...` and `upload_tensorboard_files()`, all from the logger
`determined.core` (`TrainContext` and `DummyTrainContext` in `determined/core/_train.py`): 155 of
`make demo`'s 240 console lines, saying what the progress line and the COCO tables say. Raising
that logger to WARNING also hides its `report_validation_metrics(...)`, `saved checkpoint <uuid>`
and where checkpoints are stored; its warnings and errors, and other loggers' lines (e.g.
`determined.pytorch: validated: ...`), still show.

A cluster trial is left as Determined logs it: there `status` and `report_progress` are DEBUG and
the master's API gets the reports, so its log has one `report_training_metrics` line per report,
the only training progress it shows (the progress line is local only).
"""

from __future__ import annotations

import logging
import os

# `MMDET_DETERMINED_ENGINE_LOG=1` shows them again (as MMDET_DETERMINED_INIT_LOG does mmengine's).
ENGINE_LOG_VARIABLE = "MMDET_DETERMINED_ENGINE_LOG"
# The logger of Determined's core (`logging.getLogger("determined.core")` in each of its modules).
ENGINE_LOGGERS = ("determined.core",)


def quiet_engine_log() -> None:
    """Raise Determined's core loggers to WARNING (warnings and errors still show) unless the
    environment sets ENGINE_LOG_VARIABLE to 1."""
    if os.environ.get(ENGINE_LOG_VARIABLE) == "1":
        return
    for name in ENGINE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
