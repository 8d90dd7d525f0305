"""What a run on this machine's console and in its output folder shows, whatever the engine:
every reported step in `metrics.jsonl`, a progress line with the time left, the last validation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class RunReport:
    """Appends `{"kind", "batches", "metrics"}` records to `path` and prints progress.

    Args:
        path: the run's `metrics.jsonl`.
        total: the batches the run trains to (for the time left).
    """

    def __init__(self, path: Path, total: int) -> None:
        self.path = path
        self.total = total
        self.start = time.monotonic()
        self.first_batch: int | None = None

    def write(self, kind: str, batches: int, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as stream:
            record = {"kind": kind, "batches": batches, "metrics": metrics}
            stream.write(json.dumps(record) + "\n")

    def training(self, batches: int, metrics: dict[str, Any]) -> None:
        """The averaged metrics of the batches up to `batches`, and a progress line."""
        self.write("training", batches, metrics)
        if self.first_batch is None:  # the rate from the first report on: start-up excluded
            self.first_batch, self.start = batches, time.monotonic()
            left = "?"
        else:
            rate = (time.monotonic() - self.start) / (batches - self.first_batch)
            left = f"{rate * (self.total - batches) / 60:.1f} min"
        print(
            f"[{batches}/{self.total}] loss {metrics['loss']:.4f} "
            f"lr {metrics['lr']:.3g} time left {left}",
            flush=True,
        )

    def validation(self, batches: int, metrics: dict[str, Any]) -> None:
        self.write("validation", batches, metrics)


def print_final_validation(metrics_path: Path, checkpoints: Path | str) -> None:
    """The last validation's COCO numbers, and where the checkpoints and metrics are."""
    if not metrics_path.is_file():
        print("Nothing was trained: the run had already reached its length.")
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    validations = [r for r in records if r["kind"] == "validation"]
    if not validations:
        print("No validation was reported.")
        return
    last: dict[str, Any] = validations[-1]
    print(f"\nValidation after {last['batches']} batches:")
    for name, value in last["metrics"].items():
        if name.startswith(("bbox_", "segm_")):
            print(f"  {name:<18} {value:.3f}")
    print(f"Checkpoints: {checkpoints}  Metrics: {metrics_path}")
