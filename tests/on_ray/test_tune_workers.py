"""Ray Tune trials of several workers (`resources.slots_per_trial` > 1) on a real local Ray,
started once for the module: each trial runs a `TorchTrainer` of its own (Ray's way for Train
inside Tune), its workers share the cluster's CPUs, ASHA gets the searcher metric, and the
checkpoints are the trainer's; more slots than the cluster has is an error before any trial.
A second local Ray runs on the host meanwhile, as one may (another user's, another test's): Ray
Train's placement-group cleaner must still find its own (on_ray.cluster.runtime_env)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, SGD_SETS
from tests.local_runs import DATA, TOY
from utils.base.errors import ConfigError, ExperimentError

ray = pytest.importorskip("ray")
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY  # noqa: E402

from on_ray import cluster, state  # noqa: E402
from on_ray.tune import tune_search  # noqa: E402
from tests.on_ray.conftest import init_local_ray  # noqa: E402
from tests.on_ray.searches import assert_tracked_asha_search  # noqa: E402

pytestmark = pytest.mark.slow
DEMO = str(REPO / "experiments" / "demo.yaml")
# 4 logical CPUs on this 2-core machine: both trials' 2 workers at once, one CPU each.
CPUS = 4
# Two trials: HyperOpt's TPE draws the first at random (0.123 at seed 12) and picks the second
# (0.309) after it; that one leads at the first rung but overshoots by the second (7 validation
# images tell them apart: 4 gave every LR one of two values), where ASHA stops it.
TRIALS = 2


# A local Ray of its own, until its standard input closes.
OTHER_RAY = (
    "import sys, ray; ray.init(num_cpus=1, include_dashboard=False, logging_level='WARNING'); "
    "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read(); ray.shutdown()"
)


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None
        other_address = other.stdout.readline().strip()
        assert other_address, "the second Ray did not start"
        # With its dashboard: Ray Train's placement-group cleaner asks the dashboard's state API
        # whether a trial's trainer is still alive; without it, a trial that ASHA stops keeps its
        # CPUs for good.
        init_local_ray(CPUS, include_dashboard=True)
        try:
            assert ray.get_runtime_context().gcs_address != other_address  # two clusters
            yield
        finally:
            ray.shutdown()
    finally:
        try:
            other.communicate(timeout=60)  # closes its input: it shuts its Ray down
        except subprocess.TimeoutExpired:
            other.kill()
            other.communicate()


def search_overrides(cache: Path, slots: int) -> list[str]:
    """TRIALS trials of the toy detector, 4 images a batch and a validation after each batch,
    one trial at a time (which trial ASHA stops depends on the order of their reports: the same in
    every run only so); rungs at 1, 2 and 4 batches."""
    data = {**DATA, "num_train": 4}  # one batch an epoch
    return [
        f"hyperparameters.config_file={TOY}",
        "hyperparameters.global_batch_size=4",
        "hyperparameters.override_mmdet_config="
        '{"train_cfg.val_interval": 1, "param_scheduler": []}',
        f"data.cache_dir={cache}",
        f"data.synthetic={json.dumps(data)}",
        *SGD_SETS,
        "hyperparameters.lr={type: log, base: 10, minval: -3, maxval: -0.5}",
        "hyperparameters.visualization={num_images: 0}",
        "searcher={name: adaptive_asha, metric: bbox_mAP, smaller_is_better: false, "
        "time_metric: batches, max_time: 4, max_rungs: 3, divisor: 2, "
        f"max_trials: {TRIALS}, "
        "mode: aggressive, max_concurrent_trials: 1}",
        f"resources.slots_per_trial={slots}",
        "max_restarts=0",
    ]


def test_trials_share_the_cpus_among_all_their_workers() -> None:
    """As many trials at once as the CPUs hold (at most the search's), their workers' shares
    equal; a trial that starts a trainer reserves no CPU, one that trains itself its share."""
    assert cluster.trial_resources(2, False, 2) == (2, {"CPU": 1}, cluster.TRIAL_DRIVER)
    assert cluster.trial_resources(2, False, 1) == (1, {"CPU": 2}, cluster.TRIAL_DRIVER)
    assert cluster.trial_resources(2, False, 8) == (2, {"CPU": 1}, cluster.TRIAL_DRIVER)
    assert cluster.trial_resources(1, False, 2) == (2, {"CPU": 2}, {"CPU": 2})
    assert cluster.trial_resources(3, False, 2) == (1, {"CPU": 1}, cluster.TRIAL_DRIVER)
    assert cluster.TRIAL_DRIVER["CPU"] == 0


def test_a_search_trains_each_trial_on_its_workers(
    tmp_path: Path, synthetic_cache: Path, mlflow_server: str
) -> None:
    """HyperOpt's search, tracked in MLflow by each trial's chief worker."""
    tracking = f"data.mlflow={{tracking_uri: {mlflow_server}, experiment_name: tune-hyperopt}}"
    sets = [*search_overrides(synthetic_cache, 2), tracking]
    results = tune_search(DEMO, sets, search_alg="hyperopt", output=tmp_path, seed=12)
    best = assert_tracked_asha_search(
        results, TRIALS, mlflow_server, "tune-hyperopt", synthetic_cache, tmp_path / "predicted"
    )
    assert (best / "evaluation" / "report.json").is_file()
    for result in results:
        metrics = result.metrics
        assert isinstance(metrics["bbox_mAP"], float)  # the searcher metric, for ASHA
        batches = int(metrics["batches"])
        # The trainer's checkpoints, in the trial's folder: one a validation, each written by
        # both workers (a rank's random generators come from that rank). The workers do not
        # wait for Tune: one that ASHA stops may have written the next before it ends.
        last = Path(metrics[CHECKPOINT_PATH_KEY])
        assert last.is_relative_to(result.path), (last, result.path)
        assert state.batches_of(last) == batches
        written = sorted(p for p in last.parent.glob("checkpoint_*") if p.is_dir())
        assert [state.batches_of(p) for p in written][:batches] == list(range(1, batches + 1))
        for checkpoint in written:
            ranks = sorted(p.name for p in (checkpoint / state.RNG_DIR).iterdir())
            assert ranks == ["rank_0.pth", "rank_1.pth"], checkpoint
            assert (checkpoint / state.STATE_FILE).is_file()
            assert (checkpoint / "mmdet" / "model.pth").is_file()


def test_more_slots_than_cpus_is_an_error_before_any_trial(
    tmp_path: Path, synthetic_cache: Path
) -> None:
    sets = [*search_overrides(synthetic_cache, 8), "hyperparameters.global_batch_size=8"]
    with pytest.raises(ExperimentError) as error:
        tune_search(DEMO, sets, output=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"resources.slots_per_trial is 8, but Ray sees {CPUS} CPUs"), message
    assert not (tmp_path / "ray").exists()  # no trial started


def test_a_searcher_metric_no_validation_reports_is_refused_before_any_trial(
    tmp_path: Path, synthetic_cache: Path
) -> None:
    sets = search_overrides(synthetic_cache, 2)
    sets = [s.replace("metric: bbox_mAP", "metric: bbox_mAp") for s in sets]
    with pytest.raises(ConfigError, match=r"searcher.metric 'bbox_mAp' .* Did you mean bbox_mAP\?"):
        tune_search(DEMO, sets, output=tmp_path)
    assert not (tmp_path / "ray").exists()  # no trial started
