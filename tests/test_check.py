"""`model_def.py EXPERIMENT --check`: passes on every experiment, names each problem it catches."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

import model_def
from utils.check import check_experiment
from utils.experiment import load_experiment

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_passes(path: Path, synthetic_cache: Path) -> None:
    exp = load_experiment(path, [f"data.cache_dir={synthetic_cache}"])
    summary, problems = check_experiment(exp)
    assert problems == []
    text = "\n".join(summary)
    assert "M parameters" in text and "training length:" in text and "per slot" in text


def maskrcnn() -> dict:
    return copy.deepcopy(load_experiment(REPO / "experiments" / "maskrcnn.yaml"))


def broken(change: str) -> dict:
    exp = maskrcnn()
    hp = exp["hyperparameters"]
    if change == "config":
        hp["config_file"] = "configs/mask_rcnn_typo.py"
    elif change == "override":
        hp["override_mmdet_config"] = {"model.roi_head.bbox_head.num_clases": 3}
    elif change == "batch":
        hp["global_batch_size"] = {"type": "categorical", "vals": [16, 12]}
    elif change == "name":
        hp["learning_rate"] = 0.01
    elif change == "type":
        hp["lr"] = {"type": "categorical", "vals": [0.01, "fast"]}
    elif change == "root":
        del exp["data"]["root"]
    elif change == "mlflow":
        exp["data"]["mlflow"] = {"tracking_url": "http://mlflow:5000"}
    return exp


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("config", "'configs/mask_rcnn_typo.py' not found"),
        ("override", "unknown key 'model.roi_head.bbox_head.num_clases'"),
        ("batch", "global_batch_size 12 does not divide by resources.slots_per_trial 8"),
        ("name", "hyperparameters.learning_rate is not read by the trial"),
        ("type", "hyperparameters.lr must be a number, not 'fast'"),
        ("root", "data.root is not set"),
        ("mlflow", "data.mlflow: unknown key(s) tracking_url"),
    ],
)
def test_broken_variants_are_named(change: str, message: str) -> None:
    _, problems = check_experiment(broken(change))
    assert any(message in problem for problem in problems), problems


def test_mlflow_tracking_is_summarised_without_credentials() -> None:
    exp = maskrcnn()
    exp["data"]["mlflow"] = {"tracking_uri": "https://ann:s3cret@mlflow.example:5000"}
    summary, problems = check_experiment(exp)
    assert problems == []
    (line,) = [line for line in summary if line.startswith("mlflow:")]
    assert "mlflow.example:5000" in line and "s3cret" not in line


def test_command_exits_nonzero_with_the_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text((REPO / "experiments" / "maskrcnn.yaml").read_text())
    with pytest.raises(SystemExit) as exit_info:
        model_def.main([str(path), "--check", "--set", "hyperparameters.global_batch_size=12"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "1 problem(s):" in out and "does not divide by resources.slots_per_trial 8" in out
    with pytest.raises(SystemExit) as exit_info:
        model_def.main([str(path), "--check"])
    assert exit_info.value.code == 0
    assert "OK: ready to submit" in capsys.readouterr().out
