"""Batch inference: `python -m on_ray predict --workers N` (Ray Data, N actors with one model
each) vs the single-process `python -m on_ray predict`, on the same images, in one run.

Every model computes on one CPU core (one torch thread), as each would have one GPU: the single
process and 1 actor use one core, 2 actors two. So 1 actor against the single process is what
Ray Data costs, and 2 actors against 1 what adding a worker gains (on a cluster: a node's GPU
each). One thread each also keeps the figures usable on a shared machine, where two torch
threads spinning on two busy cores slow down several-fold.

The model is bench/exports.py's Mask R-CNN R18-FPN export with seeded initial weights: every
image gets the test_cfg's 100 detections with masks, so each side does the whole
post-processing. Each command runs as its own subprocess, as a user runs it; its progress bar
is read as it prints: the rate of a long run is the images/s between the first and the last
update (Python's, Ray's and the actors' start-up and the first batch excluded; reported
apart, with the end-to-end rate). `--quick` (CI's smoke) runs each side once on 4 images and
reports N / wall. Batches of 8, no drawings, the sides in turn (a drift in the machine's load
favours none).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.exports import images_folder, make_export

REPO = Path(__file__).resolve().parent.parent
SIDES = ("single", "ray1", "ray2")
NAMES = {
    "single": "single-process predict",
    "ray1": "Ray Data, 1 actor",
    "ray2": "Ray Data, 2 actors",
}
SIZES = {True: {"images": 4, "repeats": 1}, False: {"images": 160, "repeats": 3}}
# A tqdm bar's count (`predict:  40%|####      | 64/160 [...]`), ours and predict's alike.
PROGRESS = re.compile(rb"predict:[^|]*\|[^|]*\| *(\d+)/\d+")
BATCH = 8
# Ours / baseline, higher is better: an actor does what predict does plus Ray's hops (the
# driver's writing overlaps the actors' work); a second actor on its own core nearly doubles.
GOALS = {("ray1", "single"): 0.9, ("ray2", "single"): 1.6, ("ray2", "ray1"): 1.7}


def command(side: str, export: Path, images: Path, out: Path) -> list[str]:
    base = [sys.executable, "-m", "on_ray", "predict", str(export), str(images)]
    base += ["--batch-size", str(BATCH)]
    if side == "single":
        return [*base, "--out", str(out), "--device", "cpu", "--max-rendered", "0"]
    base += ["--workers", side[-1], "--worker-cpus", "1"]
    return [*base, "--output", str(out), "--draw", "0", "--no-mlflow"]


def timed_run(side: str, export: Path, images: Path, out: Path) -> dict[str, float]:
    """Run one side; its wall time, start-up (to its first progress update) and the images/s
    between its first and its last progress update (both commands' bars count images)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the single process's torch threads
    start = time.perf_counter()
    process = subprocess.Popen(
        command(side, export, images, out),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    stamps: list[tuple[float, int]] = []  # (seconds, images done) at each new count
    output = b""
    while chunk := process.stdout.read1(65536):
        now = time.perf_counter() - start
        output += chunk
        for done in (int(n) for n in PROGRESS.findall(chunk)):
            if done and (not stamps or done > stamps[-1][1]):
                stamps.append((now, done))
    seconds = time.perf_counter() - start
    if process.wait() != 0 or not stamps:
        raise RuntimeError(f"{side} failed or showed no progress: {output[-3000:].decode()}")
    (first, first_done), (last, last_done) = stamps[0], stamps[-1]
    steady = (last_done - first_done) / (last - first) if last > first else 0.0
    return {"wall": seconds, "start": first, "steady": steady, "images": last_done}


def measure(quick: bool, repeats: int | None = None) -> list[dict[str, Any]]:
    size = SIZES[quick]
    count, repeats = size["images"], repeats or size["repeats"]
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench-batch-predict-") as tmp:
        folder = Path(tmp)
        export = make_export(folder / "export")
        images = images_folder(folder, count)
        for rep in range(repeats):
            for side in SIDES[rep % 3 :] + SIDES[: rep % 3]:
                run = timed_run(side, export, images, folder / f"out-{rep}-{side}")
                if run["images"] != count:
                    raise RuntimeError(f"{side} predicted {run['images']} of {count} images")
                runs[side].append(run)
                print(f"[bench.batch_predict] {rep + 1}/{repeats} {side}: {run}", flush=True)
    figure = {
        side: {key: med([r[key] for r in runs[side]]) for key in runs[side][0]} for side in SIDES
    }
    if quick:  # one progress update in 4 images: end to end
        rate = {side: count / figure[side]["wall"] for side in SIDES}
        how = f"end to end, N / wall, a smoke on {count} images"
    else:
        rate = {side: figure[side]["steady"] for side in SIDES}
        how = "the rate of a long run: images/s between the first and the last progress update"
    notes = (
        f"{how}; {count} generated 128 px PNGs, Mask R-CNN R18-FPN (100 detections with masks "
        f"per image), batches of {BATCH}; medians of {repeats} run(s); start-up to the first "
        "batch done "
        + ", ".join(f"{NAMES[s]} {figure[s]['start']:.1f} s" for s in SIDES)
        + f"; end to end on {count} images "
        + ", ".join(f"{NAMES[s]} {count / figure[s]['wall']:.2f} images/s" for s in SIDES)
        + "; steady images/s per run "
        + ", ".join(f"{NAMES[s]} {[round(r['steady'], 2) for r in runs[s]]}" for s in SIDES)
        + f"; load average at the end {os.getloadavg()[0]:.2f}"
    )
    return [row(ours, baseline, rate, notes) for ours, baseline in GOALS]


def med(values: list[float]) -> float:
    return statistics.median(values)


def row(ours: str, baseline: str, rate: dict[str, float], notes: str) -> dict[str, Any]:
    ratio, goal = rate[ours] / rate[baseline], GOALS[(ours, baseline)]
    return {
        "measure": f"Batch inference images/s, {NAMES[ours]} vs {NAMES[baseline]}, Mask R-CNN "
        f"R18-FPN, 128 px",
        "unit": "images/s",
        "ours": rate[ours],
        "baseline": rate[baseline],
        "baseline_name": f"`python -m on_ray predict` as {NAMES[baseline]}",
        "ratio": ratio,
        "ratio_definition": "ours / baseline",
        "goal": f">= {goal:.2f}",
        "met": ratio >= goal,
        "details": notes,
    }
