"""The set-up and CI scripts pass shellcheck."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHELLCHECK = Path(sys.executable).parent / "shellcheck"


@pytest.mark.parametrize("script", ["scripts/setup_env.sh", ".ci/run"])
def test_shellcheck(script: str) -> None:
    result = subprocess.run(
        [str(SHELLCHECK), "--shell=bash", str(REPO / script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout
