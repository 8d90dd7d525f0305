"""The Ray adapter on a real local Ray (started once for the module): Ray Train gives the local
Determined run's losses, weights and metrics; a worker that dies is restarted from the last
checkpoint and ends where an uninterrupted run ends; Tune runs ASHA with Optuna (HyperOpt's
search is tests/on_ray/test_tune_workers.py's)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from on_determined.local import free_ports
from tests.conftest import FEW_DRAWINGS, REPO, SGD_SETS
from tests.faults import die_once
from tests.local_runs import DATA, GFL, TOY, losses
from tests.local_runs import run as determined_run
from utils.base.errors import ExperimentError, StageError

ray = pytest.importorskip("ray")
from on_ray import state  # noqa: E402
from on_ray.checkpoints import ray_tracking  # noqa: E402
from on_ray.train import train  # noqa: E402
from on_ray.tune import tune_search  # noqa: E402
from tests.on_ray.searches import assert_tracked_asha_search  # noqa: E402

pytestmark = pytest.mark.slow
DEMO = str(REPO / "experiments" / "demo.yaml")
# 8 training images in batches of 4: a validation and a checkpoint every epoch of 2 batches,
# each with detections to evaluate (every score kept: after 4 batches all scores are low).
TRAIN_DATA = {**DATA, "num_train": 8}
BATCHES = 4
GFL_OVERRIDES = '"train_cfg.val_interval": 1, "model.test_cfg.score_thr": 0.0'


def overrides(
    cache: Path, config: str = GFL, data: dict = TRAIN_DATA, mmdet: str = GFL_OVERRIDES
) -> list[str]:
    """The `--set`s of tests.local_runs.run, for the same experiment."""
    return [
        f"hyperparameters.config_file={config}",
        "hyperparameters.global_batch_size=4",
        f"hyperparameters.override_mmdet_config={{{mmdet}}}",
        f"data.cache_dir={cache}",
        f"data.synthetic={json.dumps(data)}",
        FEW_DRAWINGS,
        *SGD_SETS,
    ]


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def last_determined_checkpoint(output: Path) -> Path:
    """A local Determined run's last checkpoint folder."""
    folders = [f for f in (output / "determined").iterdir() if (f / "metadata.json").is_file()]
    return max(
        folders, key=lambda f: json.loads((f / "metadata.json").read_text())["steps_completed"]
    )


def last_determined_weights(output: Path) -> dict[str, torch.Tensor]:
    """The weights of a local Determined run's last checkpoint (DDP's `module.` dropped)."""
    last = last_determined_checkpoint(output)
    state_dict = torch.load(last / "state_dict.pth", map_location="cpu", weights_only=False)
    return {k.removeprefix("module."): v for k, v in state_dict["models_state_dict"][0].items()}


def ray_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(checkpoint) / state.STATE_FILE, weights_only=False)["model"]


@pytest.fixture(scope="module")
def straight(
    local_ray: None,
    tmp_path_factory: pytest.TempPathFactory,
    synthetic_cache: Path,
    mlflow_server: str,
):
    """An uninterrupted 2-worker Ray Train run, tracked in MLflow: its output folder and Ray's
    result."""
    output = tmp_path_factory.mktemp("ray-straight")
    tracking = f"data.mlflow={{tracking_uri: {mlflow_server}, experiment_name: ray-train}}"
    result = train(
        DEMO,
        [*overrides(synthetic_cache), tracking],
        workers=2,
        output=output,
        max_batches=BATCHES,
        report_every=1,
    )
    return output, result


def test_ray_train_equals_the_two_process_determined_run(
    straight: tuple, tmp_path: Path, synthetic_cache: Path
) -> None:
    output, result = straight
    determined = determined_run(
        tmp_path,
        synthetic_cache,
        2,
        "--max-batches",
        str(BATCHES),
        "--set",
        f"data.synthetic={json.dumps(TRAIN_DATA)}",
        overrides=GFL_OVERRIDES,
    )
    ours = records(output)
    assert sorted(losses(ours)) == list(range(1, BATCHES + 1))
    assert len(set(losses(ours).values())) == BATCHES  # the model learns
    theirs = {r["batches"]: r["metrics"] for r in determined if r["kind"] == "training"}
    for record in (r for r in ours if r["kind"] == "training"):
        expected = theirs[record["batches"]]
        for name, value in record["metrics"].items():
            assert expected[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    w_det, w_ray = last_determined_weights(tmp_path), ray_weights(result.checkpoint.path)
    assert w_det.keys() == w_ray.keys()
    for name in w_det:
        torch.testing.assert_close(w_ray[name], w_det[name], rtol=1e-6, atol=1e-8, msg=name)
    validations = [r for r in ours if r["kind"] == "validation"]
    expected = [r for r in determined if r["kind"] == "validation"]
    assert [r["batches"] for r in validations] == [r["batches"] for r in expected] == [2, 4]
    for mine, det in zip(validations, expected, strict=True):
        assert mine["metrics"]["num_images"] == DATA["num_val"]
        bbox = {k: v for k, v in det["metrics"].items() if k.startswith("bbox_")}
        assert len(bbox) > 12  # no detection passes after 4 batches: see the toy's test below
        assert {k: mine["metrics"][k] for k in bbox} == pytest.approx(bbox, rel=1e-6, abs=1e-9)
    # The checkpoint holds the mmdet export that predict and export take.
    export = Path(result.checkpoint.path) / "mmdet"
    assert (export / "model.pth").is_file() and (export / "config.py").is_file()
    assert any((Path(result.checkpoint.path) / "predictions").glob("*.png"))
    assert list((output / "tensorboard").iterdir())


def test_ray_validation_equals_determineds_on_real_detections(
    local_ray: None, tmp_path: Path, synthetic_cache: Path
) -> None:
    """The toy detector finds the shapes within 2 batches: every rank's detections gathered to
    the chief give Determined's COCO metrics."""
    data = {**DATA, "num_train": 8}
    determined = determined_run(
        tmp_path / "det", synthetic_cache, 2, "--max-batches", "2", "--set",
        f"data.synthetic={json.dumps(data)}", config=TOY,
    )  # fmt: skip
    train(
        DEMO,
        overrides(synthetic_cache, TOY, data, mmdet=""),
        workers=2,
        output=tmp_path / "ray",
        max_batches=2,
    )
    (theirs,) = [r["metrics"] for r in determined if r["kind"] == "validation"]
    (ours,) = [r["metrics"] for r in records(tmp_path / "ray") if r["kind"] == "validation"]
    assert 0.05 < theirs["bbox_mAP"] < 0.95 and theirs["num_images"] == DATA["num_val"]
    # What a worker prints reaches the console once (on_ray.cluster.PRINT_PATCH). Ray writes a
    # worker's stdout and stderr to its log files, which the driver's console shows; no other run
    # of this module's cluster trains 2 batches.
    context = ray.get_runtime_context()
    logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    printed = [
        line
        for path in [*logs.glob("worker-*.out"), *logs.glob("worker-*.err")]
        for line in path.read_text(errors="replace").splitlines()
        if line.startswith("[2/2] loss ")
    ]
    assert len(printed) == 1, printed
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    # The same outputs in the checkpoint: evaluation report and plots, prediction drawings.
    det_checkpoint = last_determined_checkpoint(tmp_path / "det")
    (ray_checkpoint,) = [p for p in (tmp_path / "ray" / "ray").glob("*/checkpoint_*") if p.is_dir()]
    for folder in ("evaluation", "predictions"):
        names = sorted(p.name for p in (det_checkpoint / folder).iterdir())
        assert names and names == sorted(p.name for p in (ray_checkpoint / folder).iterdir())
    report = json.loads((ray_checkpoint / "evaluation" / "report.json").read_text())
    expected = json.loads((det_checkpoint / "evaluation" / "report.json").read_text())
    assert_same_numbers(report, expected)
    events = EventAccumulator(str(tmp_path / "ray" / "tensorboard")).Reload()
    assert any(tag.startswith("evaluation/") for tag in events.Tags()["images"])


def assert_same_numbers(ours: object, theirs: object, where: str = "report") -> None:
    """Equal trees; numbers equal up to report.json's 6 decimals (a last digit may round apart)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), where
        for key in theirs:
            assert_same_numbers(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for index, (mine, their) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_numbers(mine, their, f"{where}[{index}]")
    elif isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=0, abs=2e-6), where
    else:
        assert ours == theirs, where


def test_ray_train_logs_to_mlflow(straight: tuple, mlflow_server: str, tmp_path: Path) -> None:
    """The chief's run in a real MLflow server: as Determined's trial logs it (params, config,
    metrics at the batch counts of metrics.jsonl, drawings, evaluation report, last export)."""
    from mlflow.tracking import MlflowClient

    output, result = straight
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("ray-train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["engine"] == "ray"
    assert run.data.params["config_file"].endswith("gfl_r18_fpn_synthetic.py")
    ours = records(output)
    for kind, name in (("training", "loss"), ("validation", "bbox_mAP")):
        history = client.get_metric_history(run.info.run_id, name)
        expected = [(r["batches"], r["metrics"][name]) for r in ours if r["kind"] == kind]
        assert sorted((m.step, m.value) for m in history) == pytest.approx(expected)
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    assert (artifacts / "config.py").is_file()
    assert (artifacts / "mmdet" / "model.pth").is_file()
    assert list((artifacts / "predictions" / f"batch_{BATCHES:07d}").glob("*.png"))
    assert (artifacts / "evaluation" / f"batch_{BATCHES:07d}" / "report.json").is_file()
    # The checkpoint names its run, for later evaluations of it.
    run_file = json.loads((Path(result.checkpoint.path) / "mlflow_run.json").read_text())
    assert run_file["run_id"] == run.info.run_id
    # `python -m on_ray evaluate` on the checkpoint logs there: the checkpoint keeps its experiment.
    settings, run_id = ray_tracking(Path(result.checkpoint.path) / "mmdet", {})
    assert (settings.tracking_uri, settings.experiment_name) == (mlflow_server, "ray-train")
    assert run_id == run.info.run_id


def test_a_worker_that_dies_is_restarted_and_the_sanity_pass_leaves_no_trace(
    straight: tuple, tmp_path: Path, synthetic_cache: Path
) -> None:
    """The straight run again without the start-up sanity pass, and a worker dies after batch 3:
    restarted from the checkpoint of batch 2, it ends with the straight run's weights bit for bit,
    and every record is the straight run's (batch 3's twice, the same both times). Either fault,
    a trace of the pass or an inexact restart, breaks the equality (the Determined side tests
    the pass alone: tests/on_determined/test_distributed.py)."""
    output, uninterrupted = straight
    marker = tmp_path / "fault-done"
    sets = [*overrides(synthetic_cache), "max_restarts=1", "hyperparameters.sanity_pass=false"]
    result = train(
        DEMO,
        sets,  # demo.yaml allows no restart
        workers=2,
        output=tmp_path,
        max_batches=BATCHES,
        report_every=1,
        # Rank 1 dies before the 4th batch; the checkpoint of batch 2 is there.
        batch_hook=functools.partial(die_once, 3, 1, str(marker)),
    )
    assert marker.is_file()  # the fault happened
    written = records(tmp_path)
    trained = [r["batches"] for r in written if r["kind"] == "training"]
    assert trained == [1, 2, 3, 3, 4]  # batch 3 again: the restart began after batch 2
    first, again = (r for r in written if r["kind"] == "training" and r["batches"] == 3)
    assert first == again
    written.remove(first)
    assert written == records(output)
    assert state.batches_of(Path(result.checkpoint.path)) == BATCHES
    w_straight = ray_weights(uninterrupted.checkpoint.path)
    w_resumed = ray_weights(result.checkpoint.path)
    assert w_straight.keys() == w_resumed.keys()
    for name in w_straight:
        torch.testing.assert_close(w_resumed[name], w_straight[name], rtol=0, atol=0, msg=name)


def test_a_val_pipeline_without_resize_stops_a_ray_run_before_training(
    local_ray: None, tmp_path: Path, synthetic_cache: Path
) -> None:
    load = [{"type": "LoadImageFromFile"}, {"type": "LoadAnnotations", "with_bbox": True}]
    pipeline = json.dumps({"val_dataloader.dataset.pipeline": [*load, {"type": "PackDetInputs"}]})
    sets = [*overrides(synthetic_cache, mmdet=pipeline[1:-1]), "max_restarts=0"]
    with pytest.raises(StageError) as error:
        train(DEMO, sets, workers=2, output=tmp_path, max_batches=BATCHES, report_every=1)
    message = str(error.value)
    assert message.startswith("Start-up sanity pass, validation: "), message
    assert "val_dataloader.dataset.pipeline has no Resize" in message and "\n" not in message
    written = records(tmp_path) if (tmp_path / "metrics.jsonl").is_file() else []
    assert [r for r in written if r["kind"] == "training"] == []  # stopped before its first batch


# Two trials: Optuna's TPE draws the first (0.085 at seed 10) and picks the second (0.196) after
# it; that one overshoots by the second rung, where ASHA stops it.
TRIALS = 2


def search_overrides(cache: Path) -> list[str]:
    data = {**DATA, "num_train": 4}  # one batch an epoch: a validation at every rung
    # One trial at a time: which trials ASHA stops depends on the order of their reports, the
    # same in every run only so (the TPE samplers are seeded, training is deterministic).
    return [
        # A constant LR (no warm-up), so that the searched LR moves the metric from batch 1.
        *overrides(cache, TOY, data, mmdet='"train_cfg.val_interval": 1, "param_scheduler": []'),
        "hyperparameters.lr={type: log, base: 10, minval: -3, maxval: -0.5}",
        "searcher={name: adaptive_asha, metric: bbox_mAP, smaller_is_better: false, "
        "time_metric: batches, max_time: 4, max_rungs: 3, divisor: 2, "
        f"max_trials: {TRIALS}, "
        "mode: aggressive, max_concurrent_trials: 1}",
        "hyperparameters.visualization={num_images: 0}",
        "max_restarts=0",
    ]


def test_tune_asha_with_optuna_stops_trials_at_lower_rungs(
    straight: tuple, tmp_path: Path, synthetic_cache: Path, mlflow_server: str
) -> None:
    """Trials of one worker, each training in its own process; HyperOpt's search, on trials of
    two workers, is tests/on_ray/test_tune_workers.py's."""
    tracking = f"data.mlflow={{tracking_uri: {mlflow_server}, experiment_name: tune-optuna}}"
    results = tune_search(
        DEMO,
        [*search_overrides(synthetic_cache), tracking],
        search_alg="optuna",
        output=tmp_path,
        seed=10,
    )
    best = assert_tracked_asha_search(
        results, TRIALS, mlflow_server, "tune-optuna", synthetic_cache, tmp_path / "predicted"
    )
    # A trial's checkpoint has the outputs of a Ray Train run (and so of Determined's, above).
    trained = Path(straight[1].checkpoint.path) / "evaluation"
    searched = best / "evaluation"
    assert sorted(p.name for p in searched.iterdir()) == sorted(p.name for p in trained.iterdir())


def test_bad_input_is_named_before_any_worker_starts(
    local_ray: None, tmp_path: Path, synthetic_cache: Path
) -> None:
    with pytest.raises(ExperimentError, match="searcher.name is 'custom'"):
        tune_search(DEMO, ["searcher={name: custom, metric: bbox_mAP}"], output=tmp_path)
    with pytest.raises(ExperimentError, match="--search-alg hyperopt with searcher.name grid"):
        tune_search(DEMO, ["searcher={name: grid, metric: bbox_mAP}"], search_alg="hyperopt")
    with pytest.raises(ExperimentError, match="Ray sees 2 CPUs and 0 GPUs"):
        train(DEMO, overrides(synthetic_cache), workers=4, output=tmp_path)
    with pytest.raises(ExperimentError, match="searcher.bracket_rungs"):
        tune_search(
            DEMO,
            ["searcher={name: adaptive_asha, metric: bbox_mAP, time_metric: batches, "
             "max_time: 16, max_trials: 4, bracket_rungs: [3, 1]}"],
        )  # fmt: skip


def test_an_unreachable_address_says_so(synthetic_cache: Path) -> None:
    (port,) = free_ports(1)
    command = [sys.executable, "-m", "on_ray", "train", DEMO, "--address", f"127.0.0.1:{port}"]
    command += [arg for item in overrides(synthetic_cache) for arg in ("--set", item)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"on_ray: --address 127.0.0.1:{port}: no Ray cluster"), last
    assert "ray start --head" in last
