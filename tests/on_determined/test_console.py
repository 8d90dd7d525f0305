"""What a local run prints: the progress line and the COCO table, without Determined's own INFO
lines around each report unless MMDET_DETERMINED_ENGINE_LOG=1 asks for them. A real short run of
the demo experiment in its own process, as `make demo` starts it."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from on_determined.logs import ENGINE_LOG_VARIABLE, quiet_engine_log

REPO = Path(__file__).resolve().parents[2]
# Determined's lines as the console shows them (det.LOG_FORMAT: "INFO: [pid] logger: message").
ENGINE_LINES = {
    "report_training_metrics": r"^INFO: \[\d+\] determined\.core: report_training_metrics\(",
    "report_progress": r"^INFO: \[\d+\] determined\.core: report_progress with progress=",
    "upload_tensorboard_files": r"^INFO: \[\d+\] determined\.core: upload_tensorboard_files\(\)",
    "status": r"^INFO: \[\d+\] determined\.core: status: ",
}
PROGRESS_LINE = r"^\[1/2\] loss \d+\.\d{4} lr \S+ time left "
COCO_TABLE = r"Average Precision\s+\(AP\) @\[ IoU=0\.50:0\.95 \| area=\s*all \| maxDets=\d+ \] = "


def console(tmp_path: Path, synthetic_cache: Path, engine_log: str | None) -> str:
    """stdout and stderr of a 2-batch demo run on 16 + 4 generated images."""
    data = {"num_train": 16, "num_val": 4, "image_size": 128, "max_instances": 3}
    argv = [
        *("model_def.py", "experiments/demo.yaml", "--local", "--max-batches", "2"),
        *("--report-every", "1", "--output", str(tmp_path / "run")),
        *("--set", f"data.cache_dir={synthetic_cache}"),
        *("--set", f"data.synthetic={json.dumps(data)}"),
    ]
    env = {k: v for k, v in os.environ.items() if k != ENGINE_LOG_VARIABLE}
    env["OMP_NUM_THREADS"] = "1"
    if engine_log is not None:
        env[ENGINE_LOG_VARIABLE] = engine_log
    result = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def found(pattern: str, text: str) -> bool:
    return re.search(pattern, text, flags=re.MULTILINE) is not None


@pytest.mark.parametrize("engine_log", [None, "1"], ids=["default", "engine-log"])
def test_console_of_a_local_run(
    tmp_path: Path, synthetic_cache: Path, engine_log: str | None
) -> None:
    output = console(tmp_path, synthetic_cache, engine_log)
    assert found(PROGRESS_LINE, output), output[-3000:]
    assert found(COCO_TABLE, output), output[-3000:]
    shown = {name for name, pattern in ENGINE_LINES.items() if found(pattern, output)}
    assert shown == (set(ENGINE_LINES) if engine_log == "1" else set()), output[-3000:]


def test_warnings_and_errors_still_show(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("determined.core")
    level = logger.level
    monkeypatch.delenv(ENGINE_LOG_VARIABLE, raising=False)
    try:
        quiet_engine_log()
        assert not logger.isEnabledFor(logging.INFO)
        assert logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
    finally:
        logger.setLevel(level)
