"""What every Ray worker of a run (or of a Tune trial) is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the plan's module imports mmdet: the spec stays light to import
    from utils.training.plan import RunPlan


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs, picklable (Ray ships it to every worker).

    Attributes:
        experiment: the experiment YAML, `--set` applied.
        hparams: the trial's hyperparameters (one value each).
        plan: the run planned once, by the driver (a Tune trial: by the trial) for these
            hyperparameters and the workers' number: workers build from it, they do not plan.
        output: the chief's local folder for `metrics.jsonl` and TensorBoard files.
        max_batches: a cap on the training length (None: the schedule's).
        report_every: batches per training report.
        resume: a checkpoint folder to start from when Ray restores none.
        batch_hook: called as `batch_hook(batch_index, rank)` in the worker before each batch
            (the benchmarks stamp batches with it, the tests crash a worker).
        run_name: the MLflow run's name (default: the experiment's).
        cwd: the driver's working directory, where relative paths of the experiment start
            (used on the nodes that have it).
    """

    experiment: dict[str, Any]
    hparams: dict[str, Any]
    plan: RunPlan
    output: str
    max_batches: int | None = None
    report_every: int = 20
    resume: str | None = None
    batch_hook: Callable[[int, int], None] | None = None
    run_name: str | None = None
    cwd: str | None = None
