"""COCO evaluation: parity with pycocotools, each image counted once across ranks, flat metrics.

The backends against each other on harder cases: tests/utils/evaluation/test_coco_backends.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.evaluation.evaluator import COCO_ITEMS, CocoEvaluator, flatten_metrics
from utils.training.plan import build_config

DEMO = "configs/synthetic/maskrcnn_r18_fpn_synthetic.py"


@pytest.fixture
def evaluator_and_gt(synthetic_data: dict) -> tuple[CocoEvaluator, COCO]:
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = build_config({"config_file": DEMO, "global_batch_size": 2}, synthetic_data)
    evaluator = CocoEvaluator(cfg, meta={"classes": ("circle", "square", "triangle")})
    return evaluator, COCO(cfg.val_evaluator.ann_file)


def noisy_predictions(coco: COCO, seed: int = 0) -> list[DetDataSample]:
    """Ground truth jittered, with misses, a wrong class and false positives; exact masks."""
    rng = np.random.default_rng(seed)
    samples = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.imgs[img_id]
        boxes, scores, labels, masks = [], [], [], []
        for ann in coco.imgToAnns[img_id]:
            if rng.random() < 0.15:
                continue  # a missed object
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 2.0, 4)
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            scores.append(rng.uniform(0.3, 1.0))
            label = ann["category_id"] - 1
            labels.append(label if rng.random() > 0.1 else (label + 1) % 3)
            masks.append(coco.annToMask(ann).astype(bool))
        for _ in range(rng.integers(0, 3)):  # false positives
            x, y = rng.uniform(0, info["width"] - 20, 2)
            boxes.append([x, y, x + 20, y + 20])
            scores.append(rng.uniform(0.05, 0.5))
            labels.append(int(rng.integers(3)))
            mask = np.zeros((info["height"], info["width"]), bool)
            mask[int(y) : int(y) + 20, int(x) : int(x) + 20] = True
            masks.append(mask)
        sample = DetDataSample(
            metainfo={"img_id": img_id, "ori_shape": (info["height"], info["width"])}
        )
        sample.pred_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            scores=torch.tensor(scores, dtype=torch.float32),
            labels=torch.tensor(labels, dtype=torch.int64),
            masks=torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, 1, 1, dtype=bool),
        )
        samples.append(sample)
    return samples


def pycocotools_stats(coco: COCO, samples: list[DetDataSample], iou_type: str) -> np.ndarray:
    results = []
    for sample in samples:
        pred = sample.pred_instances
        for box, score, label, mask in zip(
            pred.bboxes.tolist(),
            pred.scores.tolist(),
            pred.labels.tolist(),
            pred.masks.numpy(),
            strict=True,
        ):
            x1, y1, x2, y2 = box
            result = {"image_id": sample.img_id, "category_id": label + 1, "score": score}
            if iou_type == "bbox":
                result["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                result["segmentation"] = rle
            results.append(result)
    coco_eval = COCOeval(coco, coco.loadRes(results), iou_type)
    coco_eval.params.maxDets = [100, 300, 1000]  # mmdet's CocoMetric default proposal_nums
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats


def test_all_twelve_statistics_match_pycocotools(evaluator_and_gt: tuple) -> None:
    evaluator, coco = evaluator_and_gt
    samples = noisy_predictions(coco)
    evaluator.update(samples)
    metrics = evaluator.compute([evaluator.entries])
    assert metrics["num_images"] == len(coco.getImgIds())
    for iou_type in ("bbox", "segm"):
        expected = pycocotools_stats(coco, samples, iou_type)
        got = [metrics[f"{iou_type}_{item}".replace("@", "_")] for item in COCO_ITEMS]
        assert 0.2 < got[0] < 0.95  # a non-trivial result, neither empty nor perfect
        assert got == pytest.approx(expected.tolist(), abs=1e-12)  # unrounded, unlike mmdet's


def test_each_image_counts_once_across_ranks(evaluator_and_gt: tuple) -> None:
    evaluator, coco = evaluator_and_gt
    samples = noisy_predictions(coco, seed=1)
    evaluator.update(samples)
    single = evaluator.compute([evaluator.entries])
    evaluator.reset()
    # Rank 1 repeats two of rank 0's images, as padding of a distributed sampler would.
    evaluator.update(samples[:5])
    rank0 = evaluator.entries
    evaluator.reset()
    evaluator.update(samples[5:] + samples[:2])
    rank1 = evaluator.entries
    assert len(rank0) + len(rank1) == len(samples) + 2
    assert evaluator.compute([rank0, rank1]) == single


def test_no_detections_reports_zero_not_missing(evaluator_and_gt: tuple) -> None:
    evaluator, coco = evaluator_and_gt
    empty = noisy_predictions(coco)
    for sample in empty:
        sample.pred_instances = sample.pred_instances[:0]
    evaluator.update(empty)
    metrics = evaluator.compute([evaluator.entries])
    assert metrics["bbox_mAP"] == 0.0 and metrics["segm_AR_l_1000"] == 0.0
    statistics = [k for k in metrics if k.startswith(("bbox_", "segm_")) and "per_class" not in k]
    assert len([k for k in statistics if "best_F1" not in k]) == 24
    assert [metrics[k] for k in statistics if "best_F1" in k] == [0.0] * 8  # present, zero
    assert metrics["segm_AP_per_class/circle"] == 0.0  # classwise: few classes


def test_flatten_metrics_checks_values_and_names() -> None:
    assert flatten_metrics({"bbox_AR@100": np.float64(0.5), "n": 3}) == {
        "bbox_AR_100": 0.5,
        "n": 3.0,
    }
    with pytest.raises(TypeError, match="'bbox_mAP_copypaste' is str"):
        flatten_metrics({"bbox_mAP_copypaste": "0.1 0.2"})
    with pytest.raises(ValueError, match="infinite"):
        flatten_metrics({"loss": float("inf")})
