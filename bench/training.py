"""Training against mmengine's Runner: seconds per iteration, loader throughput, peak memory.

Both sides build their config the same way (utils.config.build_config from experiments/demo.yaml
with the overrides below), on the same generated data with the same seed: one epoch of batches of
2 (128 px images) and the validation that ends it, with the config's data loader settings (2
persistent workers). Ours: `model_def.py --local` (Determined's Trainer); baseline: mmdet's
tools/train.py path, `Runner.from_cfg(cfg).train()`. Each run is its own subprocess
(bench.workloads), ours and mmengine's alternate (A B A B ...), and the figures are medians over
the repetitions.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BASELINE = "mmengine Runner (mmdet tools/train.py)"
MODELS = {"retinanet": "RetinaNet", "maskrcnn": "Mask R-CNN"}
# quick: CI's smoke (seconds per run, same code path); full: the documented figures.
SIZES = {
    True: {"iterations": 4, "warmup": 1, "repeats": 1, "loader_images": 8, "passes": 1},
    False: {"iterations": 40, "warmup": 5, "repeats": 3, "loader_images": 64, "passes": 3},
}


def run_workload(spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """One subprocess of bench.workloads; its result (stamps, CPU times, peak memory)."""
    scratch.mkdir(parents=True)
    spec_path, result_path = scratch / "spec.json", scratch / "result.json"
    spec_path.write_text(json.dumps({**spec, "output": str(scratch / "output")}))
    with (scratch / "log.txt").open("w") as log:
        process = subprocess.run(
            [sys.executable, "-m", "bench.workloads", str(spec_path), str(result_path)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if process.returncode != 0:
        tail = (scratch / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"bench workload {spec['kind']}/{spec['side']} failed:\n{tail}")
    return json.loads(result_path.read_text())


def common_sets(folder: Path, model: str, num_train: int) -> list[str]:
    """The experiment overrides both sides share: model, batch, seed, data, one epoch."""
    seed_file = folder / "seed.py"
    seed_file.write_text("randomness = dict(seed=0)\n")
    data = {
        "backend": "synthetic",
        "cache_dir": str(folder / "data"),
        "synthetic": {"num_train": num_train, "num_val": 8, "image_size": 128},
    }
    return [
        f"hyperparameters.config_file=configs/synthetic/{model}_r18_fpn_synthetic.py",
        "hyperparameters.global_batch_size=2",
        f"hyperparameters.merge_config={seed_file}",
        'hyperparameters.override_mmdet_config={"train_cfg.max_epochs": 1}',
        f"data={json.dumps(data)}",
    ]


def per_iteration(stamps: list[float], warmup: int) -> float:
    """Mean time between iteration starts after the first `warmup` iterations."""
    timed = stamps[warmup:]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def images_per_second(result: dict[str, Any]) -> float:
    """Images after the first batch over the time since it (worker start-up excluded)."""
    return sum(result["images"][1:]) / (result["stamps"][-1] - result["stamps"][0])


def measure(quick: bool, repeats: int | None = None) -> list[dict[str, Any]]:
    size = SIZES[quick]
    repeats = repeats or size["repeats"]
    results: dict[tuple[str, str, str], list[float]] = {}

    def add(key: tuple[str, str, str], value: float) -> None:
        results.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        folder = Path(tmp)
        train_sets = {m: common_sets(folder, m, 2 * size["iterations"]) for m in MODELS}
        loader_sets = common_sets(folder, "maskrcnn", size["loader_images"])
        for rep in range(repeats):
            # Alternate which side goes first, so that a drift in machine load favours neither.
            sides = ("ours", "mmengine") if rep % 2 == 0 else ("mmengine", "ours")
            for model in MODELS:
                for side in sides:
                    print(f"[bench.training] {rep + 1}/{repeats} train {model} {side}", flush=True)
                    spec = {"kind": "train", "side": side, "sets": train_sets[model]}
                    result = run_workload(spec, folder / f"{rep}-{model}-{side}")
                    if len(result["stamps"]) != size["iterations"]:
                        raise RuntimeError(f"{side} trained {len(result['stamps'])} iterations")
                    warmup = size["warmup"]
                    add(("train", model, side), per_iteration(result["stamps"], warmup))
                    add(("cpu", model, side), per_iteration(result["cpu"], warmup))
                    add(("memory", model, side), result["peak_mb"])
            for side in sides:
                print(f"[bench.training] {rep + 1}/{repeats} loader {side}", flush=True)
                spec = {
                    "kind": "loader",
                    "side": side,
                    "sets": loader_sets,
                    "passes": size["passes"],
                }
                result = run_workload(spec, folder / f"{rep}-loader-{side}")
                add(("loader", "maskrcnn", side), images_per_second(result))

    timed = f"iterations {size['warmup'] + 1}-{size['iterations']} of {size['iterations']} timed"
    rows = []
    for model, name in MODELS.items():
        rows.append(
            row(
                f"Training s/iteration, {name} R18-FPN, batch 2, 128 px, CPU",
                "s/iter",
                results[("train", model, "ours")],
                results[("train", model, "mmengine")],
                lower_is_better=True,
                notes=f"{timed}; data loading included, start-up and validation excluded; main "
                f"process CPU s/iter ours {fmt(results[('cpu', model, 'ours')])}, baseline "
                f"{fmt(results[('cpu', model, 'mmengine')])}",
            )
        )
    for model, name in MODELS.items():
        rows.append(
            row(
                f"Peak resident memory, {name} training run",
                "MB",
                results[("memory", model, "ours")],
                results[("memory", model, "mmengine")],
                lower_is_better=True,
                notes="max RSS of the training process (loader workers share its pages)",
            )
        )
    rows.append(
        row(
            "Data loader images/s, Mask R-CNN training pipeline, 2 workers",
            "images/s",
            results[("loader", "maskrcnn", "ours")],
            results[("loader", "maskrcnn", "mmengine")],
            lower_is_better=False,
            notes=f"{size['passes']} pass(es) over {size['loader_images']} images, first batch "
            "excluded; baseline: Runner.build_dataloader of the same config",
        )
    )
    return rows


def row(
    measure: str,
    unit: str,
    ours: list[float],
    baseline: list[float],
    lower_is_better: bool,
    notes: str,
) -> dict[str, Any]:
    ours_median, baseline_median = statistics.median(ours), statistics.median(baseline)
    ratio = ours_median / baseline_median
    return {
        "measure": measure,
        "unit": unit,
        "ours": ours_median,
        "baseline": baseline_median,
        "baseline_name": BASELINE,
        "ratio": ratio,
        "ratio_definition": "ours / baseline" + (" (lower is better)" if lower_is_better else ""),
        "goal": "<= 1.00" if lower_is_better else ">= 1.00",
        "met": ratio <= 1.0 if lower_is_better else ratio >= 1.0,
        "details": f"median of {len(ours)} run(s) each; {notes}; "
        f"ours {fmt(ours)}, baseline {fmt(baseline)}",
    }


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
