from __future__ import annotations

import math
from pathlib import Path

import pytest

from utils.experiment.load import ExperimentError, load_experiment, local_hparams, training_length

REPO = Path(__file__).resolve().parents[3]


def test_set_overrides_dotted_paths_with_yaml_values(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("hyperparameters:\n  lr: 0.02\ndata:\n  backend: disk\n")
    config = load_experiment(
        path, ["data.backend=synthetic", "hyperparameters.lr=0.01", "data.synthetic.seed=3"]
    )
    assert config["data"] == {"backend": "synthetic", "synthetic": {"seed": 3}}
    assert config["hyperparameters"]["lr"] == 0.01


@pytest.mark.parametrize(
    ("item", "message"),
    [("novalue", "dotted.key=value"), ("data.backend.x=1", "data.backend is 'disk'")],
)
def test_bad_set_overrides_are_explained(tmp_path: Path, item: str, message: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  backend: disk\n")
    with pytest.raises(ExperimentError, match=message):
        load_experiment(path, [item])


def test_missing_experiment_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="nothere.yaml does not exist"):
        load_experiment(tmp_path / "nothere.yaml")


def test_local_hparams_pick_constants_and_representative_values() -> None:
    resolved = local_hparams(
        {
            "plain": 3,
            "const": {"type": "const", "val": {"a": 1}},
            "cat": {"type": "categorical", "vals": [16, 32]},
            "int": {"type": "int", "minval": 2, "maxval": 5},
            "double": {"type": "double", "minval": 0.0, "maxval": 1.0},
            "log": {"type": "log", "base": 10, "minval": -4, "maxval": -2},
            "group": {"inner": {"type": "const", "val": 7}},
        }
    )
    assert resolved["plain"] == 3 and resolved["const"] == {"a": 1}
    assert resolved["cat"] == 16 and resolved["int"] == 4 and resolved["double"] == 0.5
    assert math.isclose(resolved["log"], 1e-3)
    assert resolved["group"] == {"inner": 7}


def test_unknown_hyperparameter_type_is_named() -> None:
    with pytest.raises(ExperimentError, match="hyperparameters.x: unknown type 'gauss'"):
        local_hparams({"x": {"type": "gauss"}})


def test_training_length_from_searcher() -> None:
    assert training_length({"name": "single"}) is None
    assert training_length({"max_time": 500, "time_metric": "batches"}) == (500, "batches")
    assert training_length({"max_length": {"epochs": 12}}) == (12, "epochs")
    with pytest.raises(ExperimentError, match="time_metric"):
        training_length({"max_time": 5, "time_metric": "records"})


def test_every_experiment_yaml_loads() -> None:
    paths = sorted((REPO / "experiments").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        config = load_experiment(path)
        hparams = local_hparams(config["hyperparameters"])
        assert (REPO / hparams["config_file"]).is_file(), path
        assert config["searcher"]["metric"] in ("bbox_mAP", "segm_mAP", "voc_mAP"), path


def test_mmdet_mappings_with_type_are_wrapped_in_const() -> None:
    overrides = {"a.b": {"type": "const", "val": {"type": "Resize", "scale": [64, 64]}}, "c": 1}
    assert local_hparams({"override_mmdet_config": overrides}) == {
        "override_mmdet_config": {"a.b": {"type": "Resize", "scale": [64, 64]}, "c": 1}
    }
    with pytest.raises(ExperimentError, match=r"wrap an mmdet config mapping as \{type: const"):
        local_hparams({"override_mmdet_config": {"a.b": {"type": "Resize"}}})


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\ndata:\n  backend: disk\n   root: /data\n")
    with pytest.raises(ExperimentError, match=rf"{path} is not valid YAML \(line 4, column 8: "):
        load_experiment(path)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("data.classes=[a, b", r"--set 'data.classes=\[a, b': the value is not valid YAML \(line"),
        ("data..root=/x", "dotted.key=value"),
        ("=3", "dotted.key=value"),
    ],
)
def test_set_values_and_keys_are_checked(tmp_path: Path, item: str, message: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  backend: disk\n")
    with pytest.raises(ExperimentError, match=message):
        load_experiment(path, [item])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "int", "minval": 1}, "hyperparameters.x: an int hyperparameter needs maxval"),
        ({"type": "log", "minval": -4, "maxval": -2}, "a log hyperparameter needs base"),
        ({"type": "double", "minval": 2, "maxval": 1}, "minval 2 must be less than maxval 1"),
        ({"type": "categorical", "vals": []}, "categorical vals is empty"),
        ({"type": "const", "value": 3}, "did you mean val?"),
    ],
)
def test_specs_a_master_rejects_are_named_locally(spec: dict, message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        local_hparams({"x": spec})
