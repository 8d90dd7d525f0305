"""Categories mmdet cannot map one to one (a name of two ids, an id of two names) refused before
training, by the annotation check, `--check` and a run, naming the file, the name and the ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import model_def
from tests.conftest import disk_data, train
from utils.base.errors import AnnotationError
from utils.data.annotations import check_coco_file

RETINANET = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
# The generated set's categories are circle (1), square (2), triangle (3).
REPEATED = "category names repeat ('circle' has ids 1, 3)"


def rename(root: Path, cat_id: int, name: str) -> None:
    """Give category `cat_id` of both annotation files the `name`."""
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        coco = json.loads(path.read_text())
        for category in coco["categories"]:
            if category["id"] == cat_id:
                category["name"] = name
        path.write_text(json.dumps(coco))


def test_a_name_of_two_ids_is_an_error_naming_file_name_and_ids(coco: Path) -> None:
    rename(coco, 3, "circle")
    path = coco / "annotations" / "instances_val.json"
    with pytest.raises(AnnotationError) as error:
        check_coco_file(path)
    assert str(error.value) == (
        f"{path}: {REPEATED}. mmdet finds a class's category by its name, so these ids cannot be "
        "told apart, whether the classes are the file's or named in data.classes: rename the "
        "categories apart (e.g. 'tree_2') or merge their annotations under one id."
    )


def test_every_repeated_name_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    names = {3: "tree", 4: "rock", 7: "tree", 8: "rock", 9: "tree", 5: "bush"}
    categories = [{"id": i, "name": n} for i, n in names.items()]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    with pytest.raises(AnnotationError, match=r"'tree' has ids 3, 7, 9; 'rock' has ids 4, 8\)"):
        check_coco_file(path)


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        (
            [{"id": 3, "name": "tree"}, {"id": 3, "name": "bush"}],
            "category id 3 repeats ('tree' and 'bush'); give each category its own id.",
        ),
        (
            [{"id": "3", "name": "tree"}],
            "category {'id': '3', 'name': 'tree'} needs an integer 'id' and a string 'name'.",
        ),
    ],
)
def test_an_id_of_two_names_or_a_malformed_category_is_an_error(
    tmp_path: Path, categories: list, message: str
) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    with pytest.raises(AnnotationError) as error:
        check_coco_file(path)
    assert str(error.value) == f"{path}: {message}"


@pytest.mark.parametrize("classes", [None, ["circle", "square"]], ids=["file", "data.classes"])
def test_check_refuses_it(
    coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], classes: list | None
) -> None:
    rename(coco, 3, "circle")
    data = disk_data(coco, **({"classes": classes} if classes else {}))
    experiment = {
        "name": "categories",
        "entrypoint": "python3 model_def.py",
        "hyperparameters": {"config_file": RETINANET, "global_batch_size": 4},
        "data": data,
        "searcher": {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False},
        "resources": {"slots_per_trial": 1},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    with pytest.raises(SystemExit) as exit_info:
        model_def.main([str(path), "--check"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    assert f"  - {coco / 'annotations' / 'instances_train.json'}: {REPEATED}." in out, out


def test_a_run_refuses_it_before_training(coco: Path, tmp_path: Path) -> None:
    rename(coco, 3, "circle")
    data = disk_data(coco, classes=["circle"])
    with pytest.raises(AnnotationError, match=r"instances_train.json: category names repeat"):
        train(tmp_path / "run", RETINANET, data, "--max-batches", "1")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
