"""The evaluation plots' numbers against the COCO references, and the plots themselves.

A generated validation set (bench.coco_data: crowd regions, wrong classes, false positives, an
image with more than 100 detections of a class) evaluated by our evaluator; pycocotools' arrays
and per-image matches are the references.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.coco_data import CATEGORY_IDS, CLASSES, generate, to_samples
from tests.utils.evaluation.generated import SCORE_THR, evaluated_set, reference
from utils.base.errors import ConfigError
from utils.check.experiment import hparam_problems
from utils.evaluation.curves import SEARCH_THRESHOLDS, _per_class_at
from utils.evaluation.evaluator import CocoEvaluator
from utils.evaluation.plots import draw_confusion_matrix, draw_report
from utils.evaluation.report import evaluation_report, plot_settings, report_lines, save_report


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return evaluated_set(tmp_path_factory.mktemp("generated"))


def test_pr_curves_are_the_coco_statistics(evaluated: dict) -> None:
    metrics, report = evaluated["metrics"], evaluated["report"]
    assert set(report["tasks"]) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        curves = report["tasks"][task]["pr_curves"]
        assert len(curves["recall"]) == 101
        at_50, averaged = curves["0.5"]["all"], curves["0.5:0.95"]["all"]
        # The area under the all-class curve (COCO's: the mean over its 101 recall points).
        assert np.mean(at_50["precision"]) == pytest.approx(metrics[f"{task}_mAP_50"], abs=1e-3)
        assert at_50["ap"] == pytest.approx(metrics[f"{task}_mAP_50"], abs=1e-9)
        assert averaged["ap"] == pytest.approx(metrics[f"{task}_mAP"], abs=1e-9)
        assert set(curves["0.5"]["classes"]) == set(CLASSES)
        assert at_50["ap"] > 0.1  # a curve worth drawing

    # Per class, against pycocotools' own arrays (all areas; AP50 at 1000, AP at 100 detections).
    coco_eval = reference(evaluated["ann_file"], evaluated["detections"])
    per_class = report["tasks"]["bbox"]["per_class"]
    for index, cat_id in enumerate(coco_eval.params.catIds):
        name = CLASSES[CATEGORY_IDS.index(cat_id)]
        ap_50 = coco_eval.eval["precision"][0, :, index, 0, 2]
        ap = coco_eval.eval["precision"][:, :, index, 0, 0]
        assert per_class[name]["AP50"] == pytest.approx(ap_50.mean(), abs=1e-6), name
        assert per_class[name]["AP"] == pytest.approx(ap.mean(), abs=1e-6), name
        expected = sum(
            1
            for a in json.loads(evaluated["ann_file"].read_text())["annotations"]
            if a["category_id"] == cat_id and not a["iscrowd"]
        )
        assert per_class[name]["instances"] == expected


def raw_matches(coco_eval: COCOeval, class_index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A class's detection scores and whether each matches an object at IoU 0.5, and its number
    of objects, from pycocotools' per-image matches (all areas; crowd-matched ones left out)."""
    scores, hits, objects = [], [], 0
    for image in coco_eval.evalImgs:
        if image is None or image["category_id"] != coco_eval.params.catIds[class_index]:
            continue
        if image["aRng"] != coco_eval.params.areaRng[0]:
            continue
        kept = ~image["dtIgnore"][0].astype(bool)
        scores += np.array(image["dtScores"])[kept].tolist()
        hits += (image["dtMatches"][0] > 0)[kept].tolist()
        objects += int((~np.asarray(image["gtIgnore"], bool)).sum())
    return np.array(scores), np.array(hits), objects


def raw_f1(coco_eval: COCOeval, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class recall (T, K) and mean F1 (T,) of the detections scoring at least each
    threshold, from the exact (not interpolated) precision and recall."""
    recalls, f1s = [], []
    for k in range(len(coco_eval.params.catIds)):
        scores, hits, objects = raw_matches(coco_eval, k)
        above = scores[None, :] >= thresholds[:, None]
        tp = (above & hits[None, :]).sum(axis=1)
        kept = above.sum(axis=1)
        precision = np.divide(tp, kept, out=np.zeros(len(tp)), where=kept > 0)
        recall = tp / objects
        recalls.append(recall)
        with np.errstate(invalid="ignore"):
            f1s.append(np.nan_to_num(2 * precision * recall / (precision + recall)))
    return np.stack(recalls, axis=1), np.mean(f1s, axis=0)


def test_best_f1_threshold(evaluated: dict) -> None:
    metrics, report = evaluated["metrics"], evaluated["report"]
    curves = report["tasks"]["bbox"]["threshold_curves"]
    best = curves["best"]
    assert (
        metrics["bbox_best_F1"] == best["f1"]
        and metrics["bbox_best_F1_score_thr"] == best["score_thr"]
    )
    assert 0.05 < best["score_thr"] < 1 and 0 < best["f1"] < 1
    # No threshold of the search grid does better.
    arrays = evaluated["metric"].arrays["bbox"]
    _, recall, f1 = _per_class_at(arrays, SEARCH_THRESHOLDS)
    assert f1.mean(axis=1).max() == pytest.approx(best["f1"], abs=1e-12)
    # Against the detections' exact precision and recall (pycocotools' matches at IoU 0.5): the
    # recall is COCO's recall point just below the exact one, and the best thresholds agree.
    coco_eval = reference(evaluated["ann_file"], evaluated["detections"])
    exact_recall, exact_f1 = raw_f1(coco_eval, SEARCH_THRESHOLDS)
    index = int(np.argmin(np.abs(SEARCH_THRESHOLDS - best["score_thr"])))
    assert np.all(exact_recall[index] - 0.01 - 1e-9 <= recall[index])
    assert np.all(recall[index] <= exact_recall[index] + 1e-9)
    assert best["f1"] == pytest.approx(exact_f1.max(), abs=0.01)
    assert exact_f1[index] >= exact_f1.max() - 0.01  # as good a threshold for the exact F1


def reference_matrix(ann_file: Path, detections: list[dict]) -> np.ndarray:
    """The confusion matrix from pycocotools' class-agnostic matching (useCats 0) at IoU 0.5 of
    the detections scoring at least SCORE_THR, crowd regions left out."""
    gt = json.loads(ann_file.read_text())
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    kept = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")}
            for d in detections if d["score"] >= SCORE_THR]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(kept), "bbox")
        coco_eval.params.useCats = 0
        coco_eval.params.iouThrs = np.array([0.5])
        coco_eval.params.maxDets = [10000]
        coco_eval.params.areaRng, coco_eval.params.areaRngLbl = [[0, 1e10]], ["all"]
        coco_eval.evaluate()
    index = {cat_id: k for k, cat_id in enumerate(CATEGORY_IDS)}
    background = len(CLASSES)
    matrix = np.zeros((background + 1, background + 1), np.int64)
    for image in coco_eval.evalImgs:
        if image is None:
            continue
        for dt_id, gt_id in zip(image["dtIds"], image["dtMatches"][0], strict=True):
            dt_class = index[coco_eval.cocoDt.anns[dt_id]["category_id"]]
            if gt_id:
                matrix[index[coco.anns[int(gt_id)]["category_id"]], dt_class] += 1
            else:
                matrix[background, dt_class] += 1
        for gt_id, dt_id in zip(image["gtIds"], image["gtMatches"][0], strict=True):
            if not dt_id:
                matrix[index[coco.anns[gt_id]["category_id"]], background] += 1
    return matrix


def test_confusion_matrix_counts_every_object_and_detection_once(evaluated: dict) -> None:
    confusion = evaluated["report"]["confusion_matrix"]
    counts = np.array(confusion["counts"])
    assert confusion["classes"] == [*CLASSES, "background"]
    assert (confusion["score_thr"], confusion["iou_thr"]) == (SCORE_THR, 0.5)
    objects = [a for a in json.loads(evaluated["ann_file"].read_text())["annotations"]
               if not a["iscrowd"]]  # fmt: skip
    kept = [d for d in evaluated["detections"] if d["score"] >= SCORE_THR]
    background = counts[-1, :-1].sum()
    assert counts.sum() == len(objects) + background
    assert counts[:-1].sum() == len(objects)  # each object: matched once, or missed
    assert counts[:, :-1].sum() == len(kept)  # each detection: an object's, or background
    for k, cat_id in enumerate(CATEGORY_IDS):
        assert counts[k].sum() == sum(1 for a in objects if a["category_id"] == cat_id)
        assert counts[:, k].sum() == sum(1 for d in kept if d["category_id"] == cat_id)
    assert counts[0, 1] + counts[1, 2] + counts[2, 0] > 0  # the generator's wrong classes
    assert counts[-1, -1] == 0
    np.testing.assert_array_equal(
        counts, reference_matrix(evaluated["ann_file"], evaluated["detections"])
    )


def test_plots_decode_and_the_numbers_are_saved(evaluated: dict, tmp_path: Path) -> None:
    report = evaluated["report"]
    drawings = draw_report(report)
    plots = ("pr_curves", "threshold_curves", "errors")
    names = {f"{t}_{p}" for t in ("bbox", "segm") for p in plots}
    assert set(drawings) == names | {"bbox_confusion_matrix"}
    paths = save_report(report, drawings, tmp_path / "evaluation")
    for name, drawing in drawings.items():
        with Image.open(tmp_path / "evaluation" / f"{name}.png") as image:
            assert image.format == "PNG" and image.size == drawing.shape[1::-1]
            assert 400 <= image.size[0] <= 1000 and image.size[1] <= 600, image.size
            pixels = np.asarray(image.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    saved = json.loads((tmp_path / "evaluation" / "report.json").read_text())
    assert tmp_path / "evaluation" / "report.json" in paths
    assert saved["confusion_matrix"] == report["confusion_matrix"]
    best = report["tasks"]["segm"]["threshold_curves"]["best"]
    assert saved["tasks"]["segm"]["threshold_curves"]["best"]["f1"] == pytest.approx(best["f1"])
    lines = report_lines(report)
    assert lines[0].split()[:3] == ["class", "objects", "bbox"]
    assert any(line.startswith("bbox: best F1 ") for line in lines)
    # TIDE's table after the per-class AP: a row per error type, one column per IoU type.
    table = lines[lines.index(next(line for line in lines if line.startswith("TIDE"))) :]
    assert table[1].split() == ["bbox", "segm"] and table[-1].split()[0] == "ECE"
    cost = report["tasks"]["segm"]["tide"]["delta_ap"]["Cls"]
    count = report["tasks"]["segm"]["tide"]["counts"]["Cls"]
    assert table[3].split()[0] == "class" and table[3].endswith(f"{cost:.3f} ({count})")


def test_many_classes_draw_without_labels() -> None:
    """COCO-sized class lists: grey per-class lines, an unlabelled matrix, still small."""
    names = [f"class{i}" for i in range(80)]
    counts = np.random.default_rng(0).integers(0, 5, (81, 81))
    drawing = draw_confusion_matrix(
        {"classes": [*names, "background"], "counts": counts.tolist(), "score_thr": 0.3,
         "iou_thr": 0.5}
    )  # fmt: skip
    assert drawing.shape[1] <= 1700 and drawing.dtype == np.uint8


def test_no_detections_give_zero_f1_and_no_report(evaluated: dict) -> None:
    config = {"type": "CocoMetric", "ann_file": str(evaluated["ann_file"]), "metric": "bbox"}
    evaluator = CocoEvaluator(
        Config({"val_evaluator": config}), backend="hotcoco", meta={"classes": CLASSES}
    )
    records = generate(3).predictions
    for record in records:
        record.update(bboxes=record["bboxes"][:0], scores=record["scores"][:0])
        record.update(labels=record["labels"][:0], masks=[])
    evaluator.update(to_samples(records, with_masks=False))
    metrics = evaluator.compute([evaluator.entries])
    assert metrics["bbox_best_F1"] == metrics["bbox_best_F1_score_thr"] == 0.0
    assert evaluation_report(evaluator.coco_metric()) is None


def test_plot_settings() -> None:
    assert plot_settings({}) == 0.3
    assert plot_settings({"evaluation_plots": {"score_thr": 0.5}}) == 0.5
    assert plot_settings({"evaluation_plots": False}) is None
    with pytest.raises(ConfigError, match=r"evaluation_plots.score_thr is 2: use a number"):
        plot_settings({"evaluation_plots": {"score_thr": 2}})
    with pytest.raises(ConfigError, match=r"evaluation_plots is \{'thr': 0.5\}: use e.g."):
        plot_settings({"evaluation_plots": {"thr": 0.5}})
    # The pre-submission check reports the same.
    (problem,) = hparam_problems({"evaluation_plots": {"score_thr": "high"}}, slots=1)
    assert "evaluation_plots.score_thr is 'high'" in problem
    assert hparam_problems({"evaluation_plots": False}, slots=1) == []
