"""MLflow tracking against a real `mlflow server` on loopback, fed by short local trainings."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, TINY_SYNTHETIC, train
from tests.servers import free_port
from utils.experiment.load import ExperimentError, environment_variables
from utils.training.tracking import TrackingError, looks_secret, redact
from utils.training.tracking_settings import mlflow_settings

CONFIG = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
PASSWORDS = ("URI-PASSWORD", "URL-PASSWORD", "HPARAM-TOKEN")  # must appear nowhere in MLflow


@pytest.fixture(scope="module")
def data(synthetic_cache: Path) -> dict:
    return {"backend": "synthetic", "cache_dir": str(synthetic_cache), "synthetic": TINY_SYNTHETIC}


@contextlib.contextmanager
def _captured_output() -> Any:
    """Everything printed or logged meanwhile, as one growing StringIO."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            yield text
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _history(client: Any, run_id: str, name: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, name)]


def _only_run(client: Any, experiment_name: str) -> Any:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name!r}"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"{len(runs)} runs in {experiment_name!r}"
    return runs[0]


@pytest.fixture(scope="module")
def first_run(mlflow_server: str, data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two batches of RetinaNet, tracked through `data.mlflow` (credentials in its URI and a
    secret-looking hyperparameter included); what MLflow holds right after, downloaded."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("first-run")
    section = {
        "tracking_uri": mlflow_server.replace("://", "://alice:URI-PASSWORD@"),
        "experiment_name": "mlflow-test-first",
        "tags": {"team": "vision"},
    }
    with _captured_output() as output:
        records = train(
            tmp / "run",
            CONFIG,
            {**data, "mlflow": section},
            "--max-batches",
            "2",
            "--report-every",
            "1",
        )
    client = MlflowClient(mlflow_server)
    run = _only_run(client, "mlflow-test-first")
    names = ("loss", "loss_cls", "lr", "bbox_mAP", "bbox_mAP_50")
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp / "artifacts")))
    (checkpoint,) = (tmp / "run" / "determined").iterdir()
    return {
        "run": run,
        "history": {name: _history(client, run.info.run_id, name) for name in names},
        "artifacts": artifacts,
        "records": records,
        "checkpoint": checkpoint,
        "output": output.getvalue(),
        "data": {**data, "mlflow": section},
    }


def _files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_run_has_the_trials_params_tags_and_status(first_run: dict) -> None:
    run = first_run["run"]
    assert run.info.status == "FINISHED"
    assert run.info.end_time is not None
    assert run.info.run_name == "demo-maskrcnn-r18-synthetic"  # the experiment's name
    tags = run.data.tags
    assert tags["mlflow.note.content"].startswith("Small Mask R-CNN")  # its description
    assert tags["team"] == "vision"
    assert tags["mmdet.config_file"] == CONFIG
    params = run.data.params
    assert params["config_file"] == CONFIG
    assert params["global_batch_size"] == "4"
    assert float(params["lr"]) == 0.02
    assert params["data.backend"] == "synthetic"
    assert params["data.synthetic.num_train"] == "16"
    assert not any(key.startswith("data.mlflow") for key in params)


def test_params_that_look_secret_are_not_logged(mlflow_server: str) -> None:
    """Runs refuse hyperparameters the trial does not read, so the params that could hold a
    secret are the logged tree's own: a secret-looking name is left out, a URL's login hidden."""
    from mlflow.tracking import MlflowClient

    from utils.training.tracking import MlflowRun
    from utils.training.tracking_settings import MlflowSettings

    run = MlflowRun(MlflowSettings(mlflow_server, "mlflow-test-params"))
    with _captured_output() as output:
        assert run.start("params", "", {})
        run.log_params(
            {
                "lr": 0.02,
                "hub_token": "HPARAM-TOKEN",
                "notes_url": "https://bob:URL-PASSWORD@example.com/notes.json",
            }
        )
        run.end("FINISHED")
    params = _only_run(MlflowClient(mlflow_server), "mlflow-test-params").data.params
    assert params["lr"] == "0.02"
    assert params["notes_url"] == "https://***@example.com/notes.json"
    assert "hub_token" not in params
    assert "not logging params that look like secrets: hub_token" in output.getvalue()
    assert "HPARAM-TOKEN" not in output.getvalue() and "URL-PASSWORD" not in output.getvalue()


def test_no_credential_reaches_mlflow_or_the_log(first_run: dict) -> None:
    run = first_run["run"]
    stored = json.dumps([run.data.params, run.data.tags])
    for password in PASSWORDS:
        assert password not in stored
        assert password not in first_run["output"], f"{password} printed or logged"
    # The tracking URI did carry them: the run was logged through it.
    assert "http://***@127.0.0.1" in first_run["output"]


def test_metrics_are_determineds_at_its_batch_counts(first_run: dict) -> None:
    records, history = first_run["records"], first_run["history"]
    training = [r for r in records if r["kind"] == "training"]
    assert [r["batches"] for r in training] == [1, 2]
    for name in ("loss", "loss_cls", "lr"):
        expected = [(r["batches"], r["metrics"][name]) for r in training]
        assert history[name] == pytest.approx(expected, rel=1e-6), name
    (validation,) = [r for r in records if r["kind"] == "validation"]
    for name in ("bbox_mAP", "bbox_mAP_50"):
        assert history[name] == [(2, pytest.approx(validation["metrics"][name]))], name


def test_artifacts_are_the_config_predictions_and_last_export(first_run: dict) -> None:
    from mmengine.config import Config

    artifacts, checkpoint = first_run["artifacts"], first_run["checkpoint"]
    config = Config.fromfile(artifacts / "config.py")
    assert config.model.type == "RetinaNet"
    assert config.model.bbox_head.num_classes == 3
    # Strict: exactly the last checkpoint's export, and its prediction images under their batch.
    assert _files(checkpoint / "mmdet"), "the export callback wrote nothing"
    assert _files(artifacts / "mmdet") == _files(checkpoint / "mmdet")
    assert _files(checkpoint / "predictions"), "the predictions callback wrote nothing"
    assert _files(artifacts / "predictions" / "batch_0000002") == _files(checkpoint / "predictions")
    assert first_run["run"].data.tags["mmdet_export_batches"] == "2"
    # The evaluation plots when the model detects anything (an untrained RetinaNet may not).
    expected = ["config.py", "mmdet", "predictions"]
    if (checkpoint / "evaluation").is_dir():
        assert _files(artifacts / "evaluation" / "batch_0000002") == _files(
            checkpoint / "evaluation"
        )
        expected.insert(1, "evaluation")
    assert sorted(p.name for p in artifacts.iterdir()) == expected


def test_evaluate_logs_into_the_training_run(
    first_run: dict, mlflow_server: str, tmp_path: Path, synthetic_cache: Path
) -> None:
    """The checkpoint names its run; the MLflow settings are its experiment's (data.mlflow)."""
    from mlflow.tracking import MlflowClient

    import model_def
    from utils.data import synthetic

    root = synthetic.ensure_dataset(synthetic_cache, synthetic.SyntheticSpec(**TINY_SYNTHETIC))
    ann_file = root / "annotations" / "instances_val.json"
    run_id = first_run["run"].info.run_id
    assert json.loads((first_run["checkpoint"] / "mlflow_run.json").read_text())["run_id"] == run_id
    args = [str(first_run["checkpoint"]), str(ann_file), "--image-root", str(root / "val")]
    with _captured_output() as output:
        result = model_def.main(["evaluate", *args, "--out", str(tmp_path / "test")])
    assert result["mlflow_run_id"] == run_id
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # as training left it
    for name in ("bbox_mAP", "bbox_mAP_50", "bbox_AR_100", "bbox_best_F1_score_thr"):
        history = _history(client, run_id, f"test/{name}")
        assert history == [(2, pytest.approx(result["metrics"][name]))], name
    for name in ("bbox_mAP", "bbox_mAP_50"):  # on its validation images: validation's numbers
        ((step, value),) = first_run["history"][name]
        assert _history(client, run_id, f"test/{name}") == [(step, pytest.approx(value, abs=1e-9))]
    assert run.data.tags["test.checkpoint"] == str(first_run["checkpoint"])
    logged = {f.path for f in client.list_artifacts(run_id, "test")}
    assert {"test/metrics.json", "test/results.bbox.json", "test/images.json"} <= logged
    for password in PASSWORDS:
        assert password not in output.getvalue()

    # An export folder alone: a new run, in the environment's experiment.
    export = tmp_path / "export"
    shutil.copytree(first_run["checkpoint"] / "mmdet", export)
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "mlflow-evaluate"}
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        split = ["--split-name", "holdout", "--out", str(tmp_path / "holdout")]
        new = model_def.main(["evaluate", str(export), *args[1:], *split])
    finally:
        for name, value in before.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
    other = _only_run(client, "mlflow-evaluate")
    assert other.info.run_id == new["mlflow_run_id"] != run_id
    assert other.info.status == "FINISHED"
    assert _history(client, other.info.run_id, "holdout/bbox_mAP") == [
        (2, pytest.approx(result["metrics"]["bbox_mAP"]))
    ]


def test_resumed_trial_continues_its_run(
    first_run: dict, mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    run_id = first_run["run"].info.run_id
    train(
        tmp_path / "resumed",
        CONFIG,
        first_run["data"],
        "--max-batches",
        "4",
        "--report-every",
        "1",
        "--resume",
        str(first_run["checkpoint"]),
    )
    client = MlflowClient(mlflow_server)
    run = _only_run(client, "mlflow-test-first")
    assert run.info.run_id == run_id
    assert run.info.status == "FINISHED"
    assert [step for step, _ in _history(client, run_id, "loss")] == [1, 2, 3, 4]
    assert [step for step, _ in _history(client, run_id, "bbox_mAP")] == [2, 4]
    assert run.data.tags["mmdet_export_batches"] == "4"


def test_failing_training_ends_its_run_failed(
    mlflow_server: str, data: dict, tmp_path: Path
) -> None:
    """Enabled through the YAML's environment variables, as a cluster would set them; an LR of
    1e30 makes the second batch's loss NaN, and the trial's guard raises."""
    from mlflow.tracking import MlflowClient

    experiment = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    experiment["environment"] = {
        "environment_variables": {
            "cpu": [f"MLFLOW_TRACKING_URI={mlflow_server}", "MLFLOW_EXPERIMENT_NAME=mlflow-failed"],
            "cuda": [
                f"MLFLOW_TRACKING_URI={mlflow_server}",
                "MLFLOW_EXPERIMENT_NAME=mlflow-failed",
            ],
        }
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
    before = {name: os.environ.pop(name, None) for name in names}
    try:
        with pytest.raises(RuntimeError, match="loss is not finite at batch 2"):
            train(
                tmp_path / "run",
                CONFIG,
                data,
                "--max-batches",
                "3",
                "--report-every",
                "1",
                "--set",
                "hyperparameters.lr=1e30",
                experiment=str(path),
            )
    finally:  # on_determined.local.run_local set them for this process
        for name, value in before.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
    client = MlflowClient(mlflow_server)
    run = _only_run(client, "mlflow-failed")
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    assert [step for step, _ in _history(client, run.info.run_id, "loss")] == [1]


def test_not_enabled_imports_and_logs_nothing(data: dict, tmp_path: Path) -> None:
    """Without data.mlflow or MLFLOW_TRACKING_URI, a training never imports mlflow."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from tests.conftest import train\n"
        f"train(Path(sys.argv[1]), {CONFIG!r}, json.loads(sys.argv[2]), '--max-batches', '1')\n"
        "print('mlflow imported:', 'mlflow' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    cwd = tmp_path / "cwd"  # where MLflow's default store would appear
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run"), json.dumps(data)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlflow imported: False" in result.stdout
    assert "MLflow" not in result.stdout + result.stderr
    assert list(cwd.iterdir()) == []  # no mlruns/ nor mlflow.db


def test_settings_from_section_and_environment() -> None:
    conf = {"name": "exp", "data": {"backend": "synthetic"}}
    assert mlflow_settings(conf, {}) is None
    from_env = mlflow_settings(conf, {"MLFLOW_TRACKING_URI": "http://h:5000"})
    assert (from_env.tracking_uri, from_env.experiment_name) == ("http://h:5000", "exp")
    named = mlflow_settings(conf, {"MLFLOW_TRACKING_URI": "x", "MLFLOW_EXPERIMENT_NAME": "n"})
    assert named.experiment_name == "n"
    section = {**conf, "data": {"mlflow": {"tracking_uri": "http://a", "experiment_name": "s"}}}
    chosen = mlflow_settings(section, {"MLFLOW_TRACKING_URI": "http://b"})
    assert (chosen.tracking_uri, chosen.experiment_name) == ("http://a", "s")
    off = {**conf, "data": {"mlflow": False}}
    assert mlflow_settings(off, {"MLFLOW_TRACKING_URI": "http://b"}) is None
    with pytest.raises(TrackingError, match="data.mlflow: unknown key.*trackinguri"):
        mlflow_settings({"data": {"mlflow": {"trackinguri": "http://a"}}}, {})
    with pytest.raises(TrackingError, match="data.mlflow is 'yes'"):
        mlflow_settings({"data": {"mlflow": "yes"}}, {})


def test_redaction_and_secret_names() -> None:
    assert (
        redact("https://u:p@h/x?X-Amz-Signature=abc&lr=1")
        == "https://***@h/x?X-Amz-Signature=***&lr=1"
    )
    assert redact("configs/a.py") == "configs/a.py"
    for name in ("api_key", "apiKey", "hub_token", "AWS_SECRET_ACCESS_KEY", "db.password"):
        assert looks_secret(name), name
    for name in ("keypoint_weight", "lr", "tokenizer", "num_classes"):
        assert not looks_secret(name), name


def test_section_under_data_passes_determineds_schema() -> None:
    """A top-level `mlflow:` is refused by the master: the section lives under `data`."""
    from tests.expconf import EXPCONF_DIR, sanity_errors

    if not (EXPCONF_DIR / "expconf" / "v0").is_dir():
        pytest.skip(f"Determined's schemas are not at {EXPCONF_DIR}")
    experiment = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    section = {"tracking_uri": "http://mlflow:5000", "experiment_name": "e", "tags": {"a": "b"}}
    assert sanity_errors({**experiment, "data": {**experiment["data"], "mlflow": section}}) == []
    env = {"environment_variables": ["MLFLOW_TRACKING_URI=http://mlflow:5000"]}
    assert sanity_errors({**experiment, "environment": env}) == []
    errors = sanity_errors({**experiment, "mlflow": section})
    assert any("'mlflow' was unexpected" in error for error in errors), errors


def test_unreachable_server_stops_the_start_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from utils.training.tracking import MlflowRun
    from utils.training.tracking_settings import MlflowSettings

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = MlflowRun(MlflowSettings(f"http://u:URI-PASSWORD@127.0.0.1:{free_port()}", "e"))
    with pytest.raises(
        TrackingError, match="check data.mlflow.tracking_uri or MLFLOW_TRACKING_URI"
    ) as err:
        run.start("name", "description", {})
    assert "URI-PASSWORD" not in str(err.value)
    assert "http://***@127.0.0.1" in str(err.value)


def test_environment_variables_as_a_cluster_sets_them() -> None:
    listed = {"environment": {"environment_variables": ["A=1", "B=x=y", "HOST_ONLY"]}}
    assert environment_variables(listed, cuda=False) == {"A": "1", "B": "x=y"}
    per_device = {"environment": {"environment_variables": {"cpu": ["A=cpu"], "gpu": ["A=gpu"]}}}
    assert environment_variables(per_device, cuda=False) == {"A": "cpu"}
    assert environment_variables(per_device, cuda=True) == {"A": "gpu"}  # gpu: cuda's old name
    assert environment_variables({"name": "no environment"}, cuda=False) == {}
    with pytest.raises(ExperimentError, match="'=1' is not KEY=VALUE"):
        environment_variables({"environment": {"environment_variables": ["=1"]}}, cuda=False)
