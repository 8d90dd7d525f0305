"""`model_def.py evaluate` and the evaluation plots of a training run, on images of several sizes.

One tiny Mask R-CNN run (2 batches, validated once in one batch of 8) on the generated set whose
validation images are resized to four different sizes: mmdet pads a batch to its largest image,
so only predicting in the validation's batches gives validation's numbers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mmcv
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import model_def
from tests.conftest import TINY_SYNTHETIC, disk_data, train
from utils.data import synthetic

CONFIG = "configs/synthetic/maskrcnn_r18_fpn_synthetic.py"
SIZES = ((128, 128), (160, 96), (96, 144), (200, 120))  # width, height
PLOTS = ("bbox_pr_curves", "bbox_threshold_curves", "segm_pr_curves", "segm_threshold_curves")
PLOTS += ("bbox_errors", "segm_errors", "bbox_confusion_matrix")
STATS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_100", "AR_300", "AR_1000")
STATS += ("AR_s_1000", "AR_m_1000", "AR_l_1000")


def resized_copy(source: Path, target: Path) -> Path:
    """The generated set with its validation images (and their annotations) resized."""
    shutil.copytree(source, target)
    ann_file = target / "annotations" / "instances_val.json"
    coco = json.loads(ann_file.read_text())
    scales = {}
    for index, image in enumerate(coco["images"]):
        width, height = SIZES[index % len(SIZES)]
        scales[image["id"]] = sx, sy = width / image["width"], height / image["height"]
        path = target / "val" / image["file_name"]
        mmcv.imwrite(mmcv.imresize(mmcv.imread(path), (width, height)), str(path))
        image.update(width=width, height=height)
    for ann in coco["annotations"]:
        sx, sy = scales[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x * sx, y * sy, w * sx, h * sy]
        ann["area"] *= sx * sy
        ann["segmentation"] = [
            [v * (sx if i % 2 == 0 else sy) for i, v in enumerate(polygon)]
            for polygon in ann["segmentation"]
        ]
    ann_file.write_text(json.dumps(coco))
    return target


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path) -> dict:
    source = synthetic.ensure_dataset(synthetic_cache, synthetic.SyntheticSpec(**TINY_SYNTHETIC))
    root = resized_copy(source, tmp_path_factory.mktemp("varied") / "coco")
    output = tmp_path_factory.mktemp("varied-run")
    records = train(output, CONFIG, disk_data(root), "--max-batches", "2")
    (checkpoint,) = (output / "determined").iterdir()
    (validation,) = [r["metrics"] for r in records if r["kind"] == "validation"]
    return {
        "root": root,
        "ann_file": root / "annotations" / "instances_val.json",
        "output": output,
        "checkpoint": checkpoint,
        "validation": validation,
    }


def evaluate(run: dict, out: Path, *extra: str, image_root: Path | None = None) -> dict:
    image_root = image_root or run["root"] / "val"
    args = [run["checkpoint"], run["ann_file"], "--image-root", image_root, "--out", out]
    return model_def.main(["evaluate", *map(str, args), "--no-mlflow", *extra])


@pytest.mark.slow
def test_evaluate_gives_the_runs_last_validation(
    run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    validation = run["validation"]
    # Two batches of training: few hits, but not all zeros.
    assert validation["bbox_AR_100"] > 0 and validation["bbox_best_F1_score_thr"] > 0
    capsys.readouterr()
    result = evaluate(run, tmp_path / "test", "--json")
    printed = json.loads(capsys.readouterr().out)  # --json: the metrics alone on stdout
    assert printed == result["metrics"]
    assert result["batch_size"] == 8  # the config's validation batch
    assert result["batches"] == 2
    names = [f"{task}_{stat}" for task in ("bbox", "segm") for stat in STATS]
    names += [n for n in validation if "per_class" in n or "best_F1" in n]
    assert len(names) > 24
    for name in names:
        assert result["metrics"][name] == pytest.approx(validation[name], abs=1e-9), name

    # A batch other than validation's pads the images differently: other predictions.
    default = json.loads((tmp_path / "test" / "results.bbox.json").read_text())
    model_def.main(
        ["predict", str(run["checkpoint"]), str(run["ann_file"]), "--image-root",
         str(run["root"] / "val"), "--out", str(tmp_path / "one"), "--batch-size", "1",
         "--max-rendered", "0"]
    )  # fmt: skip
    single = json.loads((tmp_path / "one" / "results.bbox.json").read_text())
    assert [r["score"] for r in single] != [r["score"] for r in default]


@pytest.mark.slow
def test_evaluate_writes_results_plots_and_tables(
    run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "test"
    result = evaluate(run, out, "--split-name", "holdout", "--max-rendered", "2")
    printed = capsys.readouterr().out
    assert "Evaluated 8 images" in printed and "in batches of 8" in printed
    assert "mAP_50" in printed and "circle" in printed and "bbox: best F1" in printed
    # TIDE's table, after the COCO table: a row per error type, a column per IoU type.
    assert printed.index("TIDE errors") > printed.index("mAP_50")
    assert re.search(r"\nmissed +\d\.\d{3} \(\d+\) +\d\.\d{3} \(\d+\)\n", printed)
    record = json.loads((out / "metrics.json").read_text())
    assert record["split"] == "holdout" and record["batches"] == 2
    assert record["metrics"] == result["metrics"]
    for name in PLOTS:
        image = mmcv.imread(out / "evaluation" / f"{name}.png")
        assert image is not None and image.shape[1] >= 400, name
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report["tasks"]["segm"]["pr_curves"]["0.5"]["all"]["ap"] == pytest.approx(
        result["metrics"]["segm_mAP_50"], abs=1e-6
    )
    objects = len(json.loads(run["ann_file"].read_text())["annotations"])
    counts = np.array(report["confusion_matrix"]["counts"])
    assert counts[:-1].sum() == objects
    tide = report["tasks"]["bbox"]["tide"]
    assert tide["ap50"] == pytest.approx(result["metrics"]["bbox_mAP_50"], abs=1e-6)
    assert report["tasks"]["segm"]["calibration"]["detections"] > 0
    assert len(list((out / "images").iterdir())) == 2
    assert (out / "results.segm.json").is_file() and (out / "images.json").is_file()


@pytest.mark.slow
def test_training_logs_the_plots_to_tensorboard_and_the_checkpoint(run: dict) -> None:
    events = EventAccumulator(str(run["output"] / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = [tag for tag in events.Tags()["images"] if tag.startswith("evaluation/")]
    assert sorted(tags) == sorted(f"evaluation/{name}" for name in PLOTS)
    folder = run["checkpoint"] / "evaluation"
    for name in PLOTS:
        (event,) = events.Images(f"evaluation/{name}")
        assert event.step == 2
        logged = mmcv.imfrombytes(event.encoded_image_string, channel_order="rgb")
        saved = mmcv.imread(folder / f"{name}.png", channel_order="rgb")
        np.testing.assert_array_equal(saved, logged)
    report = json.loads((folder / "report.json").read_text())
    best = report["tasks"]["bbox"]["threshold_curves"]["best"]
    assert best["f1"] == pytest.approx(run["validation"]["bbox_best_F1"], abs=1e-6)


@pytest.mark.slow  # its fixture trains
def test_bad_input_is_named(run: dict, tmp_path: Path) -> None:
    coco = json.loads(run["ann_file"].read_text())
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(SystemExit, match=r"empty.json is empty \(0 bytes\)"):
        evaluate({**run, "ann_file": empty}, tmp_path / "o")
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({**coco, "images": [], "annotations": []}))
    with pytest.raises(SystemExit, match=r"no_images.json lists no images"):
        evaluate({**run, "ann_file": no_images}, tmp_path / "o")
    no_annotations = tmp_path / "no_annotations.json"
    no_annotations.write_text(json.dumps({**coco, "annotations": []}))
    with pytest.raises(SystemExit, match=r"has no annotations: .*use the predict command"):
        evaluate({**run, "ann_file": no_annotations}, tmp_path / "o")
    other = tmp_path / "other_classes.json"
    categories = [{**c, "name": f"other{c['id']}"} for c in coco["categories"]]
    other.write_text(json.dumps({**coco, "categories": categories}))
    with pytest.raises(SystemExit, match=r"3 classes.*are not among them: evaluate on"):
        evaluate({**run, "ann_file": other}, tmp_path / "o")
    broken = tmp_path / "broken"
    shutil.copytree(run["root"] / "val", broken)
    (broken / coco["images"][3]["file_name"]).write_bytes(b"\x89PNG but not really")
    with pytest.raises(SystemExit, match=r"000003.png cannot be decoded.*remove it, and its"):
        evaluate(run, tmp_path / "o", image_root=broken)
