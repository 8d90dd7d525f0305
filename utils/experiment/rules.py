"""What a Determined 0.38.1 master accepts in the experiment sections this package relies on:
`searcher`, `hyperparameters` and `resources`.

Two levels, as on the master:

- `section_problems(exp)`: what its first check of a submitted config (the "sanity" check)
  rejects there: unknown keys, wrong types and ranges, unknown searchers and hyperparameter
  types, a grid search without counts. `tests/utils/experiment/test_expconf_rules.py` holds
  these rules equal to Determined's own schemas and schema test cases.
- `submission_problems(exp)`: also what the master requires before it runs the experiment: a
  searcher with a name and a metric, the searcher's own required keys, no searcher that 0.38
  removed, and ASHA's `max_time` and `time_metric` (0.38 no longer reads `max_length` for it).

Each problem names the key at fault and says what to use instead. Pure Python: no Determined
import, so the rules hold on any machine.
"""

from __future__ import annotations

from typing import Any

from utils.experiment.values import (
    LENGTH_UNITS,
    Rule,
    anything,
    boolean,
    close_match,
    integer,
    integer_list,
    is_number,
    length,
    mapping_problems,
    number,
    one_of,
    resources_problems,
    string,
)

CURRENT_SEARCHERS = ("single", "random", "grid", "adaptive_asha", "async_halving")
# Still parsed by 0.38.1 (old experiments), refused for new ones.
REMOVED_SEARCHERS = ("custom", "adaptive", "adaptive_simple", "sync_halving")
HYPERPARAMETER_TYPES = ("const", "int", "double", "log", "categorical")


# Searchers.

_COMMON = {
    "name": anything,
    "metric": string,
    "smaller_is_better": boolean,
    "source_trial_id": integer(),
    "source_checkpoint_uuid": string,
}
_MODE = one_of(None, "aggressive", "standard", "conservative")
_DIVISOR = number(above=1)
SEARCHER_RULES: dict[str, dict[str, Rule]] = {
    "single": {"max_length": length(1, integers=True)},
    "random": {
        "max_length": length(1, integers=True),
        "max_trials": integer(1),
        "max_concurrent_trials": integer(0),
    },
    "grid": {"max_length": length(1, integers=True), "max_concurrent_trials": integer(0)},
    "adaptive_asha": {
        "max_length": length(1, integers=True),
        "max_trials": integer(1),
        "max_time": integer(),
        "time_metric": string,
        "bracket_rungs": integer_list,
        "mode": _MODE,
        "divisor": _DIVISOR,
        "max_rungs": integer(1),
        "max_concurrent_trials": integer(0),
        "stop_once": boolean,
    },
    "async_halving": {
        "max_length": length(1),
        "max_trials": integer(1),
        "max_time": integer(),
        "time_metric": string,
        "num_rungs": integer(1),
        "divisor": _DIVISOR,
        "max_concurrent_trials": integer(0),
        "stop_once": boolean,
    },
    "custom": {"unit": one_of(*LENGTH_UNITS, None)},
    "adaptive": {
        "max_length": length(1),
        "budget": length(0),
        "bracket_rungs": integer_list,
        "mode": _MODE,
        "divisor": _DIVISOR,
        "max_rungs": integer(1),
        "train_stragglers": boolean,
    },
    "adaptive_simple": {
        "max_length": length(1),
        "max_trials": integer(1, 2000),
        "mode": _MODE,
        "divisor": _DIVISOR,
        "max_rungs": integer(1),
    },
    "sync_halving": {
        "max_length": length(1),
        "budget": length(1),
        "num_rungs": integer(1),
        "divisor": _DIVISOR,
        "train_stragglers": boolean,
    },
}
SEARCHER_RULES = {name: {**_COMMON, **rules} for name, rules in SEARCHER_RULES.items()}
# Any searcher's keys: what a searcher without a name may hold.
SEARCHER_KEYS = list(dict.fromkeys(key for rules in SEARCHER_RULES.values() for key in rules))
# What each searcher needs before the master runs it.
SEARCHER_REQUIRED = {
    "random": ("max_trials",),
    "adaptive_asha": ("max_trials", "max_time", "time_metric"),
    "async_halving": ("num_rungs", "max_trials", "max_time", "time_metric"),
}


def searcher_problems(searcher: Any) -> list[str]:
    """What the master's first check rejects in the `searcher` section."""
    if searcher is None:
        return []
    if not isinstance(searcher, dict):
        return [f"searcher is {searcher!r}: write a mapping with a name and a metric."]
    unknown = [key for key in searcher if key not in SEARCHER_KEYS]
    problems = [
        f"searcher.{key} is not a searcher key{close_match(key, SEARCHER_KEYS)}." for key in unknown
    ]
    if "name" not in searcher:
        known = {key: value for key, value in searcher.items() if key in _COMMON}
        return problems + mapping_problems(known, _COMMON, "searcher", "a searcher")
    name = searcher["name"]
    if not isinstance(name, str) or name not in SEARCHER_RULES:
        return [
            *problems,
            f"searcher.name {name!r} is not a searcher of Determined 0.38.1"
            f"{close_match(name, CURRENT_SEARCHERS)} (searchers: {', '.join(CURRENT_SEARCHERS)}).",
        ]
    rules = SEARCHER_RULES[name]
    known = {key: value for key, value in searcher.items() if key not in unknown}
    if name == "custom":  # the removed custom searcher took any searcher key
        rules = {**dict.fromkeys(SEARCHER_KEYS, anything), **rules}
    return problems + mapping_problems(known, rules, "searcher", f"the {name} searcher")


# Hyperparameters.

HYPERPARAMETER_RULES: dict[str, dict[str, Rule]] = {
    "const": {"val": anything},
    "categorical": {"vals": lambda v: None if isinstance(v, list) else "a list"},
    "int": {"minval": integer(null=False), "maxval": integer(null=False), "count": integer(1)},
    "double": {"minval": number(null=False), "maxval": number(null=False), "count": integer(1)},
    "log": {
        "minval": number(null=False),
        "maxval": number(null=False),
        "base": number(above=0, null=False),
        "count": integer(1),
    },
}
HYPERPARAMETER_REQUIRED = {
    "const": ("val",),
    "categorical": ("vals",),
    "int": ("minval", "maxval"),
    "double": ("minval", "maxval"),
    "log": ("minval", "maxval", "base"),
}
GRID_COUNTED = ("int", "double", "log")


def hyperparameter_problems(spec: Any, path: str) -> list[str]:
    """What the master rejects in one hyperparameter (`path` names it, e.g. `hyperparameters.lr`).

    A mapping with a `type` key is a hyperparameter of that type; one without is a group of
    hyperparameters; anything else is a constant.
    """
    if not isinstance(spec, dict):
        return []
    if "type" not in spec:
        return [
            p
            for key, inner in spec.items()
            for p in hyperparameter_problems(inner, f"{path}.{key}")
        ]
    kind = spec["type"]
    if not isinstance(kind, str) or kind not in HYPERPARAMETER_RULES:
        return [
            f"{path}: unknown type {kind!r}; use {', '.join(HYPERPARAMETER_TYPES[:-1])} or "
            f"{HYPERPARAMETER_TYPES[-1]}. Determined reads any mapping with a 'type' key as a "
            "hyperparameter: wrap an mmdet config mapping as {type: const, val: {...}}."
        ]
    rules = {"type": anything, **HYPERPARAMETER_RULES[kind]}
    owner = f"{'an' if kind == 'int' else 'a'} {kind} hyperparameter"
    problems = [
        f"{path}: {owner} needs {key}." for key in HYPERPARAMETER_REQUIRED[kind] if key not in spec
    ]
    problems += mapping_problems(spec, rules, path, owner)
    low, high = spec.get("minval"), spec.get("maxval")
    if kind in GRID_COUNTED and is_number(low) and is_number(high) and low >= high:
        problems.append(f"{path}: minval {low} must be less than maxval {high}.")
    return problems


def grid_problems(spec: Any, path: str, named: bool) -> list[str]:
    """A grid search needs a `count` of values for every int, double and log hyperparameter
    (also inside lists and groups); `named`: the searcher says grid (else it names none)."""
    if isinstance(spec, list):
        return [
            p for i, inner in enumerate(spec) for p in grid_problems(inner, f"{path}[{i}]", named)
        ]
    if not isinstance(spec, dict):
        return []
    if "type" not in spec:
        return [
            p for key, inner in spec.items() for p in grid_problems(inner, f"{path}.{key}", named)
        ]
    kind = spec["type"]
    why = "grid search" if named else "a searcher without a name (read as grid search)"
    if not isinstance(kind, str):
        return [f"{path}.type is {kind!r}: use a hyperparameter type's name."]
    if kind in GRID_COUNTED and spec.get("count") is None:
        return [f"{path}: {why} needs a count of values for this {kind} hyperparameter."]
    return []


def hyperparameters_problems(specs: Any) -> list[str]:
    """What the master's first check rejects in the `hyperparameters` section."""
    if specs is None:
        return []
    if not isinstance(specs, dict):
        return [f"hyperparameters is {specs!r}: write a mapping of names to values."]
    return [
        p
        for name, spec in specs.items()
        for p in hyperparameter_problems(spec, f"hyperparameters.{name}")
    ]


# The experiment.


def grid_applies(searcher: Any) -> bool:
    """Whether the master asks hyperparameters for grid counts: for a grid searcher, and (its
    schema's reading) for a searcher that names none."""
    return not isinstance(searcher, dict) or searcher.get("name", "grid") == "grid"


def section_problems(exp: dict[str, Any]) -> list[str]:
    """What the master's first check of a submitted config rejects in `searcher`,
    `hyperparameters` and `resources`."""
    searcher, specs = exp.get("searcher"), exp.get("hyperparameters")
    problems = searcher_problems(searcher) + hyperparameters_problems(specs)
    if isinstance(specs, dict) and grid_applies(searcher):
        named = isinstance(searcher, dict) and "name" in searcher
        for name, spec in specs.items():
            problems += grid_problems(spec, f"hyperparameters.{name}", named)
    return problems + resources_problems(exp.get("resources"))


def submission_problems(exp: dict[str, Any]) -> list[str]:
    """`section_problems`, and what the master requires before it runs the experiment."""
    problems = section_problems(exp)
    searcher = exp.get("searcher")
    if not isinstance(searcher, dict):
        if searcher is None:
            problems.append(
                f"searcher is missing: add one with a name ({', '.join(CURRENT_SEARCHERS)}) and "
                "the validation metric to rank checkpoints by, e.g. {name: single, metric: "
                "bbox_mAP, smaller_is_better: false}."
            )
        return problems
    name = searcher.get("name")
    if name is None:
        problems.append(f"searcher.name is not set: use one of {', '.join(CURRENT_SEARCHERS)}.")
    elif name in REMOVED_SEARCHERS:
        problems.append(
            f"searcher.name {name!r}: Determined 0.38 removed this searcher and refuses it for new "
            f"experiments; use one of {', '.join(CURRENT_SEARCHERS)}."
        )
    if searcher.get("metric") is None:
        problems.append(
            "searcher.metric is not set: name the validation metric that ranks checkpoints and "
            "trials, e.g. bbox_mAP (with smaller_is_better: false)."
        )
    missing = [key for key in SEARCHER_REQUIRED.get(name, ()) if searcher.get(key) is None]
    if missing:
        length_note = (
            " (Determined 0.38 trains each trial for max_time units of time_metric, batches or "
            "epochs; max_length is no longer read)"
            if {"max_time", "time_metric"} & set(missing)
            else ""
        )
        problems.append(
            f"searcher: the {name} searcher needs {' and '.join(missing)}{length_note}."
        )
    return problems
