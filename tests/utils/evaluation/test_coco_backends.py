"""hotcoco against pycocotools: the 12 statistics and per-class AP, on hard cases.

The generated set (bench.coco_data) has crowd regions (RLE and polygons), images without
annotations, several jittered detections per object, false positives, images without
predictions and an image with more than 100 detections of one class.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmdet.structures.mask import encode_mask_results
from mmengine.config import Config
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.coco_data import CATEGORY_IDS, CLASSES, to_samples
from tests.utils.evaluation.generated import written_set
from utils.base.errors import ConfigError
from utils.evaluation.coco_metric import encode_cropped, encode_masks
from utils.evaluation.evaluator import COCO_ITEMS, CocoEvaluator

NUM_IMAGES = 60


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list]:
    folder = tmp_path_factory.mktemp("coco")
    ann_file, data = written_set(folder, NUM_IMAGES, image_size=128, seed=3)
    gt = data.gt
    assert any(a["iscrowd"] and isinstance(a["segmentation"], dict) for a in gt["annotations"])
    assert any(a["iscrowd"] and isinstance(a["segmentation"], list) for a in gt["annotations"])
    annotated = {a["image_id"] for a in gt["annotations"]}
    assert len(annotated) < len(gt["images"])  # images without annotations
    assert any(not len(r["labels"]) for r in data.predictions)  # images without predictions
    assert max(np.bincount(r["labels"]).max() for r in data.predictions if len(r["labels"])) > 100
    return ann_file, data.predictions


def evaluate(ann_file: str, records: list, backend: str, **metric: object) -> dict[str, float]:
    cfg = Config(
        {"val_evaluator": {"type": "CocoMetric", "ann_file": ann_file, "metric": ["bbox", "segm"]}}
    )
    cfg.val_evaluator.update(metric)
    evaluator = CocoEvaluator(cfg, backend, meta={"classes": CLASSES})
    evaluator.update(to_samples(records, with_masks=True))
    return evaluator.compute([evaluator.entries])


def reference(ann_file: str, records: list, iou_type: str) -> COCOeval:
    """pycocotools on its own, from the same predictions (masks encoded by pycocotools)."""
    gt = COCO(ann_file)
    results = []
    for sample in to_samples(records, with_masks=True):
        pred = sample.pred_instances
        masks = pred.masks.numpy().astype(np.uint8)
        for i, (box, score, label) in enumerate(
            zip(pred.bboxes.tolist(), pred.scores.tolist(), pred.labels.tolist(), strict=True)
        ):
            result = {"image_id": sample.img_id, "category_id": CATEGORY_IDS[label], "score": score}
            if iou_type == "bbox":
                result["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            else:
                result["segmentation"] = mask_utils.encode(np.asfortranarray(masks[i]))
            results.append(result)
    coco_eval = COCOeval(gt, gt.loadRes(results), iou_type)
    coco_eval.params.maxDets = [100, 300, 1000]  # mmdet's CocoMetric proposal_nums
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def test_both_backends_equal_pycocotools_on_all_statistics_and_classes(generated: tuple) -> None:
    ann_file, records = generated
    hot = evaluate(ann_file, records, "hotcoco")
    pycoco = evaluate(ann_file, records, "pycocotools")
    assert hot.keys() == pycoco.keys()
    worst = 0.0
    for iou_type in ("bbox", "segm"):
        expected = reference(ann_file, records, iou_type)
        names = [f"{iou_type}_{item}".replace("@", "_") for item in COCO_ITEMS]
        assert 0.2 < expected.stats[0] < 0.9  # a non-trivial result
        # pycocotools' AP at 100 detections differs from the AP at 1000: the crowded image counts.
        at_1000 = expected.eval["precision"][:, :, :, 0, -1]
        assert expected.stats[0] != pytest.approx(at_1000[at_1000 > -1].mean(), abs=1e-4)
        for metrics in (hot, pycoco):
            got = np.array([metrics[name] for name in names])
            worst = max(worst, float(np.abs(got - expected.stats).max()))
            assert got == pytest.approx(expected.stats, abs=1e-12)
        # Per-class AP: the reference's precision, class by class (sorted category ids).
        precision = expected.eval["precision"]
        for index, cat_id in enumerate(expected.params.catIds):
            values = precision[:, :, index, 0, -1]
            ap = values[values > -1].mean()
            name = f"{iou_type}_AP_per_class/{CLASSES[CATEGORY_IDS.index(cat_id)]}"
            assert hot[name] == pytest.approx(ap, abs=1e-12)
            assert pycoco[name] == pytest.approx(ap, abs=1e-12)
    print(f"max abs difference to pycocotools: {worst:.2e}")


def test_classwise_follows_the_config(generated: tuple) -> None:
    ann_file, records = generated
    metrics = evaluate(ann_file, records[:8], "hotcoco", classwise=False)
    assert not [name for name in metrics if "per_class" in name]
    statistics = [name for name in metrics if name.startswith(("bbox_", "segm_"))]
    # The 12 COCO statistics per task, and the best-F1 threshold with its F1, P and R.
    assert len([name for name in statistics if "best_F1" not in name]) == 24
    assert len([name for name in statistics if "best_F1" in name]) == 8


def test_backend_is_checked(generated: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    ann_file, _ = generated
    cfg = Config({"val_evaluator": {"type": "CocoMetric", "ann_file": ann_file}})
    with pytest.raises(ConfigError, match="coco_backend is 'fast'.*hotcoco, pycocotools"):
        CocoEvaluator(cfg, "fast", meta={"classes": CLASSES})
    monkeypatch.setitem(sys.modules, "hotcoco", None)  # as if not installed
    with pytest.raises(ImportError, match="coco_backend is 'hotcoco'.*pycocotools"):
        CocoEvaluator(cfg, "hotcoco", meta={"classes": CLASSES})


def mask_cases() -> list[np.ndarray]:
    """Random masks, all-empty and all-set ones, runs across columns, and blobs with margins."""
    rng = np.random.default_rng(0)
    cases = []
    for n, h, w in ((6, 37, 53), (3, 1, 1), (4, 1, 7), (4, 7, 1), (5, 64, 64)):
        for density in (0.02, 0.5, 0.98):
            masks = rng.random((n, h, w)) < density
            masks[0] = False
            masks[1] = True
            masks[2, :, 0] = True  # a run across the wrap from the last row to the next column
            cases.append(masks)
    for _ in range(100):  # detector-like: each mask within a box, solid or ragged
        h, w = rng.integers(1, 40, 2)
        masks = np.zeros((rng.integers(1, 6), h, w), bool)
        for mask in masks:
            y0, y1 = np.sort(rng.integers(0, h + 1, 2))
            x0, x1 = np.sort(rng.integers(0, w + 1, 2))
            mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < rng.choice([0.3, 1.0])
        cases.append(masks)
    return cases


def test_mask_encoding_equals_mmdet() -> None:
    for masks in mask_cases():
        expected = encode_mask_results(masks)
        assert encode_masks(masks) == expected
        # The accelerator path (crops cut on the device), run here on CPU tensors.
        assert encode_cropped(torch.from_numpy(masks)) == expected
    assert encode_masks(np.zeros((0, 4, 4), bool)) == []
    assert encode_cropped(torch.zeros((0, 4, 4), dtype=torch.bool)) == []


def test_per_class_names_are_grouped(generated: tuple) -> None:
    ann_file, records = generated
    gt = json.loads(Path(ann_file).read_text())
    gt["categories"][0]["name"] = "traffic light"
    renamed = Path(ann_file).with_name("renamed.json")
    renamed.write_text(json.dumps(gt))
    cfg = Config({"val_evaluator": {"type": "CocoMetric", "ann_file": str(renamed)}})
    evaluator = CocoEvaluator(cfg, meta={"classes": ("traffic light", *CLASSES[1:])})
    evaluator.update(to_samples(copy.deepcopy(records[:10]), with_masks=False))
    metrics = evaluator.compute([evaluator.entries])
    assert "bbox_AP_per_class/traffic_light" in metrics
