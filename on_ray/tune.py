"""`python -m on_ray tune`: the experiment's hyperparameter search on Ray Tune.

Each trial trains as `python -m on_ray train` does (the same worker loop, validations and
checkpoints); a trial of `slots_per_trial` > 1 runs its own `TorchTrainer`. The searcher maps as
`on_ray/space.py` says; HyperOpt or Optuna (TPE) can choose the points instead of random draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import ray.tune
from ray import tune
from ray.train import FailureConfig as TrainFailureConfig
from ray.train import RunConfig as TrainRunConfig
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from on_ray import cluster
from on_ray.space import Search, plan_search, search_space, trial_count
from on_ray.spec import WorkerSpec
from on_ray.train import torch_trainer
from on_ray.worker import run_worker
from utils.base.errors import ConfigError
from utils.evaluation.metric_names import searcher_findings
from utils.experiment import load as experiment
from utils.training.keys import check_experiment_keys
from utils.training.plan import plan_run
from utils.training.session import prepare_data


@dataclasses.dataclass(frozen=True)
class TrialTrainer:
    """What a trial of several workers gives its `TorchTrainer`, the same for every trial.

    Attributes:
        resources_per_worker: what each worker reserves (`cluster.worker_resources`).
        storage: the Tune experiment's folder (or cloud URI): each trial's trainer keeps its
            run, checkpoints included, under its trial's folder there.
        max_failures: worker failures the trainer restarts from its last checkpoint.
        env: the workers' environment.
    """

    resources_per_worker: dict[str, float] | None
    storage: str
    max_failures: int
    env: dict[str, str]


def tune_trial(
    config: dict[str, Any],
    spec: WorkerSpec,
    workers: int,
    use_gpu: bool,
    trainer: TrialTrainer | None = None,
) -> None:
    """One trial: the sampled hyperparameters, planned once here and trained on one worker here
    or on `workers` of a `trainer`, which get the plan."""
    context = ray.tune.get_context()
    exp = spec.experiment
    # From the driver's directory, where the experiment's relative config paths start.
    with contextlib.chdir(spec.cwd if spec.cwd and Path(spec.cwd).is_dir() else "."):
        plan = plan_run(
            config, exp.get("data") or {}, world_size=workers, searcher=exp.get("searcher")
        )
    spec = dataclasses.replace(
        spec,
        hparams=config,
        plan=plan,
        output=str(Path(spec.output) / context.get_trial_name()),
        run_name=f"{spec.run_name} {context.get_trial_name()}",
    )
    if workers > 1:
        if trainer is None:
            raise ValueError(f"A trial of {workers} workers needs its TrialTrainer.")
        train_trial(spec, workers, use_gpu, trainer)
        return

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder else None
        ray.tune.report(metrics, checkpoint=checkpoint)

    restored = ray.tune.get_checkpoint()
    if restored is None:
        run_worker(spec, 0, 1, None, report)
        return
    with restored.as_directory() as folder:
        run_worker(spec, 0, 1, Path(folder), report)


def train_trial(spec: WorkerSpec, workers: int, use_gpu: bool, trainer: TrialTrainer) -> None:
    """Ray's way for Train inside Tune: the trial starts a trainer of its own, whose workers
    reserve their resources; `TuneReportCallback` hands rank 0's reports to Tune, with the path
    of their checkpoint (`best_checkpoint`)."""
    trial_folder = Path(ray.tune.get_context().get_trial_dir()).name
    torch_trainer(
        spec,
        workers,
        use_gpu,
        trainer.resources_per_worker,
        TrainRunConfig(
            # The same folder when Tune restarts the trial: Ray Train then resumes its run.
            name="train",
            storage_path=f"{trainer.storage.rstrip('/')}/{trial_folder}",
            failure_config=TrainFailureConfig(max_failures=trainer.max_failures),
            worker_runtime_env={"env_vars": trainer.env},
            callbacks=[TuneReportCallback()],
        ),
    ).fit()


def search_algorithm(name: str, search: Search, seed: int) -> Any:
    """HyperOpt's or Optuna's TPE (random draws for their first points), or None (random); Tune
    limits it to the trials that run at once (`max_concurrent_trials`)."""
    startup = min(20, max(1, search.num_samples // 2))
    if name == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(n_initial_points=startup, random_state_seed=seed)
    if name == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed))
    return None


def tune_search(
    experiment_file: str,
    overrides: list[str],
    *,
    search_alg: str = "random",
    address: str | None = None,
    output: str | Path = "runs/tune",
    storage: str | None = None,
    max_batches: int | None = None,
    report_every: int = 20,
    seed: int = 0,
) -> tune.ResultGrid:
    """Run the search; prints the best trial and a table of all. Returns Tune's results."""
    exp = experiment.load_experiment(experiment_file, overrides)
    check_experiment_keys(exp)
    searcher = exp.get("searcher") or {}
    search = plan_search(searcher, search_alg)
    specs = exp.get("hyperparameters") or {}
    space = search_space(specs, search.grid)
    base = experiment.local_hparams(specs)
    workers = int((exp.get("resources") or {}).get("slots_per_trial", 1))
    # The run of the local values, planned and its data read here: their errors come before any
    # trial. Each trial plans its own hyperparameters once (`tune_trial`).
    plan = plan_run(base, exp.get("data") or {}, world_size=workers, searcher=searcher)
    # A searcher metric the validations do not report would fail every trial at its first
    # report; checked with the data's classes (plan_run has logged the warnings).
    problems, _ = searcher_findings(prepare_data(plan).cfg, searcher)
    if problems:
        raise ConfigError(" ".join(problems))
    output = Path(output).resolve()
    cluster.connect(address)
    use_gpu = cluster.check_workers(workers, "resources.slots_per_trial")
    wanted = trial_count(search.num_samples, space)
    at_once, per_worker, resources = cluster.trial_resources(
        workers, use_gpu, min(wanted, search.max_concurrent or wanted)
    )
    name = f"{exp.get('name') or 'mmdet'}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage or str(output / "ray")
    spec = WorkerSpec(
        experiment=exp,
        hparams=base,
        plan=plan,  # each trial's replaces it
        output=str(output / name),
        max_batches=max_batches,
        report_every=report_every,
        run_name=name,
        cwd=os.getcwd(),
    )
    env = {**cluster.worker_env(), **experiment.environment_variables(exp, use_gpu)}
    restarts = int(exp.get("max_restarts", 5))
    trainer = TrialTrainer(per_worker, f"{storage.rstrip('/')}/{name}", restarts, env)
    trainable = tune.with_resources(
        partial(tune_trial, spec=spec, workers=workers, use_gpu=use_gpu, trainer=trainer),
        resources,
    )
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            num_samples=search.num_samples,
            max_concurrent_trials=at_once,
            scheduler=search.scheduler,
            search_alg=search_algorithm(search_alg, search, seed),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=restarts),
            verbose=1,
        ),
    )
    results = tuner.fit()
    print_summary(results, search, searcher)
    return results


def print_summary(results: tune.ResultGrid, search: Search, searcher: dict[str, Any]) -> None:
    """The best trial (hyperparameters, metric, checkpoint) and a table of all trials."""
    unit = searcher.get("time_metric") or "batches"
    rows = []
    for result in results:
        metrics = result.metrics or {}
        value = metrics.get(search.metric)
        rows.append((result.path.rsplit("/", 1)[-1], value, metrics.get(unit), result.error))
    print(f"\n{'trial':<40} {search.metric:>12} {unit:>9}  state")
    for trial, value, length, error in rows:
        shown = "-" if value is None else f"{value:.4f}"
        done = "-" if length is None else f"{length:g}"
        state = f"error: {type(error).__name__}" if error else "done"
        print(f"{trial[:40]:<40} {shown:>12} {done:>9}  {state}")
    if search.rungs:
        print(f"ASHA rungs ({unit}): {', '.join(f'{r:g}' for r in search.rungs)}")
    best = best_result(results, search.metric, search.mode)
    if best is None:
        print("No trial reported the metric.")
        return
    print(f"\nBest trial: {search.metric} = {best.metrics[search.metric]:.4f}")
    for key, value in sorted(best.config.items()):
        print(f"  {key}: {value!r}")
    print(f"Checkpoint: {best_checkpoint(best)}")


def best_result(results: tune.ResultGrid, metric: str, mode: str) -> Any:
    """The trial with the best last-reported `metric` (its latest checkpoint holds the weights
    of that validation); None if no trial reported it."""
    candidates = [r for r in results if isinstance((r.metrics or {}).get(metric), float)]
    candidates = [r for r in candidates if not math.isnan(r.metrics[metric])]
    if not candidates:
        return None
    sign = 1 if mode == "max" else -1
    return max(candidates, key=lambda r: sign * r.metrics[metric])


def best_checkpoint(result: Any) -> str:
    """A trial's latest checkpoint folder (a multi-worker trial's is its trainer's)."""
    forwarded = (result.metrics or {}).get(CHECKPOINT_PATH_KEY)
    if forwarded:
        return str(forwarded)
    return result.checkpoint.path if result.checkpoint else "(none)"
