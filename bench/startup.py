"""Start-up at COCO train2017's size: process start to the first training batch, and peak memory.

The benchmark writes a COCO-format training file with train2017's counts (118,287 images of
COCO's sizes, 860,001 polygon instances, 80 categories with COCO's gaps in their ids; 1,021
images without objects) and a small validation file, the images being a few real JPEGs that
every entry names in turn. Three sides, each its own subprocess (bench.workloads, kind
"startup"), in turn:

- ours: `model_def.py --local` (Determined's Trainer), with this host's caches (annotation
  checks, sampler orientations) cold (the file's first run) and warm (every later run, restart
  or rank of the host);
- mmdet's `tools/train.py`: `Runner.from_cfg(Config.fromfile(...)).train()` on the config ours
  resolves, dumped to a file (so none of our checks run);
- mmdet's `CocoDataset` build alone, from that config.

Eight ranks on one host: eight processes check the file at once with a cold cache; the cache
makes one of them check and the others wait for its outcome. The same measures at 1/8, 1/4 and
1/2 of the size show how the cost grows. A last row gives ours' start-up sanity pass
(utils/training/sanity.py) as a share of its start-up.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.training import run_workload
from utils.base.files import CACHE_ROOT

TRAIN_IMAGES, TRAIN_INSTANCES, EMPTY_IMAGES = 118_287, 860_001, 1_021
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
SIZES = ((640, 480), (640, 427), (480, 640), (640, 426), (500, 375), (427, 640), (640, 360))
SOURCE_IMAGES = 8
FRACTIONS = {True: (0.002,), False: (0.125, 0.25, 0.5, 1.0)}
RANKS = 8
GOAL = 1.1
SANITY_SHARE = 0.1  # of the start-up, at most


def write_coco(path: Path, images: int, instances: int, empty: int, seed: int = 0) -> None:
    """A COCO instances file with these counts: one polygon of 8 to 40 points per instance."""
    rng = np.random.default_rng(seed)
    sizes = [SIZES[i] for i in rng.integers(0, len(SIZES), images)]
    owners = np.concatenate([np.arange(images - empty), rng.integers(0, images - empty,
                             max(0, instances - images + empty))])  # fmt: skip
    owners.sort()
    entries = [
        {"id": i + 1, "file_name": f"{i % SOURCE_IMAGES:012d}.jpg", "width": w, "height": h}
        for i, (w, h) in enumerate(sizes)
    ]
    annotations = []
    for k, image in enumerate(owners[:instances]):
        width, height = sizes[image]
        size = float(rng.uniform(8, min(width, height) / 2))
        cx, cy = rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2)
        turns = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(8, 41))))
        radius = size / 2 * rng.uniform(0.6, 1.0, len(turns))
        xs, ys = cx + radius * np.cos(turns), cy + radius * np.sin(turns)
        x0, y0 = float(xs.min()), float(ys.min())
        box = [round(x0, 2), round(y0, 2), round(float(xs.max()) - x0, 2),
               round(float(ys.max()) - y0, 2)]  # fmt: skip
        polygon = np.round(np.stack([xs, ys], 1).ravel(), 2).tolist()
        annotations.append({
            "id": k + 1, "image_id": int(image) + 1, "category_id": COCO_IDS[k % 80],
            "segmentation": [polygon], "area": round(box[2] * box[3] * 0.7, 2), "bbox": box,
            "iscrowd": 0,
        })  # fmt: skip
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in COCO_IDS]
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"images": entries, "annotations": annotations,
                                   "categories": categories}))  # fmt: skip
    partial.replace(path)


def dataset(fraction: float) -> Path:
    """The data root for a fraction of train2017's size (kept in the cache between runs)."""
    images = max(16, round(TRAIN_IMAGES * fraction))
    root = CACHE_ROOT / "bench" / f"coco-startup-{images}"
    train = root / "annotations" / "instances_train2017.json"
    if not train.is_file():
        rng = np.random.default_rng(1)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        for split in ("train2017", "val2017"):
            (root / split).mkdir(parents=True, exist_ok=True)
            for i in range(SOURCE_IMAGES):
                pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
                cv2.imwrite(str(root / split / f"{i:012d}.jpg"), pixels)
        write_coco(root / "annotations" / "instances_val2017.json", 16, 120, 0, seed=2)
        instances = round(TRAIN_INSTANCES * images / TRAIN_IMAGES)
        write_coco(train, images, instances, round(EMPTY_IMAGES * images / TRAIN_IMAGES))
    return root


def sets(root: Path) -> list[str]:
    """Ours' experiment overrides: the demo's Mask R-CNN on the generated COCO files."""
    return [
        "data.backend=disk",
        f"data.root={root}",
        "hyperparameters.global_batch_size=2",
    ]


def timed(spec: dict[str, Any], scratch: Path) -> dict[str, float]:
    """Seconds from the subprocess's start to its first stamp, and its peak memory by then."""
    start = time.perf_counter()
    result = run_workload(spec, scratch)
    times = {"seconds": result["stamps"][0] - start, "peak_mb": result["peak_so_far_mb"][0]}
    if result.get("sanity_seconds") is not None:  # ours: the sanity pass within its start-up
        times["sanity"] = result["sanity_seconds"]
    return times


def cold_cache(train: Path) -> None:
    """Forget this host's check of the file and its datasets' orientations: the next run reads
    them as a first run does."""
    from utils.data.annotations import CHECKS_DIR, content_digest
    from utils.data.sampling import ORIENTATIONS_DIR

    (CHECKS_DIR / f"{content_digest(train)}.json").unlink(missing_ok=True)
    shutil.rmtree(ORIENTATIONS_DIR, ignore_errors=True)


def check_alone(path: str) -> dict[str, float]:
    """One rank's check of the file (run in a process of its own)."""
    from utils.data.annotations import check_coco_file

    start, cpu = time.perf_counter(), time.process_time()
    report = check_coco_file(Path(path))
    return {
        "seconds": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "from_cache": report.from_cache,
    }


def ranks_at_once(train: Path, ranks: int) -> list[dict[str, float]]:
    cold_cache(train)
    with multiprocessing.get_context("spawn").Pool(ranks) as pool:
        return pool.map(check_alone, [str(train)] * ranks)


def measure(quick: bool, repeats: int | None = None) -> list[dict[str, Any]]:
    from bench.workloads import build_cfg

    repeats = repeats or 1
    sides = ("ours_cold", "ours_warm", "tools_train", "dataset")
    results: dict[tuple[float, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        folder = Path(tmp)
        for fraction in FRACTIONS[quick]:
            root = dataset(fraction)
            train = root / "annotations" / "instances_train2017.json"
            config = folder / f"config-{fraction}.py"
            build_cfg(sets(root)).dump(str(config))
            for rep in range(repeats):
                turn = sides[rep % 4 :] + sides[: rep % 4]
                for side in turn:
                    print(f"[bench.startup] {fraction} {rep + 1}/{repeats} {side}", flush=True)
                    if side == "ours_cold":
                        cold_cache(train)
                    spec = {"kind": "startup", "side": side.split("_")[0], "sets": sets(root)}
                    spec["side"] = {"tools": "mmengine"}.get(spec["side"], spec["side"])
                    spec["config"] = str(config)
                    scratch = folder / f"{fraction}-{rep}-{side}"
                    results.setdefault((fraction, side), []).append(timed(spec, scratch))
        full = FRACTIONS[quick][-1]
        ranks = ranks_at_once(dataset(full) / "annotations" / "instances_train2017.json", RANKS)
    return rows(results, ranks, quick)


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def rows(
    results: dict[tuple[float, str], list[dict[str, float]]], ranks: list[dict], quick: bool
) -> list[dict[str, Any]]:
    full = FRACTIONS[quick][-1]
    images = max(16, round(TRAIN_IMAGES * full))
    size = f"{images:,} images" + (" (train2017's size)" if full == 1.0 else "")
    growth = "; ".join(
        f"{fraction:g}x: " + ", ".join(
            f"{side} {median(results[(fraction, side)], 'seconds'):.1f} s / "
            f"{median(results[(fraction, side)], 'peak_mb'):.0f} MB"
            for side in ("ours_cold", "ours_warm", "tools_train", "dataset")
        )
        for fraction in FRACTIONS[quick]
    )  # fmt: skip
    out = []
    for side, what in (("ours_cold", "first run"), ("ours_warm", "later runs and ranks")):
        for key, unit, label in (("seconds", "s", "to first batch"), ("peak_mb", "MB", "peak")):
            ours = median(results[(full, side)], key)
            base = median(results[(full, "tools_train")], key)
            out.append({
                "measure": f"Start-up {label}, {what}, COCO-train-sized file, {size}",
                "unit": unit, "ours": ours, "baseline": base,
                "baseline_name": "mmdet tools/train.py (Runner.from_cfg(cfg).train())",
                "ratio": ours / base, "ratio_definition": "ours / baseline (lower is better)",
                "goal": f"<= {GOAL:.2f}", "met": ours / base <= GOAL,
                "details": f"process start to the first training batch, Mask R-CNN R18 (the "
                f"demo's), batch 2; mmdet's CocoDataset build alone "
                f"{median(results[(full, 'dataset')], 'seconds'):.1f} s, "
                f"{median(results[(full, 'dataset')], 'peak_mb'):.0f} MB; growth: {growth}",
            })  # fmt: skip
    warm = results[(full, "ours_warm")]
    sanity, whole = median(warm, "sanity"), median(warm, "seconds")
    out.append({
        "measure": f"Sanity pass share of the start-up, later runs and ranks, {size}",
        "unit": "s", "ours": sanity, "baseline": whole,
        "baseline_name": "ours: process start to the first training batch, pass included",
        "ratio": sanity / whole, "ratio_definition": "sanity pass / start-up (lower is better)",
        "goal": f"<= {SANITY_SHARE:.2f}", "met": sanity / whole <= SANITY_SHARE,
        "details": "one training step (forward, loss, backward) on 2 images and a validation of "
        "2 (pipeline, predict, evaluator update and COCO evaluation), Mask R-CNN R18 at 128 px "
        f"(the demo's); first runs: {median(results[(full, 'ours_cold')], 'sanity'):.2f} s",
    })  # fmt: skip
    checked = sum(not r["from_cache"] for r in ranks)
    cpu = sum(r["cpu"] for r in ranks)
    alone = max(r["cpu"] for r in ranks)  # the one that checked
    out.append({
        "measure": f"Annotation checks of {RANKS} ranks on one host (CPU s, all ranks), {size}",
        "unit": "s", "ours": cpu, "baseline": RANKS * alone,
        "baseline_name": f"{RANKS} ranks each checking the file (before the host cache)",
        "ratio": cpu / (RANKS * alone), "ratio_definition": "ours / baseline (lower is better)",
        "goal": f"<= {1.5 / RANKS:.2f}", "met": checked == 1 and cpu <= 1.5 * alone,
        "details": f"{RANKS} processes at once, cold cache: {checked} checked the file, the "
        f"others waited for its outcome and read it (each still hashes the file: "
        f"{statistics.median(r['cpu'] for r in ranks if r['from_cache'] or checked > 1):.2f} "
        f"CPU s); slowest rank {max(r['seconds'] for r in ranks):.1f} s wall, peak "
        f"{max(r['peak_mb'] for r in ranks):.0f} MB",
    })  # fmt: skip
    return out
