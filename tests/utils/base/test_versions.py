from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from utils.base import versions

REPO = Path(__file__).resolve().parents[3]
INSTALLED = md.version  # before any test patches it


def test_installed_stack_matches_the_lock() -> None:
    pins = versions.pinned_versions()
    assert pins["mmcv"] == "2.1.0" and pins["mmdet"] == "3.3.0" and pins["torch"] == "2.14.1"
    assert versions.version_problems(pins) == []
    versions.check_versions()  # model_def.py's start-up check
    assert pins["ray"] == "2.60.0" and pins["optuna"] == "5.0.0"
    versions.check_versions("ray")  # the Ray adapter's


def test_each_engine_checks_the_shared_stack_and_its_own_packages() -> None:
    shared = versions.SHARED
    assert versions.checked_packages() == (*shared, "mmcv")
    assert versions.checked_packages("determined") == (*shared, "determined", "mmcv")
    assert versions.checked_packages("ray") == (*shared, "ray", "hyperopt", "optuna", "mmcv")
    with pytest.raises(ValueError, match="engine 'rey' is unknown; use one of determined, ray"):
        versions.check_versions("rey")


def without(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """`package` as if it were not installed (for the version check), the others as they are."""

    def version(name: str) -> str:
        if name == package:
            raise md.PackageNotFoundError(name)
        return INSTALLED(name)

    monkeypatch.setattr(versions.md, "version", version)


def test_an_engine_does_not_need_the_other_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    without(monkeypatch, "determined")
    versions.check_versions("ray")
    with pytest.raises(RuntimeError, match="determined: installed nothing, pinned 0.38.1"):
        versions.check_versions()
    without(monkeypatch, "ray")
    versions.check_versions("determined")
    with pytest.raises(RuntimeError, match="ray: installed nothing, pinned 2.60.0"):
        versions.check_versions("ray")


def test_mismatch_names_package_and_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    pins = versions.pinned_versions()
    pins["mmdet"], pins["optuna"] = "3.2.0", "0.1.0"
    monkeypatch.setattr(versions, "pinned_versions", lambda: pins)
    with pytest.raises(RuntimeError) as err:
        versions.check_versions()
    message = str(err.value)
    assert f"mmdet: installed {INSTALLED('mmdet')}, pinned 3.2.0" in message
    assert "make setup" in message
    assert "optuna" not in message  # Ray's, not model_def.py's
    with pytest.raises(RuntimeError) as err:
        versions.check_versions("ray")
    message = str(err.value)
    assert f"mmdet: installed {INSTALLED('mmdet')}, pinned 3.2.0" in message
    assert f"optuna: installed {INSTALLED('optuna')}, pinned 0.1.0" in message


def test_missing_package_is_reported() -> None:
    problems = versions.version_problems({"not-a-package": "1.0"}, names=("not-a-package",))
    assert problems == ["not-a-package: installed nothing, pinned 1.0"]


def test_the_set_up_checks_every_engine() -> None:
    """`python -m utils.base.versions`, the set-up's last step: all the lock installs."""
    result = subprocess.run(
        [sys.executable, "-m", "utils.base.versions"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("mmdet 3.3.0", "determined 0.38.1", "ray 2.60.0", "optuna 5.0.0", "mmcv 2.1.0"):
        assert name in result.stdout
