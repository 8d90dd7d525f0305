"""`python -m on_ray train`: one run of an experiment YAML on Ray Train's `TorchTrainer`.

The YAML maps as on Determined: `resources.slots_per_trial` workers (one GPU each where the
cluster has GPUs, NCCL; else one CPU each, gloo), `max_restarts` restarts from the latest
checkpoint, each hyperparameter's value as a local run picks it. What fails in the experiment is
found here, before any worker starts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from on_ray import cluster, state
from on_ray.spec import WorkerSpec
from on_ray.worker import run_worker
from utils.base.errors import TrainingStopped
from utils.evaluation.validation import VALIDATION_FAILURE
from utils.experiment import load as experiment
from utils.training.keys import check_experiment_keys
from utils.training.plan import RunPlan, plan_run
from utils.training.progress import METRICS_FILE, print_final_validation
from utils.training.resumable import check_resumable
from utils.training.session import prepare_data


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's function on each worker."""
    context = ray.train.get_context()
    restored = ray.train.get_checkpoint()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(folder)) if folder else None
        name = f"checkpoint_{metrics['batches']:07d}"
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    if restored is None:
        run_worker(config["spec"], rank, world_size, None, report)
        return
    with restored.as_directory() as folder:
        run_worker(config["spec"], rank, world_size, Path(folder), report)


def torch_trainer(
    spec: WorkerSpec,
    workers: int,
    use_gpu: bool,
    resources_per_worker: dict[str, float] | None,
    run_config: RunConfig,
) -> TorchTrainer:
    """Ray Train's trainer of `workers` running `train_loop` on `spec` (gloo on CPUs, NCCL on
    GPUs): a Train run's, or a Tune trial's own."""
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=run_config,
    )


def prepare(
    experiment_file: str, overrides: list[str], workers: int | None, resume: str | None
) -> tuple[dict[str, Any], RunPlan]:
    """The experiment, checked as `--local` checks it, and its run planned once, here, for the
    workers (their hyperparameters and number are the plan's): a bad config, bad data or a
    checkpoint of another model fails before Ray starts anything."""
    exp = experiment.load_experiment(experiment_file, overrides)
    check_experiment_keys(exp)
    hparams = experiment.local_hparams(exp.get("hyperparameters") or {})
    slots = (exp.get("resources") or {}).get("slots_per_trial", 1)
    count = workers if workers is not None else int(slots)
    plan = plan_run(hparams, exp.get("data") or {}, world_size=count, searcher=exp.get("searcher"))
    # The data read here as the workers will read it, so that bad data is named now; the
    # workers get the plan (not this prepared copy) and ready the data on their own hosts.
    prepared = prepare_data(plan)
    if resume:
        state.batches_of(Path(resume))  # one of ours
        check_resumable(resume, prepared.cfg)  # of this model (with the data's classes)
    return exp, plan


def train(
    experiment_file: str,
    overrides: list[str],
    *,
    workers: int | None = None,
    address: str | None = None,
    output: str | Path = "runs/ray",
    storage: str | None = None,
    resume: str | None = None,
    max_batches: int | None = None,
    report_every: int = 20,
    batch_hook: Callable[[int, int], None] | None = None,
) -> ray.train.Result:
    """Train with `TorchTrainer`; returns Ray's result (its checkpoint is the last one).

    `storage`: Ray's storage path for checkpoints (a folder or a cloud URI; default
    `<output>/ray`); `batch_hook`: see `WorkerSpec`."""
    exp, plan = prepare(experiment_file, overrides, workers, resume)
    count = plan.world_size
    output = Path(output).resolve()
    if resume:
        resume = str(Path(resume).resolve())
    cluster.connect(address)
    use_gpu = cluster.check_workers(count, "--workers (or resources.slots_per_trial)")
    name = f"{exp.get('name') or 'mmdet'}-{time.strftime('%Y%m%d-%H%M%S')}"
    spec = WorkerSpec(
        experiment=exp,
        hparams=plan.hparams,
        plan=plan,
        output=str(output),
        max_batches=max_batches,
        report_every=report_every,
        resume=resume,
        batch_hook=batch_hook,
        run_name=name,
        cwd=os.getcwd(),
    )
    env = experiment.environment_variables(exp, use_gpu)
    trainer = torch_trainer(
        spec,
        count,
        use_gpu,
        cluster.worker_resources(count, use_gpu),
        RunConfig(
            name=name,
            storage_path=storage or str(output / "ray"),
            failure_config=FailureConfig(max_failures=int(exp.get("max_restarts", 5))),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": {**cluster.worker_env(), **env}},
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        cluster.raise_user_error(err)
        raise
    stopped_by_validation(result)
    print_final_validation(
        output / METRICS_FILE, result.checkpoint.path if result.checkpoint else ""
    )
    return result


def stopped_by_validation(result: ray.train.Result) -> None:
    """A run whose validation failed ends with what failed and the checkpoint to resume from."""
    metrics = result.metrics or {}
    if VALIDATION_FAILURE not in metrics:
        return
    where = result.checkpoint.path if result.checkpoint else "?"
    raise TrainingStopped(
        f"The validation after {metrics.get('batches')} batches failed: "
        f"{metrics[VALIDATION_FAILURE]} The trained weights are in checkpoint {where}: fix the "
        "cause, then resume from it with --resume."
    )
