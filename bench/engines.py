"""Training on each engine, side by side: Ray Train (`python -m on_ray train`, one worker on a
local Ray) vs Determined's local Trainer (`model_def.py --local`) vs mmengine's Runner.

The same config, data, seed and iterations as bench/training.py; the three sides alternate in
turn (A B C, B C A, ...), each run its own subprocess, and the figures are medians. Ray's
stamps are taken in its worker process, at the start of each batch; its start-up (a local Ray,
about 20 s here) is excluded with the warm-up iterations as the other sides' start-ups are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.training import BASELINE, MODELS, SIZES, common_sets, per_iteration, row, run_workload

SIDES = ("ray", "ours", "mmengine")
DETERMINED = "Determined local Trainer (model_def.py --local)"
NOTES = (
    "the same worker code as Determined's trial drives the same session; Ray adds its report "
    "barrier at each validation/checkpoint only (none in the timed iterations)"
)


def measure(quick: bool, repeats: int | None = None) -> list[dict[str, Any]]:
    size = SIZES[quick]
    repeats = repeats or size["repeats"]
    models = ["retinanet"] if quick else list(MODELS)  # CI's smoke: one model, same code path
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        folder = Path(tmp)
        sets = {m: common_sets(folder, m, 2 * size["iterations"]) for m in models}
        for rep in range(repeats):
            turn = SIDES[rep % 3 :] + SIDES[: rep % 3]  # a drift in load favours no side
            for model in models:
                for side in turn:
                    print(f"[bench.engines] {rep + 1}/{repeats} {model} {side}", flush=True)
                    spec = {"kind": "train", "side": side, "sets": sets[model]}
                    result = run_workload(spec, folder / f"{rep}-{model}-{side}")
                    if len(result["stamps"]) != size["iterations"]:
                        raise RuntimeError(f"{side} trained {len(result['stamps'])} iterations")
                    timing = per_iteration(result["stamps"], size["warmup"])
                    results.setdefault((model, side), []).append(timing)
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    timed = f"iterations {size['warmup'] + 1}-{size['iterations']} of {size['iterations']} timed"
    rows = []
    for model in models:
        name = MODELS[model]
        for baseline, baseline_name in (("mmengine", BASELINE), ("ours", DETERMINED)):
            rows.append(
                row(
                    f"Training s/iteration on Ray Train vs {baseline_name.split(' (')[0]}, "
                    f"{name} R18-FPN, batch 2, 128 px, {device}",
                    "s/iter",
                    results[(model, "ray")],
                    results[(model, baseline)],
                    lower_is_better=True,
                    notes=f"{timed}; one worker; {NOTES}",
                    baseline_name=baseline_name,
                )
            )
    return rows
