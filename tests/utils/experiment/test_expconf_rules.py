"""utils/experiment/rules.py against Determined 0.38.1's own schemas: the rules accept exactly what
the master's sanity check accepts in `searcher`, `hyperparameters` and `resources`.

Two sources of configs: Determined's schema test cases that concern those sections, and
mutations of them and of our experiments' sections (a key dropped, renamed, or set to a value of
another type or range), each judged by Determined's schemas through tests/expconf.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.expconf import EXPCONF_DIR, completeness_errors, sanity_errors
from utils.experiment import rules as rules

if not (EXPCONF_DIR / "test_cases" / "v0").is_dir():
    pytest.skip(
        f"Determined's schemas are not at {EXPCONF_DIR} (clone the repo with `shared/` beside it)",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[3]
SCHEMAS = "http://determined.ai/schemas/expconf/v0/"
SECTIONS = ("searcher", "hyperparameters", "resources")


def _one_hyperparameter(case: Any) -> list[str]:
    return rules.hyperparameter_problems(case, "hyperparameters.x")


# Which of our rules reads a config that Determined validates against each schema.
OUR_RULE: dict[str, Callable[[Any], list[str]]] = {
    "searcher": rules.searcher_problems,
    "hyperparameter": _one_hyperparameter,
    "hyperparameters": rules.hyperparameters_problems,
    "check-grid-hyperparameter": lambda case: rules.grid_problems(case, "hyperparameters", True),
    "resources": rules.resources_problems,
    "experiment": lambda case: rules.section_problems(restricted(case)),
}


def our_rule(url: str) -> Callable[[Any], list[str]] | None:
    """Our rule for a schema URL; `searcher-single.json` and the like are read by the searcher's
    rule (the union dispatches on the name), `hyperparameter-int.json` by the hyperparameter's."""
    name = url.removeprefix(SCHEMAS).removesuffix(".json")
    if name in OUR_RULE:
        return OUR_RULE[name]
    for prefix in ("searcher", "hyperparameter"):
        if name.startswith(prefix + "-") and name not in ("searcher-length",):
            return OUR_RULE[prefix]
    return None


def restricted(config: Any) -> Any:
    """The sections the rules cover, of an experiment config."""
    if not isinstance(config, dict):
        return config
    return {key: config[key] for key in SECTIONS if key in config}


def _cases() -> Iterator[Any]:
    for path in sorted((EXPCONF_DIR / "test_cases" / "v0").glob("*.yaml")):
        for case in yaml.safe_load(path.read_text()):
            urls = [*(case.get("sane_as") or []), *(case.get("sanity_errors") or {})]
            concerned = [url for url in urls if our_rule(url)]
            if "experiment.json" in " ".join(concerned) and not restricted(case["case"]):
                continue  # an experiment case about other sections
            if concerned:
                yield pytest.param(case, id=f"{path.name}::{case['name']}")


CASES = list(_cases())


def test_the_cases_cover_each_section() -> None:
    urls = " ".join(
        url
        for param in CASES
        for url in [
            *(param.values[0].get("sane_as") or []),
            *param.values[0].get("sanity_errors", {}),
        ]
    )
    for schema in ("searcher", "hyperparameter", "check-grid", "resources", "experiment"):
        assert f"/{schema}" in urls, schema
    assert any(param.values[0].get("sanity_errors") for param in CASES)


@pytest.mark.parametrize("case", CASES)
def test_determined_schema_case(case: dict) -> None:
    config = case["case"]
    for url in case.get("sane_as") or []:
        rule = our_rule(url)
        if rule:
            assert rule(config) == [], f"Determined accepts it against {url}"
    for url in case.get("sanity_errors") or {}:
        rule = our_rule(url)
        if rule:
            assert rule(config), (
                f"Determined rejects it against {url}: {case['sanity_errors'][url]}"
            )


# Mutations: each seed section, a key at a time (and one level down), changed to another value.

VALUES: list[Any] = [
    None,
    -1,
    0,
    1,
    2.0,
    1.5,
    "x",
    "1.5 GiB",
    "/dev/a:/dev/b",
    True,
    [],
    [1, "a"],
    {},
    {"batches": 0},
    {"epochs": 3},
    {"type": "int", "minval": 1, "maxval": 2},
    {"type": "gauss"},
    {"host_path": "/a", "container_path": "/b"},
]
NAMES = [*rules.CURRENT_SEARCHERS, *rules.REMOVED_SEARCHERS, "bayes", None, 3]
TYPES = [*rules.HYPERPARAMETER_TYPES, "gauss", None, 3]


def mutants(seed: Any, depth: int = 2) -> Iterator[Any]:
    """Copies of `seed` with one change: a key removed, added, or given another value."""
    yield seed
    if not isinstance(seed, dict):
        return
    yield {**seed, "bogus": 1}
    for key, value in seed.items():
        yield {k: v for k, v in seed.items() if k != key}
        options = NAMES if key == "name" else TYPES if key == "type" else VALUES
        for option in options:
            if option != value or type(option) is not type(value):
                yield {**seed, key: copy.deepcopy(option)}
        if depth > 1 and isinstance(value, dict):
            for inner in mutants(value, depth - 1):
                yield {**seed, key: inner}


def experiment_sections() -> list[dict]:
    paths = sorted((REPO / "experiments").glob("*.yaml"))
    return [restricted(yaml.safe_load(path.read_text())) for path in paths]


def _seeds(url_part: str, section: str | None) -> list[Any]:
    found = [
        param.values[0]["case"]
        for param in CASES
        if any(
            url_part in url
            for url in [
                *(param.values[0].get("sane_as") or []),
                *param.values[0].get("sanity_errors", {}),
            ]
        )
    ]
    if section:
        found += [exp[section] for exp in experiment_sections() if section in exp]
    return found


SEEDS = {
    "searcher": (_seeds("/searcher", "searcher"), rules.searcher_problems),
    "hyperparameters": (
        [{"x": seed} for seed in _seeds("/hyperparameter", None)]
        + [exp["hyperparameters"] for exp in experiment_sections()],
        rules.hyperparameters_problems,
    ),
    "resources": (_seeds("/resources", "resources"), rules.resources_problems),
}


def unique(configs: Iterator[Any]) -> list[Any]:
    return list({repr(config): config for config in configs}.values())


@pytest.mark.parametrize("schema", SEEDS)
def test_mutated_sections_agree_with_determined(schema: str) -> None:
    """Each mutant is accepted by our rules exactly when Determined's sanity check accepts it;
    a searcher that its completeness check rejects (a required key missing) is refused for
    submission too (which also refuses removed searchers and ASHA without max_time)."""
    seeds, ours = SEEDS[schema]
    url = f"{SCHEMAS}{schema}.json"
    configs = unique(mutant for seed in unique(iter(seeds)) for mutant in mutants(seed))
    disagreements = []
    for config in configs:
        determined, mine = sanity_errors(config, url), ours(config)
        if bool(determined) != bool(mine):
            disagreements.append(f"{config!r}\n  Determined: {determined}\n  ours: {mine}")
        elif schema == "searcher" and not determined and completeness_errors(config, url):
            if not rules.submission_problems({"searcher": config}):
                disagreements.append(f"{config!r}: incomplete for Determined, not for us")
    assert len(configs) > 200
    assert not disagreements, f"{len(disagreements)} of {len(configs)}:\n" + "\n".join(
        disagreements[:5]
    )


def test_mutated_experiments_agree_with_determined() -> None:
    """The sections together: a grid searcher (or none) asks each hyperparameter for a count."""
    url = f"{SCHEMAS}experiment.json"
    grid_hparams = {"lr": {"type": "double", "minval": 0.01, "maxval": 0.02, "count": 3}}
    grid_seeds = [
        {"searcher": {"name": "grid", "metric": "m"}, "hyperparameters": grid_hparams},
        {"hyperparameters": grid_hparams},
        {"searcher": None, "hyperparameters": {"a": 1, "b": [1, {"type": "const", "val": 2}]}},
    ]
    configs = unique(
        mutant
        for seeds, depth in ((unique(iter(experiment_sections())), 1), (grid_seeds, 3))
        for seed in seeds
        for mutant in mutants(seed, depth)
        if not set(mutant) - set(SECTIONS)  # other top-level keys are not these rules' business
    )
    disagreements = []
    for config in configs:
        determined, mine = sanity_errors(config, url), rules.section_problems(config)
        if bool(determined) != bool(mine):
            disagreements.append(f"{config!r}\n  Determined: {determined}\n  ours: {mine}")
    assert not disagreements, f"{len(disagreements)} of {len(configs)}:\n" + "\n".join(
        disagreements[:5]
    )


@pytest.mark.parametrize(
    ("searcher", "message"),
    [
        ({"name": "bayes", "metric": "bbox_mAP"}, "searcher.name 'bayes' is not a searcher"),
        (
            {"name": "single", "metrc": "bbox_mAP"},
            "searcher.metrc is not a searcher key; did you mean metric?",
        ),
        (
            {"name": "single", "max_trials": 4, "metric": "m"},
            "searcher.max_trials is not a key of the single",
        ),
        ({"name": "random", "metric": "m"}, "the random searcher needs max_trials"),
        (
            {"name": "adaptive_asha", "metric": "m", "max_trials": 4},
            "needs max_time and time_metric",
        ),
        (
            {"name": "adaptive_asha", "metric": "m", "max_trials": 4, "max_time": 3},
            "needs time_metric",
        ),
        ({"name": "custom", "metric": "m"}, "Determined 0.38 removed this searcher"),
        ({"name": "single"}, "searcher.metric is not set"),
        (
            {"name": "random", "metric": "m", "max_trials": 0},
            "searcher.max_trials is 0: use an integer >= 1",
        ),
    ],
)
def test_searcher_problems_are_named(searcher: dict, message: str) -> None:
    problems = rules.submission_problems({"searcher": searcher})
    assert any(message in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("exp", "message"),
    [
        (
            {"hyperparameters": {"lr": {"type": "log", "minval": -4, "maxval": -2}}},
            "a log hyperparameter needs base",
        ),
        (
            {"hyperparameters": {"lr": {"type": "double", "minval": 1, "maxval": 0.1}}},
            "minval 1 must be less than maxval 0.1",
        ),
        (
            {"hyperparameters": {"b": {"type": "int", "minval": 1.5, "maxval": 4}}},
            "hyperparameters.b.minval is 1.5: use an integer",
        ),
        (
            {"hyperparameters": {"lr": {"type": "categorical", "val": [1]}}},
            "hyperparameters.lr.val is not a key of a categorical hyperparameter; did you mean "
            "vals?",
        ),
        (
            {
                "searcher": {"name": "grid", "metric": "m"},
                "hyperparameters": {"lr": {"type": "double", "minval": 0, "maxval": 1}},
            },
            "hyperparameters.lr: grid search needs a count",
        ),
        (
            {"resources": {"slots_per_trial": -1}},
            "resources.slots_per_trial is -1: use an integer >= 0",
        ),
        ({"resources": {"slots_per_trail": 2}}, "did you mean slots_per_trial?"),
        (
            {"resources": {"shm_size": "16 gigs"}},
            "resources.shm_size is '16 gigs': use a memory size",
        ),
    ],
)
def test_hyperparameter_and_resources_problems_are_named(exp: dict, message: str) -> None:
    problems = rules.section_problems(exp)
    assert any(message in problem for problem in problems), problems


def test_our_experiments_are_ready_for_submission() -> None:
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        assert rules.submission_problems(yaml.safe_load(path.read_text())) == [], path.name
