"""The expconf validator against Determined's own schema test cases, then on our experiments."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.expconf import EXPCONF_DIR, EXPERIMENT_URL, completeness_errors, sanity_errors

if not (EXPCONF_DIR / "expconf" / "v0").is_dir():
    pytest.skip(
        f"Determined's schemas are not at {EXPCONF_DIR} (clone the repo with `shared/` beside it)",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[3]
CASES_DIR = EXPCONF_DIR / "test_cases" / "v0"
PHASES: dict[str, Callable[[Any, str], list[str]]] = {
    "sanity": sanity_errors,
    "completeness": completeness_errors,
}


def _load_cases() -> list[Any]:
    """Every case that expects a validation outcome (the others test defaults or merging)."""
    keys = ("sane_as", "sanity_errors", "complete_as", "completeness_errors")
    return [
        pytest.param(case, id=f"{path.name}::{case['name']}")
        for path in sorted(CASES_DIR.glob("*.yaml"))
        for case in yaml.safe_load(path.read_text())
        if any(case.get(key) for key in keys)
    ]


@pytest.mark.parametrize("case", _load_cases())
def test_determined_schema_case(case: dict) -> None:
    for phase, validate in PHASES.items():
        for url in case.get("sane_as" if phase == "sanity" else "complete_as") or []:
            errors = validate(case["case"], url)
            assert not errors, f"{phase} check against {url} failed:\n" + "\n".join(errors)
        for url, patterns in (case.get(f"{phase}_errors") or {}).items():
            errors = validate(case["case"], url)
            assert errors, f"{phase} check against {url} passed, expected {patterns}"
            for pattern in patterns:
                # Determined's own runner: every pattern must be found in some error.
                assert any(re.search(pattern, e) for e in errors), (
                    f"{pattern!r} not in {phase} errors against {url}:\n" + "\n".join(errors)
                )


EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def test_experiments_exist() -> None:
    assert len(EXPERIMENTS) >= 4, "experiments/*.yaml went missing"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_yaml_is_sane(path: Path) -> None:
    errors = sanity_errors(yaml.safe_load(path.read_text()), EXPERIMENT_URL)
    assert not errors, "\n".join(errors)


def _break_mistyped_key(config: dict) -> None:
    config["resource"] = config.pop("resources")


def _break_hparam_type(config: dict) -> None:
    config["hyperparameters"]["lr"] = {"type": "log", "base": 10, "minval": "a", "maxval": -1}


def _break_hparam_missing_maxval(config: dict) -> None:
    config["hyperparameters"]["lr"] = {"type": "int", "minval": 1}


def _break_hparam_range(config: dict) -> None:
    config["hyperparameters"]["lr"] = {"type": "double", "minval": 0.1, "maxval": 0.01}


def _break_hparam_unknown_type(config: dict) -> None:
    config["hyperparameters"]["lr"] = {"type": "gauss", "mean": 0.02}


def _break_searcher_name(config: dict) -> None:
    config["searcher"]["name"] = "bayesian"


def _break_grid_without_count(config: dict) -> None:
    config["searcher"]["name"] = "grid"
    config["hyperparameters"]["lr"] = {"type": "double", "minval": 0.01, "maxval": 0.02}


def _break_slots(config: dict) -> None:
    config["resources"]["slots_per_trial"] = -1


def _break_shm_size(config: dict) -> None:
    config["resources"]["shm_size"] = "16 gigs"


def _break_bind_mount(config: dict) -> None:
    del config["bind_mounts"][0]["container_path"]


def _break_bind_mount_host_path(config: dict) -> None:
    config["bind_mounts"][0]["host_path"] = "data/coco"


def _break_max_restarts(config: dict) -> None:
    config["max_restarts"] = -1


def _break_checkpoint_storage(config: dict) -> None:
    config["checkpoint_storage"] = {"type": "shared_fs", "host_path": "/mnt", "storage_path": "/x"}


BROKEN = [
    (_break_mistyped_key, r"<config>: .*'resource' was unexpected"),
    (_break_hparam_type, r"<config>\.hyperparameters\.lr\.minval: 'a' is not of type"),
    (_break_hparam_missing_maxval, r"<config>\.hyperparameters\.lr: 'maxval' is a required"),
    (_break_hparam_range, r"<config>\.hyperparameters\.lr: minval must be less than maxval"),
    (_break_hparam_unknown_type, r"<config>\.hyperparameters\.lr: .*must be one of \"int\""),
    (_break_searcher_name, r"<config>\.searcher: .*one of 'single', 'random'"),
    (_break_grid_without_count, r"<config>\.hyperparameters\.lr: grid search .* count"),
    (_break_slots, r"<config>\.resources\.slots_per_trial: -1 is less than the minimum of 0"),
    (_break_shm_size, r"<config>\.resources\.shm_size: must be a valid memory size"),
    (_break_bind_mount, r"<config>\.bind_mounts\[0\]: 'container_path' is a required"),
    (_break_bind_mount_host_path, r"<config>\.bind_mounts\[0\]\.host_path: .* absolute"),
    (_break_max_restarts, r"<config>\.max_restarts: -1 is less than the minimum of 0"),
    (_break_checkpoint_storage, r"<config>\.checkpoint_storage: storage_path must either"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(m, e, id=m.__name__.removeprefix("_break_")) for m, e in BROKEN],
)
def test_broken_maskrcnn_variant_is_rejected(mutate: Callable[[dict], None], expected: str) -> None:
    original = yaml.safe_load((REPO / "experiments" / "maskrcnn.yaml").read_text())
    config = copy.deepcopy(original)
    mutate(config)
    errors = sanity_errors(config)
    assert any(re.search(expected, e) for e in errors), "\n".join(errors) or "no errors"
    assert not sanity_errors(original), "the unbroken config must pass for this test to mean much"
