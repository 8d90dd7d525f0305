"""TIDE, calibration and the confusion matrix's source (utils/evaluation/diagnostics.py) against
pycocotools' per-image matches, on the generated set of tests/utils/evaluation/generated.py
(crowd regions, wrong classes, duplicates, false positives)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from mmengine.config import Config
from pycocotools.cocoeval import COCOeval

from bench.coco_data import CLASSES, to_samples
from tests.utils.evaluation.generated import SCORE_THR, evaluated_set, reference
from utils.evaluation.evaluator import CocoEvaluator
from utils.evaluation.report import evaluation_report


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return evaluated_set(tmp_path_factory.mktemp("generated"))


def all_matches(coco_eval: COCOeval) -> tuple[np.ndarray, np.ndarray, int]:
    """Every class's detection scores, whether each matches an object at IoU 0.5, and the
    objects no detection matched: pycocotools' per-image matches (all areas, the largest
    maxDets; crowd-matched detections and crowd objects left out)."""
    scores, hits, missed = [], [], 0
    for image in coco_eval.evalImgs:
        if image is None or image["aRng"] != coco_eval.params.areaRng[0]:
            continue
        kept = ~image["dtIgnore"][0].astype(bool)
        scores += np.array(image["dtScores"])[kept].tolist()
        hits += (image["dtMatches"][0] > 0)[kept].tolist()
        objects = ~np.asarray(image["gtIgnore"], bool)
        missed += int(((image["gtMatches"][0] == 0) & objects).sum())
    return np.array(scores), np.array(hits, dtype=float), missed


@pytest.mark.parametrize("task", ["bbox", "segm"])
def test_calibration_and_tide_from_pycocotools_matches(evaluated: dict, task: str) -> None:
    """hotcoco's calibration equals ours from pycocotools' matches; TIDE's errors add up."""
    report = evaluated["report"]["tasks"][task]
    detections = evaluated["detections" if task == "bbox" else "masks"]
    scores, hits, missed = all_matches(reference(evaluated["ann_file"], detections, task))
    calibration = report["calibration"]
    assert calibration["detections"] == len(scores)
    bins = np.minimum((scores * 10).astype(int), 9)  # 10 bins of 0.1, a score of 1 in the last
    ece = 0.0
    for k, got in enumerate(calibration["bins"]):
        inside = bins == k
        assert got["count"] == inside.sum() and (got["lower"], got["upper"]) == pytest.approx(
            (k / 10, (k + 1) / 10), abs=1e-12
        )
        if inside.any():
            assert got["accuracy"] == pytest.approx(hits[inside].mean(), abs=1e-12)
            assert got["confidence"] == pytest.approx(scores[inside].mean(), abs=1e-12)
            ece += inside.mean() * abs(hits[inside].mean() - scores[inside].mean())
    assert calibration["ece"] == pytest.approx(ece, abs=1e-12) and 0.05 < ece < 0.5
    tide = report["tide"]
    assert tide["ap50"] == pytest.approx(evaluated["metrics"][f"{task}_mAP_50"], abs=1e-12)
    # Every false positive at IoU 0.5 has one error type; misses are objects no error explains.
    false_positives = sum(tide["counts"][e] for e in ("Cls", "Loc", "Both", "Dupe", "Bkg"))
    assert false_positives == int((1 - hits).sum())
    assert 0 < tide["counts"]["Miss"] <= missed
    assert all(0 <= cost <= 1 - tide["ap50"] for cost in tide["delta_ap"].values())
    assert tide["delta_ap"]["Dupe"] > 0 and tide["delta_ap"]["Cls"] > 0  # the generator's errors


def test_the_pycocotools_engine_gives_the_same_report(evaluated: dict) -> None:
    """With the reference engine, hotcoco evaluates the same detections again for the report."""
    config = {"type": "CocoMetric", "ann_file": str(evaluated["ann_file"]), "metric": "bbox"}
    evaluator = CocoEvaluator(
        Config({"val_evaluator": config}), backend="pycocotools", meta={"classes": CLASSES}
    )
    evaluator.update(to_samples(evaluated["samples"], with_masks=False))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.compute([evaluator.entries])
    report = evaluation_report(evaluator.coco_metric(), SCORE_THR)
    expected = evaluated["report"]
    assert report["confusion_matrix"] == expected["confusion_matrix"]
    for part in ("tide", "calibration", "per_class"):
        got, want = leaves(report["tasks"]["bbox"][part]), leaves(expected["tasks"]["bbox"][part])
        assert got.keys() == want.keys() and got == pytest.approx(want, abs=1e-12), part


def leaves(value: object, path: str = "") -> dict[str, float]:
    """A nested report part as {path: number}."""
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in leaves(item, f"{path}/{key}").items()
        }
    if isinstance(value, list):
        return {
            k: v for i, item in enumerate(value) for k, v in leaves(item, f"{path}/{i}").items()
        }
    return {path: value}
