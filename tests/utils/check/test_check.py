"""`model_def.py EXPERIMENT --check`: passes on every experiment, names each problem it catches."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest

import model_def
from on_determined.context import DETERMINED_RULES, context_problem
from tests.conftest import disk_data
from utils.check.experiment import check_experiment
from utils.experiment.load import load_experiment

REPO = Path(__file__).resolve().parents[3]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_passes(path: Path, synthetic_cache: Path) -> None:
    exp = load_experiment(path, [f"data.cache_dir={synthetic_cache}"])
    summary, problems = check_experiment(exp, DETERMINED_RULES)
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
    _, problems = check_experiment(broken(change), DETERMINED_RULES)
    assert any(message in problem for problem in problems), problems


def test_mlflow_tracking_is_summarised_without_credentials() -> None:
    exp = maskrcnn()
    exp["data"]["mlflow"] = {"tracking_uri": "https://ann:s3cret@mlflow.example:5000"}
    summary, problems = check_experiment(exp, DETERMINED_RULES)
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


# A real pre-flight: data on this machine is read as the trial reads it.

DEMO_CONFIG = "configs/synthetic/maskrcnn_r18_fpn_synthetic.py"


def on_disk(root: Path, **extra: object) -> dict:
    """maskrcnn.yaml with the demo's small model, on the COCO set at `root`, 8 images a batch."""
    exp = maskrcnn()
    exp["hyperparameters"].update(config_file=DEMO_CONFIG, global_batch_size=8)
    exp["resources"] = {"slots_per_trial": 1}
    exp["data"] = disk_data(root, **extra)
    return exp


def edit_annotations(root: Path, change: Callable[[dict], None]) -> None:
    path = root / "annotations" / "instances_train.json"
    ann = json.loads(path.read_text())
    change(ann)
    path.write_text(json.dumps(ann))


def test_local_coco_set_is_read_as_the_trial_reads_it(coco: Path) -> None:
    summary, problems = check_experiment(on_disk(coco), DETERMINED_RULES)
    assert problems == []
    text = "\n".join(summary)
    assert "classes: 3 (circle, square, triangle), from the annotation file's categories" in text
    assert "classes: 80" not in text
    assert f"data: disk {coco}: 16 training images (after mmdet's filtering), 8 validation" in text
    # The demo config: 12 epochs, validated at the end; 16 images / 8 = 2 batches an epoch.
    assert "training length: 12 epochs = 24 batches (2 per epoch of 16 images / 8)" in text
    assert "validation every 24 batches" in text
    assert "not checked here" not in text


def test_data_classes_are_reported_from_the_data(coco: Path) -> None:
    summary, problems = check_experiment(
        on_disk(coco, classes=["triangle", "circle"]), DETERMINED_RULES
    )
    assert problems == []
    assert "classes: 2 (triangle, circle), from data.classes" in "\n".join(summary)


def test_missing_data_root_is_a_problem(tmp_path: Path) -> None:
    _, problems = check_experiment(on_disk(tmp_path / "nowhere"), DETERMINED_RULES)
    (problem,) = [p for p in problems if "data.root" in p]
    assert f"data.root {tmp_path / 'nowhere'} does not exist on this machine" in problem
    assert "bind_mounts" in problem


def test_data_mounted_on_the_agents_is_named_as_not_checked(tmp_path: Path) -> None:
    exp = on_disk(tmp_path / "nowhere" / "coco")
    exp["bind_mounts"] = [{"host_path": "/mnt/coco", "container_path": str(tmp_path / "nowhere")}]
    summary, problems = check_experiment(exp, DETERMINED_RULES)
    assert problems == []
    text = "\n".join(summary)
    assert "the agents mount it from /mnt/coco): annotation files, image files, classes" in text
    assert "classes: the annotation file's categories (not read here)" in text
    assert "batches per epoch: training images / 8" in text


def test_coco_experiment_elsewhere_prints_no_defaults() -> None:
    summary, problems = check_experiment(
        maskrcnn(), DETERMINED_RULES
    )  # /data/coco, bind-mounted, absent here
    assert problems == []
    text = "\n".join(summary)
    assert "classes: 80" not in text and "person" not in text
    assert "not checked here (data.root /data/coco is not on this machine" in text


def test_gcs_data_is_not_read() -> None:
    exp = maskrcnn()
    exp["data"] = {"backend": "gcs", "bucket": "my-bucket", "prefix": "coco"}
    summary, problems = check_experiment(exp, DETERMINED_RULES)
    assert problems == []
    assert "not checked here (data on GCS (gs://my-bucket/coco) was not read)" in "\n".join(summary)


def _not_json(root: Path) -> None:
    (root / "annotations" / "instances_train.json").write_text("{not json")


def _unknown_category(root: Path) -> None:
    edit_annotations(root, lambda ann: ann["annotations"][0].update(category_id=99))


def _three_number_bbox(root: Path) -> None:
    edit_annotations(root, lambda ann: ann["annotations"][0].update(bbox=[1, 2, 3]))


def _missing_image(root: Path) -> None:
    (root / "train" / "000000.png").unlink()


def _empty_image(root: Path) -> None:
    (root / "val" / "000001.png").write_bytes(b"")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_not_json, "instances_train.json: cannot read it as JSON"),
        (_unknown_category, "has category_id 99, not among the categories"),
        (_three_number_bbox, "bbox [1, 2, 3] is not [x, y, width, height]"),
        (_missing_image, "data.train_img_prefix: 1 of 16 train images are missing or empty"),
        (_empty_image, "data.val_img_prefix: 1 of 8 val images are missing or empty"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_bad_data_is_a_problem(coco: Path, damage: Callable[[Path], None], message: str) -> None:
    damage(coco)
    _, problems = check_experiment(on_disk(coco), DETERMINED_RULES)
    assert any(message in problem for problem in problems), problems


def test_data_classes_must_be_in_the_file(coco: Path) -> None:
    _, problems = check_experiment(on_disk(coco, classes=["circle", "hexagon"]), DETERMINED_RULES)
    assert any("data.classes names ['hexagon']" in problem for problem in problems), problems


def test_missing_image_folder_names_the_key(coco: Path) -> None:
    _, problems = check_experiment(on_disk(coco, val_img_prefix="nowhere/"), DETERMINED_RULES)
    assert any(p.startswith("data.val_img_prefix: image folder") for p in problems), problems


# What a Determined 0.38.1 master rejects.


@pytest.mark.parametrize(
    ("searcher", "message"),
    [
        ({"name": "bayes"}, "searcher.name 'bayes' is not a searcher of Determined 0.38.1"),
        (
            {"name": "adaptive_asha", "max_trials": 16},
            "the adaptive_asha searcher needs max_time and time_metric",
        ),
        ({"metrc": "segm_mAP"}, "searcher.metrc is not a searcher key; did you mean metric?"),
        (
            {"max_time": 12, "time_metric": "records"},
            "searcher.max_time is not a key of the single",
        ),
    ],
)
def test_searchers_a_master_rejects(searcher: dict, message: str) -> None:
    exp = maskrcnn()
    exp["searcher"].update(searcher)
    _, problems = check_experiment(exp, DETERMINED_RULES)
    assert any(message in problem for problem in problems), problems


def test_asha_time_metric_must_be_one_the_trial_reports() -> None:
    exp = maskrcnn()
    exp["searcher"].update(name="adaptive_asha", max_trials=4, max_time=12, time_metric="records")
    _, problems = check_experiment(exp, DETERMINED_RULES)
    assert any("searcher.time_metric is 'records'" in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("hyperparameters", "lr", {"type": "log", "minval": -3, "maxval": -1}, "needs base"),
        ("hyperparameters", "lr", {"type": "double", "minval": 1, "maxval": 0}, "less than maxval"),
        ("resources", "slots_per_trial", -1, "resources.slots_per_trial is -1"),
        ("resources", "shm_size", "16 gigs", "resources.shm_size is '16 gigs'"),
    ],
)
def test_hyperparameters_and_resources_a_master_rejects(
    section: str, key: str, value: object, message: str
) -> None:
    exp = maskrcnn()
    exp[section][key] = value
    _, problems = check_experiment(exp, DETERMINED_RULES)
    assert any(message in problem for problem in problems), problems


# Typos are errors.


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "hyperparameters.lrr=0.01",
            "hyperparameters.lrr is not read by the trial; did you mean lr?",
        ),
        ("data.clases=[person]", "data.clases is not a data key; did you mean classes?"),
        (
            "data.val_annotation=a.json",
            "data.val_annotation is not a data key; did you mean val_ann?",
        ),
        ("searcher.metrc=bbox_mAP", "searcher.metrc is not a searcher key; did you mean metric?"),
    ],
)
def test_typos_are_problems(override: str, message: str) -> None:
    exp = load_experiment(REPO / "experiments" / "maskrcnn.yaml", [override])
    summary, problems = check_experiment(exp, DETERMINED_RULES)
    assert any(message in problem for problem in problems), problems
    assert summary  # the rest is still checked


def test_missing_merge_config_is_named_as_merge_config() -> None:
    exp = maskrcnn()
    exp["hyperparameters"]["merge_config"] = "configs/extra_typo.py"
    _, problems = check_experiment(exp, DETERMINED_RULES)
    assert any(
        p.startswith("hyperparameters.merge_config: config 'configs/extra_typo.py' not found")
        for p in problems
    ), problems


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("{tmp}/extra.py", "is outside the repository"),
        ("{repo}/configs/maskrcnn_r50_fpn_1x_coco.py", "is an absolute path"),
        (
            "configs/../../{dir}/configs/maskrcnn_r50_fpn_1x_coco.py",
            "leaves the folder through '..'",
        ),
        (
            "tests/toy/toy_synthetic.py",
            "is left out of the uploaded context by .detignore (tests/)",
        ),
    ],
)
def test_config_outside_the_uploaded_context_is_a_problem(
    tmp_path: Path, name: str, message: str
) -> None:
    (tmp_path / "extra.py").write_text("model = dict(backbone=dict(depth=50))\n")
    name = name.format(tmp=tmp_path, repo=REPO, dir=REPO.name)
    exp = maskrcnn()
    exp["hyperparameters"]["merge_config"] = name
    _, problems = check_experiment(exp, DETERMINED_RULES)
    hits = [p for p in problems if p.startswith(f"hyperparameters.merge_config: {name} ")]
    assert hits and message in hits[0], problems
    assert "Determined uploads" in hits[0] or "container" in hits[0] or "configs/" in hits[0]


def test_configs_in_the_repository_and_mmdet_configs_are_uploaded() -> None:
    for name in (
        "configs/maskrcnn_r50_fpn_1x_coco.py",
        "configs/../configs/gfl_r50_fpn_1x_coco.py",
    ):
        assert context_problem("config_file", name, REPO / name) is None
    exp = maskrcnn()
    exp["hyperparameters"]["config_file"] = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
    assert check_experiment(exp, DETERMINED_RULES)[1] == []
