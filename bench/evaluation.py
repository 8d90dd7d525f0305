"""COCO validation time on stored predictions: our evaluator against mmdet's CocoMetric.

Ours: `utils.evaluation.evaluator.CocoEvaluator` with hotcoco (update per batch, then compute,
as the trial's reducer runs it on one rank). Baseline: mmdet's `CocoMetric` with pycocotools as
mmengine's Evaluator drives it (`to_dict` and `process` per batch, then `evaluate`). Both see the
same generated predictions (bench.coco_data), batch by batch, A and B alternating; the timed
region is the evaluator's own work, not building the predictions.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from mmdet.evaluation import CocoMetric
from mmdet.structures.mask import encode_mask_results
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.logging import MMLogger

from bench.coco_data import CLASSES, generate, to_samples
from utils.evaluation.evaluator import CocoEvaluator
from utils.evaluation.mask_rle import encode_in_boxes, encode_whole
from utils.evaluation.plots import draw_report
from utils.evaluation.report import evaluation_report, save_report

GOAL = 4.0
PLOTS_GOAL = 1.05  # the plots add at most a few percent to a validation
BATCH = 8  # images per validation batch
# The whole scan reads every mask about three times; the box regions' exactness check once.
ENCODING_GOAL = 2.0


def run_once(records: list[dict], ann_file: str, metric: str, ours_first: bool) -> dict[str, float]:
    """One validation by each evaluator; seconds per phase (update: all batches, compute)."""
    ours = CocoEvaluator(
        Config({"val_evaluator": {"type": "CocoMetric", "ann_file": ann_file, "metric": metric}}),
        backend="hotcoco",
        meta={"classes": CLASSES},
    )
    baseline = CocoMetric(ann_file=ann_file, metric=metric)
    baseline.dataset_meta = {"classes": CLASSES}

    def ours_update(samples: list) -> None:
        ours.update(samples)

    def baseline_update(samples: list) -> None:
        baseline.process({}, [sample.to_dict() for sample in samples])

    times = dict.fromkeys(("ours_update", "ours_compute", "base_update", "base_compute"), 0.0)
    pairs = [("ours_update", ours_update), ("base_update", baseline_update)]
    if not ours_first:
        pairs.reverse()
    for start in range(0, len(records), BATCH):
        samples = to_samples(records[start : start + BATCH], with_masks=metric == "segm")
        for key, update in pairs:
            begin = time.perf_counter()
            update(samples)
            times[key] += time.perf_counter() - begin
    computes = [
        ("ours_compute", lambda: ours.compute([ours.entries])),
        ("base_compute", lambda: baseline.evaluate(len(records))),
    ]
    if not ours_first:
        computes.reverse()
    results = {}
    MMLogger.get_current_instance()  # its handler keeps the real stdout, not the null below
    # pycocotools prints its summary table; the timing should not depend on a terminal.
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        for key, compute in computes:
            begin = time.perf_counter()
            results[key] = compute()
            times[key] = time.perf_counter() - begin
    ours_map = results["ours_compute"][f"{metric}_mAP"]
    base_map = results["base_compute"][f"coco/{metric}_mAP"]
    if abs(ours_map - base_map) > 5e-4:  # mmdet rounds to 3 decimals
        raise AssertionError(f"{metric} mAP differs: ours {ours_map}, mmdet {base_map}.")
    return times


def measure(quick: bool) -> list[dict[str, Any]]:
    register_all_modules(init_default_scope=True)
    num_images = 200 if quick else 5000
    repetitions = 1 if quick else 3
    data = generate(num_images)
    detections = sum(len(record["scores"]) for record in data.predictions)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ann_file = str(Path(tmp) / "instances_val.json")
        Path(ann_file).write_text(json.dumps(data.gt))
        for metric in ("bbox", "segm"):
            runs = [
                run_once(data.predictions, ann_file, metric, ours_first=rep % 2 == 0)
                for rep in range(repetitions)
            ]
            rows.append(row(metric, num_images, detections, runs))
        plots = [plots_once(data.predictions, ann_file, Path(tmp)) for _ in range(repetitions)]
        rows.append(plots_row(num_images, detections, plots))
    rows.append(encoding_row(quick))
    return rows


def pasted_masks(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` full-image masks as Mask R-CNN pastes them: a star-shaped blob filling 5 to 30 % of
    the image, and its box (x1, y1, x2, y2) tight around it."""
    masks = np.zeros((n, h, w), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    turns = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    for mask, box in zip(masks, boxes, strict=True):
        area = rng.uniform(0.05, 0.30) * h * w
        aspect = np.exp(rng.normal(0, 0.4))
        half = np.clip([np.sqrt(area * aspect), np.sqrt(area / aspect)], 2, [w, h]) / 2
        center = rng.uniform(half, [w, h] - half)
        radius = rng.uniform(0.7, 1.0, (16, 1))
        poly = center + half * radius * np.stack([np.cos(turns), np.sin(turns)], 1)
        cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, shift=4)
        box[:2], box[2:] = poly.min(axis=0), poly.max(axis=0)
    return masks.view(bool), boxes


def encoding_row(quick: bool) -> dict[str, Any]:
    """Mask encoding of COCO-sized predictions: each mask scanned whole against encoded from its
    box region (`utils.evaluation.mask_rle`), interleaved; mmdet's `encode_mask_results` beside."""
    load = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    images = [pasted_masks(rng, 100, 480, 640) for _ in range(1 if quick else 4)]
    for masks, boxes in images:
        if encode_in_boxes(masks, boxes) != encode_mask_results(masks):
            raise AssertionError("The box-region encoding differs from mmdet's.")
    times: dict[str, list[float]] = {"whole": [], "boxes": [], "mmdet": []}
    for repeat in range(2 if quick else 20):
        for masks, boxes in images:
            runs = [("whole", partial(encode_whole, masks)),
                    ("boxes", partial(encode_in_boxes, masks, boxes))]  # fmt: skip
            if repeat % 5 == 0:  # the slowest, a few times
                runs.append(("mmdet", partial(encode_mask_results, masks)))
            for key, run in runs if repeat % 2 else runs[::-1]:
                begin = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - begin)
    whole, boxes, mmdet = (1000 * statistics.median(times[k]) for k in ("whole", "boxes", "mmdet"))
    details = (
        f"{len(images)} generated images of 640x480 with 100 masks each (a star-shaped blob "
        "filling 5 to 30 % of the image, its box tight around it), masks and boxes as the "
        f"evaluator gets them; {len(times['whole'])} encodings each, interleaved, medians in ms "
        f"per image: whole {whole:.1f}, from the box regions {boxes:.1f}, mmdet's "
        f"encode_mask_results {mmdet:.1f}; all equal to mmdet's. Load average {load:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (1 min)."
    )
    return {
        "measure": "Mask RLE encoding, 100 masks of 640x480 per image",
        "unit": "ms",
        "ours": boxes,
        "baseline": whole,
        "baseline_name": "ours scanning each mask whole",
        "ratio": whole / boxes,
        "ratio_definition": "whole / box regions (speed-up)",
        "goal": f">= {ENCODING_GOAL}",
        "met": whole / boxes >= ENCODING_GOAL,
        "details": details,
    }


def plots_once(records: list[dict], ann_file: str, tmp: Path) -> dict[str, float]:
    """A Mask R-CNN-like validation (bbox and segm) by our evaluator, then its plots as the
    trial's callback makes them: report (curves, best F1, TIDE, calibration, confusion matrix),
    drawing, files."""
    evaluator = CocoEvaluator(
        Config({"val_evaluator": {"type": "CocoMetric", "ann_file": ann_file,
                                  "metric": ["bbox", "segm"]}}),
        backend="hotcoco",
        meta={"classes": CLASSES},
    )  # fmt: skip
    times = dict.fromkeys(("validation", "report", "draw", "save"), 0.0)
    for start in range(0, len(records), BATCH):
        # Built outside the timed region, as for the rows above.
        samples = to_samples(records[start : start + BATCH], with_masks=True)
        begin = time.perf_counter()
        evaluator.update(samples)
        times["validation"] += time.perf_counter() - begin
    begin = time.perf_counter()
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        evaluator.compute([evaluator.entries])
    times["validation"] += time.perf_counter() - begin
    begin = time.perf_counter()
    report = evaluation_report(evaluator.coco_metric())
    times["report"] = time.perf_counter() - begin
    begin = time.perf_counter()
    drawings = draw_report(report)
    times["draw"] = time.perf_counter() - begin
    begin = time.perf_counter()
    save_report(report, drawings, tmp / "evaluation")
    times["save"] = time.perf_counter() - begin
    times["plots"] = times["report"] + times["draw"] + times["save"]
    return times


def plots_row(num_images: int, detections: int, runs: list[dict]) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    without = median("validation")
    with_plots = statistics.median(run["validation"] + run["plots"] for run in runs)
    ratio = with_plots / without
    details = (
        f"{num_images} generated 256 px images, {detections} detections with masks, bbox and "
        f"segm metrics, batches of {BATCH}; {len(runs)} repetition(s), medians in s: "
        f"validation's evaluation (update + compute) {without:.2f}; plots {median('plots'):.2f}"
        f" = report {median('report'):.2f} (PR and threshold curves from the COCOeval arrays; "
        "TIDE, calibration and the confusion matrix from hotcoco's evaluation) + drawing "
        f"{median('draw'):.2f} (7 matplotlib figures) + files {median('save'):.2f}. The "
        "model's forward passes over the images, which a real validation adds, are not counted."
    )
    return {
        "measure": f"Evaluation plots, {num_images}-image validation",
        "unit": "s",
        "ours": with_plots,
        "baseline": without,
        "baseline_name": "the same validation without the plots",
        "ratio": ratio,
        "ratio_definition": "with plots / without (lower is better)",
        "goal": f"<= {PLOTS_GOAL:.2f}",
        "met": ratio <= PLOTS_GOAL,
        "details": details,
    }


def row(metric: str, num_images: int, detections: int, runs: list[dict]) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    ours = statistics.median(run["ours_update"] + run["ours_compute"] for run in runs)
    baseline = statistics.median(run["base_update"] + run["base_compute"] for run in runs)
    ratio = baseline / ours
    details = (
        f"{num_images} generated 256 px images, {detections} detections"
        f"{' with masks' if metric == 'segm' else ''}, batches of {BATCH}; {len(runs)} "
        "repetition(s), A/B order alternating, medians in s: ours update "
        f"{median('ours_update'):.2f} + compute {median('ours_compute'):.2f}, mmdet update "
        f"{median('base_update'):.2f} + compute {median('base_compute'):.2f}."
    )
    # From cProfile of the 5000-image runs.
    details += (
        " Profile of ours: update is the RLE encoding of the masks (ours, about twice as fast as"
        " mmdet's); compute is hotcoco's loadRes from columns, evaluate and accumulate, and our"
        " reading of the arrays (under 5 %)."
    )
    return {
        "measure": f"COCO {metric} evaluation, {num_images} images",
        "unit": "s",
        "ours": ours,
        "baseline": baseline,
        "baseline_name": "mmdet CocoMetric with pycocotools",
        "ratio": ratio,
        "ratio_definition": "baseline / ours (speed-up)",
        "goal": f">= {GOAL}",
        "met": ratio >= GOAL,
        "details": details,
    }


if __name__ == "__main__":
    import sys

    quick = "--quick" in sys.argv
    # --encoding: the mask encoding row alone (seconds, not the section's minutes).
    for result in [encoding_row(quick)] if "--encoding" in sys.argv else measure(quick):
        print(json.dumps(result, indent=1))
