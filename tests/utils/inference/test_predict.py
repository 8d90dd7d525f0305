"""`model_def.py predict`: batch inference from a trained checkpoint, COCO results, evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import model_def
from tests.conftest import TINY_SYNTHETIC
from utils.data import synthetic

COCO_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_100", "AR_300", "AR_1000")
COCO_NAMES += ("AR_s_1000", "AR_m_1000", "AR_l_1000")


@pytest.fixture
def checkpoint(trained_maskrcnn: Path) -> Path:
    (folder,) = (trained_maskrcnn / "determined").iterdir()
    return folder


@pytest.fixture
def val_root(synthetic_cache: Path) -> Path:
    """The generated dataset the run trained on (the cached one)."""
    return synthetic.ensure_dataset(synthetic_cache, synthetic.SyntheticSpec(**TINY_SYNTHETIC))


def predict(*args: str) -> dict:
    return model_def.main(["predict", *map(str, args)])


def test_predict_on_coco_file_evaluates_as_the_trial(
    trained_maskrcnn: Path, checkpoint: Path, val_root: Path, tmp_path: Path
) -> None:
    ann_file = val_root / "annotations" / "instances_val.json"
    out = tmp_path / "out"
    # Batches of 3 (the trial validated in one batch of 8): the last batch is a partial one.
    summary = predict(
        checkpoint, ann_file, "--image-root", val_root / "val", "--out", out, "--batch-size", 3
    )
    records = (trained_maskrcnn / "metrics.jsonl").read_text().splitlines()
    validation = [json.loads(r) for r in records if json.loads(r)["kind"] == "validation"]
    expected = validation[-1]["metrics"]
    assert expected["bbox_AR_100"] > 0  # the tiny model finds some objects: not all-zero tables
    for task in ("bbox", "segm"):
        for name in COCO_NAMES:
            key = f"{task}_{name}"
            assert summary["metrics"][key] == pytest.approx(expected[key], abs=1e-4), key

    # The written results, evaluated by pycocotools as mmdet's CocoMetric does (max 100/300/1000).
    coco = COCO(str(ann_file))
    for task in ("bbox", "segm"):
        results = json.loads((out / f"results.{task}.json").read_text())
        assert {r["image_id"] for r in results} == set(coco.getImgIds())
        evaluation = COCOeval(coco, coco.loadRes(results), task)
        evaluation.params.maxDets = [100, 300, 1000]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(expected[f"{task}_mAP"], abs=1e-4)
        assert evaluation.stats[8] == pytest.approx(expected[f"{task}_AR_1000"], abs=1e-4)

    index = json.loads((out / "images.json").read_text())
    ids = [image["id"] for image in index["images"]]
    assert ids == [image["id"] for image in json.loads(ann_file.read_text())["images"]]
    assert summary["images"] == len(ids) == TINY_SYNTHETIC["num_val"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"{image['id']}_{Path(image['file_name']).stem}.png" for image in index["images"]
    ]


def test_predict_on_folders(checkpoint: Path, val_root: Path, tmp_path: Path) -> None:
    images = tmp_path / "in"
    for sub in ("a", "b/c"):  # the same file names in two folders, one nested
        (images / sub).mkdir(parents=True)
        for name in ("000000.png", "000001.png"):
            shutil.copy(val_root / "val" / name, images / sub / name)
    (images / "a" / "notes.txt").write_text("not an image: not picked up")
    out = tmp_path / "out"
    summary = predict(
        checkpoint, images, "--out", out, "--batch-size", 2, "--device", "cpu", "--max-rendered", 3
    )

    index = json.loads((out / "images.json").read_text())
    expected = [images / "a" / "000000.png", images / "a" / "000001.png"]
    expected += [images / "b" / "c" / "000000.png", images / "b" / "c" / "000001.png"]
    assert index["images"] == [{"id": i, "file_name": str(p)} for i, p in enumerate(expected)]
    assert index["categories"] == [
        {"id": 1, "name": "circle"},
        {"id": 2, "name": "square"},
        {"id": 3, "name": "triangle"},
    ]
    results = json.loads((out / "results.bbox.json").read_text())
    assert summary["detections"] == len(results) > 0
    # Copies of one image get the same predictions.
    same = [[(r["category_id"], r["bbox"]) for r in results if r["image_id"] == i] for i in (0, 2)]
    assert same[0] == same[1]
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "0_000000.png",
        "1_000001.png",
        "2_000000.png",
    ]
    assert summary["metrics"] == {}


def test_predict_names_a_bad_checkpoint(val_root: Path, tmp_path: Path) -> None:
    image = val_root / "val" / "000000.png"
    with pytest.raises(SystemExit, match=r"Checkpoint .*missing does not exist"):
        predict(tmp_path / "missing", image, "--out", tmp_path / "out")
    determined_only = tmp_path / "old-checkpoint"
    determined_only.mkdir()
    (determined_only / "state_dict.pth").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"without an mmdet export.*model_def.py export"):
        predict(determined_only, image, "--out", tmp_path / "out")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.py").write_text("model = dict(type='RetinaNet')\n")
    (corrupt / "model.pth").write_bytes(b"not a torch file")
    with pytest.raises(SystemExit, match=r"corrupt/model.pth cannot be loaded.*re-export"):
        predict(corrupt, image, "--out", tmp_path / "out")


def test_undecodable_image_fails_or_is_skipped(
    checkpoint: Path, val_root: Path, tmp_path: Path
) -> None:
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(val_root / "val" / "000000.png", images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(SystemExit, match=r"broken.png cannot be decoded.*--skip-bad-images"):
        predict(checkpoint, images, "--out", tmp_path / "out")

    out = tmp_path / "skipped"
    summary = predict(checkpoint, images, "--out", out, "--skip-bad-images")
    assert summary["images"] == 1
    assert summary["skipped"] == [str(images / "broken.png")]
    index = json.loads((out / "images.json").read_text())
    assert index["images"] == [{"id": 1, "file_name": str(images / "good.png")}]
    assert index["skipped"] == [str(images / "broken.png")]
    assert {r["image_id"] for r in json.loads((out / "results.bbox.json").read_text())} == {1}


def test_class_mismatch_is_an_error(checkpoint: Path, val_root: Path, tmp_path: Path) -> None:
    coco = json.loads((val_root / "annotations" / "instances_val.json").read_text())
    coco["categories"] = [c for c in coco["categories"] if c["name"] != "triangle"]
    kept = {c["id"] for c in coco["categories"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in kept]
    ann_file = tmp_path / "two_classes.json"
    ann_file.write_text(json.dumps(coco))
    with pytest.raises(SystemExit, match=r"3 classes.*2 categories.*\['triangle'\]"):
        predict(checkpoint, ann_file, "--image-root", val_root / "val", "--out", tmp_path / "o")
