"""A Ray run is planned once: by the driver (`train`), or by each Tune trial for its own
hyperparameters; the workers get the plan in their `WorkerSpec` and do not plan. No Ray is
started: Ray's entry points are replaced by stand-ins that keep what they were given."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import REPO, TINY_SYNTHETIC
from utils.training import plan as planning

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402

from on_ray import train as ray_train  # noqa: E402
from on_ray import tune as ray_tune  # noqa: E402
from on_ray import worker  # noqa: E402
from on_ray.spec import WorkerSpec  # noqa: E402

DEMO = str(REPO / "experiments" / "demo.yaml")
RETINANET = "configs/synthetic/retinanet_r18_fpn_synthetic.py"


class Stop(Exception):
    """Ends the code under test where the stand-in is reached, with what it was given."""

    def __init__(self, given: Any) -> None:
        super().__init__("stopped")
        self.given = given


def overrides(cache: Path) -> list[str]:
    return [
        f"hyperparameters.config_file={RETINANET}",
        "hyperparameters.global_batch_size=4",
        f"data.cache_dir={cache}",
        f"data.synthetic={json.dumps(TINY_SYNTHETIC)}",
    ]


def counted(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[dict]:
    """Every plan_run call `module` makes, by its hyperparameters."""
    calls: list[dict] = []

    def plan_run(hparams: dict, *args: Any, **kwargs: Any) -> planning.RunPlan:
        calls.append(hparams)
        return planning.plan_run(hparams, *args, **kwargs)

    monkeypatch.setattr(module, "plan_run", plan_run)
    return calls


def test_the_driver_plans_once_and_ships_the_plan(
    tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counted(monkeypatch, ray_train)
    monkeypatch.setattr(ray_train.cluster, "connect", lambda address: None)
    monkeypatch.setattr(ray_train.cluster, "check_workers", lambda count, what: False)
    monkeypatch.setattr(ray_train.cluster, "worker_resources", lambda count, use_gpu: None)

    def trainer(loop: Any, train_loop_config: dict, **kwargs: Any) -> None:
        raise Stop(train_loop_config["spec"])

    monkeypatch.setattr(ray_train, "TorchTrainer", trainer)
    with pytest.raises(Stop) as stop:
        ray_train.train(DEMO, overrides(synthetic_cache), workers=2, output=tmp_path)
    spec = stop.value.given
    assert len(calls) == 1
    assert spec.plan.world_size == 2 and spec.plan.hparams == spec.hparams
    assert spec.plan.cfg.train_dataloader.batch_size == 2  # 4 images over 2 workers
    # What Ray ships to the workers: the same plan.
    assert cloudpickle.loads(cloudpickle.dumps(spec)).plan == spec.plan


def test_a_worker_builds_from_the_specs_plan_without_planning(
    tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = planning.plan_run(
        {"config_file": RETINANET, "global_batch_size": 4},
        {"backend": "synthetic", "cache_dir": str(synthetic_cache), "synthetic": TINY_SYNTHETIC},
        world_size=2,
    )
    spec = WorkerSpec(experiment={}, hparams=plan.hparams, plan=plan, output=str(tmp_path))
    assert not hasattr(worker, "plan_run")
    monkeypatch.setattr(planning, "plan_run", lambda *a, **k: pytest.fail("a worker planned"))

    def session(given: planning.RunPlan, **kwargs: Any) -> None:
        raise Stop(given)

    monkeypatch.setattr(worker, "TrainingSession", session)
    with pytest.raises(Stop) as stop:
        worker.run_worker(spec, 1, 2, None, lambda metrics, folder: None)
    assert stop.value.given is plan
    with pytest.raises(RuntimeError, match="planned for 2 workers, not 3"):
        worker.run_worker(spec, 1, 3, None, lambda metrics, folder: None)


def test_a_tune_trial_plans_its_hyperparameters_once(
    tmp_path: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counted(monkeypatch, ray_tune)
    trial = SimpleNamespace(get_trial_name=lambda: "trial_1", get_trial_dir=lambda: str(tmp_path))
    monkeypatch.setattr(ray.tune, "get_context", lambda: trial)
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)

    def run_worker(spec: WorkerSpec, *args: Any) -> None:
        raise Stop(spec)

    monkeypatch.setattr(ray_tune, "run_worker", run_worker)
    data = {"backend": "synthetic", "cache_dir": str(synthetic_cache), "synthetic": TINY_SYNTHETIC}
    base = {"config_file": RETINANET, "global_batch_size": 4, "lr": 0.01}
    template = WorkerSpec(
        experiment={"data": data},
        hparams=base,
        plan=planning.plan_run(base, data),
        output=str(tmp_path),
        cwd=str(REPO),
    )
    sampled = {**base, "lr": 0.003}
    with pytest.raises(Stop) as stop:
        ray_tune.tune_trial(sampled, template, workers=1, use_gpu=False)
    spec = stop.value.given
    assert calls == [sampled]
    assert spec.hparams == spec.plan.hparams == sampled
    assert spec.plan.cfg.optim_wrapper.optimizer.lr == pytest.approx(0.003)
