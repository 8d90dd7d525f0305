"""Streamed evaluation over ranks: each rank's hotcoco stream, merged on the chief, against
pycocotools on the hard cases of the generated set (crowd regions, category ids with gaps,
images without annotations or predictions, an image with more than 100 detections of a class)."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.coco_data import CATEGORY_IDS, CLASSES, to_samples
from tests.utils.evaluation.generated import written_set
from utils.base.errors import ConfigError
from utils.evaluation.evaluator import COCO_ITEMS, CocoEvaluator, streamed_evaluation
from utils.evaluation.report import (
    NOT_STREAMED,
    REPORT_FILE,
    evaluation_report,
    report_lines,
    save_report,
)
from utils.evaluation.validation import VALIDATION_FAILURE, RankValidation, combine

BATCH = 8


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list]:
    ann_file, data = written_set(tmp_path_factory.mktemp("coco"), 60, image_size=128, seed=3)
    return ann_file, data.predictions


def reference(ann_file: str, records: list, iou_type: str) -> COCOeval:
    """pycocotools on its own, with mmdet's maxDets, from the records' boxes or masks."""
    gt = COCO(ann_file)
    results = []
    for record in records:
        for box, score, label, mask in zip(
            record["bboxes"].tolist(), record["scores"].tolist(), record["labels"].tolist(),
            record["masks"], strict=True,
        ):  # fmt: skip
            result = {"image_id": record["img_id"], "category_id": CATEGORY_IDS[label]}
            result["score"] = score
            if iou_type == "bbox":
                result["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            else:  # decoded and encoded again by pycocotools, as its own user would
                result["segmentation"] = mask_utils.encode(mask_utils.decode(mask))
            results.append(result)
    coco_eval = COCOeval(gt, gt.loadRes(results), iou_type)
    coco_eval.params.maxDets = [100, 300, 1000]
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def evaluator_cfg(ann_file: str) -> Config:
    return Config(
        {"val_evaluator": {"type": "CocoMetric", "ann_file": ann_file, "metric": ["bbox", "segm"]}}
    )


def rank(ann_file: str, records: list, streamed: bool) -> CocoEvaluator:
    """One rank's evaluator after its batches."""
    evaluator = CocoEvaluator(
        evaluator_cfg(ann_file), "hotcoco", streamed=streamed, meta={"classes": CLASSES}
    )
    for start in range(0, len(records), BATCH):
        evaluator.update(to_samples(records[start : start + BATCH], with_masks=True))
    return evaluator


def test_streamed_ranks_equal_pycocotools_and_the_gathered_evaluation(generated: tuple) -> None:
    ann_file, records = generated
    # Rank 1 sees one of its images twice (a repeat within a rank is matched once).
    ranks = [
        rank(ann_file, records[0::2], True),
        rank(ann_file, [*records[1::2], records[1]], True),
    ]
    # What the chief gathers: each rank's entries (image ids alone) and its streams' state.
    shares = [pickle.loads(pickle.dumps((r.entries, r.stream_states()))) for r in ranks]
    chief = ranks[0]
    with contextlib.redirect_stdout(io.StringIO()):
        streamed = chief.compute([e for e, _ in shares], [s for _, s in shares])
        gathered = rank(ann_file, records, False)
        batch = gathered.compute([gathered.entries])
    assert streamed["num_images"] == len(records)
    for iou_type in ("bbox", "segm"):
        expected = reference(ann_file, records, iou_type)
        got = [streamed[f"{iou_type}_{item}".replace("@", "_")] for item in COCO_ITEMS]
        assert 0.2 < got[0] < 0.9
        assert got == pytest.approx(expected.stats.tolist(), abs=1e-12), iou_type
        precision = expected.eval["precision"]
        for index, cat_id in enumerate(expected.params.catIds):
            values = precision[:, :, index, 0, -1]
            name = f"{iou_type}_AP_per_class/{CLASSES[CATEGORY_IDS.index(cat_id)]}"
            assert streamed[name] == pytest.approx(values[values > -1].mean(), abs=1e-12)
    assert streamed == batch  # the best-F1 threshold too: the same accumulated arrays

    # The report's curves are the batch evaluation's; what needs every detection is left out.
    report = evaluation_report(chief.coco_metric())
    full = evaluation_report(gathered.coco_metric())
    assert "confusion_matrix" not in report and "tide" not in report["tasks"]["segm"]
    for task in ("bbox", "segm"):
        for part in ("pr_curves", "threshold_curves", "per_class"):
            assert report["tasks"][task][part] == full["tasks"][task][part]


def test_no_detections_stream_zeros(generated: tuple) -> None:
    ann_file, records = generated
    empty = [
        {**r, "bboxes": r["bboxes"][:0], "scores": r["scores"][:0], "labels": r["labels"][:0],
         "masks": []}
        for r in records[:16]
    ]  # fmt: skip
    evaluator = rank(ann_file, empty, True)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = evaluator.compute([evaluator.entries], [evaluator.stream_states()])
    assert metrics["bbox_mAP"] == metrics["segm_mAP"] == metrics["segm_best_F1"] == 0.0
    assert evaluation_report(evaluator.coco_metric()) is None
    assert np.isfinite(list(metrics.values())).all()


def validation(ann_file: str, batches: list[list], streamed: bool) -> tuple[dict, CocoEvaluator]:
    """A validation as the engines run it over 2 ranks: each rank's batches predicted and added
    (`RankValidation`), its share pickled to the chief, `combine` there; the chief's metrics
    and evaluator."""
    ranks = []
    for _ in range(2):
        evaluator = CocoEvaluator(
            evaluator_cfg(ann_file), "hotcoco", streamed=streamed, meta={"classes": CLASSES}
        )
        ranks.append(RankValidation(evaluator))
    for index, records in enumerate(batches):  # dealt round-robin, as the validation loader
        ranks[index % 2].update({}, lambda _, records=records: to_samples(records, with_masks=True))
    shares = [pickle.loads(pickle.dumps(r.share())) for r in ranks]
    assert all(not r.failures for r in ranks)
    if streamed:  # the chief gathers image ids and matches, not detections
        assert all(not any(per_metric) for share in shares for _, per_metric in share.entries)
    with contextlib.redirect_stdout(io.StringIO()):
        return combine(ranks[0].evaluator, shares), ranks[0].evaluator


def test_streamed_validation_over_two_ranks(generated: tuple, tmp_path: Path) -> None:
    ann_file, records = generated
    batches = [records[start : start + BATCH] for start in range(0, len(records), BATCH)]
    streamed, chief = validation(ann_file, batches, streamed=True)
    gathered, gathered_chief = validation(ann_file, batches, streamed=False)
    assert streamed == gathered
    for iou_type in ("bbox", "segm"):
        expected = reference(ann_file, records, iou_type).stats.tolist()
        got = [streamed[f"{iou_type}_{item}".replace("@", "_")] for item in COCO_ITEMS]
        assert got == pytest.approx(expected, abs=1e-12), iou_type

    # The report says what it left out, in report.json and in the lines the log shows.
    report = evaluation_report(chief.coco_metric())
    assert report["not_computed"] == {
        "parts": ["tide", "calibration", "confusion_matrix"],
        "tasks": ["bbox", "segm"],
        "reason": NOT_STREAMED,
    }
    assert "streamed_evaluation: true" in NOT_STREAMED
    assert "confusion_matrix" not in report and "tide" not in report["tasks"]["bbox"]
    assert report_lines(report)[-1] == NOT_STREAMED
    save_report(report, {}, tmp_path)
    assert (
        json.loads((tmp_path / REPORT_FILE).read_text())["not_computed"]["reason"] == NOT_STREAMED
    )
    full = evaluation_report(gathered_chief.coco_metric())
    assert "not_computed" not in full and full["tasks"]["bbox"]["tide"]["ap50"] > 0
    assert NOT_STREAMED not in report_lines(full)


def test_an_image_on_two_ranks_fails_a_streamed_validation(generated: tuple) -> None:
    ann_file, records = generated
    # Ranks 0 and 1 both predict records[4:8]: their streams cannot count it once.
    metrics, _ = validation(ann_file, [records[:8], records[4:12]], streamed=True)
    assert set(metrics) == {VALIDATION_FAILURE}
    assert metrics[VALIDATION_FAILURE].startswith(
        f"Image {records[4]['img_id']!r} was predicted on ranks 0 and 1"
    )
    assert "streamed_evaluation: false" in metrics[VALIDATION_FAILURE]
    gathered, _ = validation(ann_file, [records[:8], records[4:12]], streamed=False)
    assert gathered["num_images"] == 12  # gathered entries count each image once


def test_the_hyperparameter_is_checked(generated: tuple, caplog: pytest.LogCaptureFixture) -> None:
    assert streamed_evaluation(None) is False
    with pytest.raises(ConfigError, match="streamed_evaluation is 'yes': use true"):
        streamed_evaluation("yes")
    with pytest.raises(ConfigError, match="streamed_evaluation is 1"):
        CocoEvaluator(evaluator_cfg(generated[0]), "hotcoco", streamed=1, meta={"classes": CLASSES})
    # pycocotools cannot stream: gathered, and the log says so.
    evaluator = CocoEvaluator(
        evaluator_cfg(generated[0]), "pycocotools", streamed=True, meta={"classes": CLASSES}
    )
    assert evaluator.streams == {}
    assert "CocoMetric is gathered to the chief instead" in caplog.text
