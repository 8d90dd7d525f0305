"""Where the chief worker's outputs go on Ray (the outputs themselves are the core's,
`utils/training/outputs.py`): `metrics.jsonl` and the progress line under the run's output
folder, TensorBoard files beside it (scalars written here: Ray writes none), and the optional
MLflow run of `data.mlflow`, continued from a restored checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from on_ray.spec import WorkerSpec
from utils.training.outputs import RunOutputs, output_settings
from utils.training.progress import METRICS_FILE, RunReport
from utils.training.session import TrainingSession
from utils.training.tracking import RUN_FILE


def chief_outputs(spec: WorkerSpec, session: TrainingSession, total: int) -> RunOutputs:
    """Rank 0's outputs of one run (or one Tune trial) training to `total` batches."""
    output = Path(spec.output)
    output.mkdir(parents=True, exist_ok=True)
    exp = spec.experiment
    settings = output_settings(
        spec.hparams,
        exp,
        run_name=spec.run_name or exp.get("name") or "mmdet",
        tags={"engine": "ray"},
        progress=RunReport(output / METRICS_FILE, total),
        tensorboard=SummaryWriter(str(output / "tensorboard")),
        scalars=True,
    )
    return RunOutputs(session, settings)


def resume_run_id(restored: Path | None) -> str | None:
    """The MLflow run a restored checkpoint names (its training goes on in it)."""
    if restored is None or not (restored / RUN_FILE).is_file():
        return None
    return json.loads((restored / RUN_FILE).read_text()).get("run_id")


def run_status(finished: bool) -> str:
    """The MLflow status of a worker's run as it ends (while an exception unwinds it, if any)."""
    error = sys.exc_info()[1]
    if isinstance(error, KeyboardInterrupt) or (error is None and not finished):
        return "KILLED"
    return "FINISHED" if error is None else "FAILED"


def close_tensorboard(outputs: RunOutputs) -> None:
    if outputs.settings.tensorboard is not None:
        outputs.settings.tensorboard.close()
