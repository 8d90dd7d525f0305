from __future__ import annotations

import importlib.metadata as md

import pytest

from utils.base import versions


def test_installed_stack_matches_the_lock() -> None:
    pins = versions.pinned_versions()
    assert pins["mmcv"] == "2.1.0" and pins["mmdet"] == "3.3.0" and pins["torch"] == "2.14.1"
    assert versions.version_problems(pins) == []
    versions.check_versions()
    assert pins["ray"] == "2.60.0" and pins["optuna"] == "5.0.0"
    versions.check_versions(versions.RAY_CHECKED)  # the Ray adapter's own start-up check


def test_mismatch_names_package_and_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    pins = versions.pinned_versions()
    pins["mmdet"] = "3.2.0"
    monkeypatch.setattr(versions, "pinned_versions", lambda: pins)
    with pytest.raises(RuntimeError) as err:
        versions.check_versions()
    message = str(err.value)
    assert f"mmdet: installed {md.version('mmdet')}, pinned 3.2.0" in message
    assert "make setup" in message


def test_missing_package_is_reported() -> None:
    problems = versions.version_problems({"not-a-package": "1.0"}, names=("not-a-package",))
    assert problems == ["not-a-package: installed nothing, pinned 1.0"]
