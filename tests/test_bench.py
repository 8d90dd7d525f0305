"""Smoke of the benchmarks: `python -m bench.run --quick` reports every row, measured."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAINING_ROWS = (
    "Training s/iteration, RetinaNet",
    "Training s/iteration, Mask R-CNN",
    "Peak resident memory, RetinaNet",
    "Peak resident memory, Mask R-CNN",
    "Data loader images/s",
)
EVALUATION_ROWS = ("COCO bbox evaluation", "COCO segm evaluation")


@pytest.mark.slow
def test_quick_run_reports_every_row_with_finite_figures(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "- command: `python -m bench.run --quick --out" in text
    for key in ("- date:", "- CPU:", "- cores:", "- RAM:", "- versions: torch "):
        assert key in text
    assert "missing" not in text and "failed" not in text

    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and cells[0] != "measure":
            rows[cells[0]] = cells
    for name in TRAINING_ROWS + EVALUATION_ROWS:
        (cells,) = [cells for measure, cells in rows.items() if measure.startswith(name)]
        ours, baseline, ratio = (float(cells[i]) for i in (1, 2, 4))
        assert all(math.isfinite(v) and v > 0 for v in (ours, baseline, ratio)), cells
        assert cells[5].startswith(("<=", ">=")) and cells[6] in ("yes", "NO")
        assert re.search(rf"\*\*{re.escape(cells[0])}\*\* \(baseline: ", text)  # its details
    # The printed table is the report's.
    assert all(measure in result.stdout for measure in rows)
