"""Smoke of the benchmarks: `python -m bench.run --quick` reports every row, measured."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAINING_ROWS = (
    "Training s/iteration, RetinaNet",
    "Training s/iteration, Mask R-CNN",
    "Peak resident memory, RetinaNet",
    "Peak resident memory, Mask R-CNN",
    "Data loader images/s",
)
ENGINE_ROWS = (
    "Training s/iteration on Ray Train vs mmengine Runner",
    "Training s/iteration on Ray Train vs Determined local Trainer",
)
SERVE_ROWS = ("Serving throughput", "Serving latency p50", "Serving latency p99")
STARTUP_ROWS = (
    "Start-up to first batch, first run",
    "Start-up peak, first run",
    "Start-up to first batch, later runs",
    "Start-up peak, later runs",
    "Annotation checks of 8 ranks",
    "Sanity pass share of the start-up",
)
EVALUATION_ROWS = ("COCO bbox evaluation", "COCO segm evaluation", "Evaluation plots")
VALIDATION_ROWS = (
    "COCO bbox validation at COCO-val size",
    "COCO segm validation at COCO-val size",
    "Chief's peak memory, COCO bbox validation",
    "Chief's peak memory, COCO segm validation",
)
BATCH_PREDICT_ROWS = ("Batch inference images/s",)
# Every section of `bench.run`, with the rows it reports: one test each, so that pytest-xdist
# spreads them over its workers (tests/conftest.py).
SECTION_ROWS = {
    "training": TRAINING_ROWS,
    "evaluation": EVALUATION_ROWS,
    "validation": VALIDATION_ROWS,
    "engines": ENGINE_ROWS,
    "serve": SERVE_ROWS,
    "startup": STARTUP_ROWS,
    "batch_predict": BATCH_PREDICT_ROWS,
}


def test_every_section_is_smoked() -> None:
    from bench.run import SECTIONS

    assert set(SECTION_ROWS) == set(SECTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("section", list(SECTION_ROWS))
def test_quick_run_reports_every_row_with_finite_figures(section: str, tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--sections", section, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,  # minutes here; CI's slowest machine of our kind is 2.5x slower
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert f"- command: `python -m bench.run --quick --sections {section} --out" in text
    for key in ("- date:", "- CPU:", "- cores:", "- RAM:", "- versions: torch "):
        assert key in text
    assert "missing" not in text and "failed" not in text

    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and cells[0] not in ("measure", "---"):
            rows[cells[0]] = cells
    assert rows  # the section reported rows: none is kept from an earlier report here
    for name in SECTION_ROWS[section]:
        found = [cells for measure, cells in rows.items() if measure.startswith(name)]
        assert found, name
    for cells in rows.values():
        ours, baseline, ratio = (float(cells[i]) for i in (1, 2, 4))
        assert all(math.isfinite(v) and v > 0 for v in (ours, baseline, ratio)), cells
        assert cells[5].startswith(("<=", ">=")) and cells[6] in ("yes", "NO")
        assert re.search(rf"\*\*{re.escape(cells[0])}\*\* \(baseline: ", text)  # its details
    # The printed table is the report's.
    assert all(measure in result.stdout for measure in rows)


def test_partial_run_keeps_the_other_rows_with_their_date(tmp_path: Path) -> None:
    """`--sections`: the rows not re-measured come back from the report, saying when."""
    import datetime

    from bench.run import KEPT_MARK, merged, previous_rows, report

    def row(measure: str, ours: float) -> dict:
        return {"measure": measure, "unit": "s", "ours": ours, "baseline": 2.0,
                "baseline_name": "base", "ratio": ours / 2, "ratio_definition": "ours / base",
                "goal": "<= 1.00", "met": True, "details": f"details of {measure}"}  # fmt: skip

    started = datetime.datetime(2026, 12, 1, 10, 0)
    old = report("python -m bench.run", started, 60, ((0,), (0,)), [row("a", 1), row("b", 1)], {})
    (tmp_path / "old.md").write_text(old)
    kept, measured = previous_rows(tmp_path / "old.md")
    assert [r["measure"] for r in kept] == ["a", "b"] and kept[0]["ours"] == 1.0
    assert measured == "2026-12-01 10:00 UTC with `python -m bench.run`"
    rows = merged(kept, measured, [row("b", 1.5), row("c", 1)])
    assert [(r["measure"], r["ours"]) for r in rows] == [("a", 1.0), ("b", 1.5), ("c", 1.0)]
    assert rows[0]["details"] == f"details of a {KEPT_MARK} {measured})"
    assert KEPT_MARK not in rows[1]["details"] + rows[2]["details"]
    # Kept again by a later partial run: still its first date.
    assert merged(rows, "later", [])[0]["details"] == rows[0]["details"]
