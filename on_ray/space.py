"""An experiment's `hyperparameters` and `searcher` as Ray Tune's search space and scheduler,
with the meaning Determined 0.38 gives them; what Tune cannot honour is an error naming it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from utils.base.errors import ExperimentError

SEARCHERS = ("single", "random", "grid", "adaptive_asha")
SEARCH_ALGS = ("random", "hyperopt", "optuna")
# Determined's defaults for adaptive_asha.
ASHA_DEFAULTS = {"mode": "standard", "divisor": 4, "max_rungs": 5}


def search_space(specs: dict[str, Any], grid: bool, path: str = "hyperparameters") -> dict:
    """Tune's space: `const` and plain values as they are, `double`/`int`/`log`/`categorical`
    as distributions, or (grid) as `grid_search` over Determined's grid points."""
    space: dict[str, Any] = {}
    for name, spec in specs.items():
        where = f"{path}.{name}"
        if isinstance(spec, dict) and "type" not in spec:
            space[name] = search_space(spec, grid, where)  # a nested group
        elif not isinstance(spec, dict):
            space[name] = spec
        else:
            space[name] = _dimension(spec, grid, where)
    return space


def trial_count(num_samples: int, space: dict[str, Any]) -> int:
    """How many trials Tune runs: `num_samples` times each grid's points (Tune repeats the grid
    for every sample)."""
    count = num_samples
    for value in space.values():
        if isinstance(value, dict) and "grid_search" in value:  # tune.grid_search's form
            count *= len(value["grid_search"])
        elif isinstance(value, dict):
            count = trial_count(count, value)
    return count


def _dimension(spec: dict[str, Any], grid: bool, where: str) -> Any:
    kind = spec["type"]
    if kind == "const":
        return spec["val"]
    if kind == "categorical":
        return tune.grid_search(list(spec["vals"])) if grid else tune.choice(list(spec["vals"]))
    low, high = spec["minval"], spec["maxval"]
    if grid:
        points = np.linspace(low, high, int(spec["count"]))
        if kind == "int":  # Determined rounds the evenly spaced points and drops repeats
            values: list[Any] = sorted({round(float(p)) for p in points})
        elif kind == "log":
            values = [float(spec.get("base", 10) ** p) for p in points]
        else:
            values = [float(p) for p in points]
        return tune.grid_search(values)
    if kind == "int":
        return tune.randint(int(low), int(high) + 1)  # Determined's maxval is included
    if kind == "double":
        return tune.uniform(float(low), float(high))
    if kind == "log":
        base = spec.get("base", 10)
        return tune.loguniform(base**low, base**high, base=base)
    raise ExperimentError(f"{where}: type {kind!r} has no Ray Tune counterpart.")


@dataclass(frozen=True)
class Search:
    """What `Tuner` needs from the searcher section."""

    metric: str
    mode: str  # "min" | "max"
    num_samples: int
    max_concurrent: int
    scheduler: TrialScheduler
    grid: bool
    rungs: list[float]  # the ASHA rungs of the first bracket, in the time metric's unit


def plan_search(searcher: dict[str, Any], search_alg: str) -> Search:
    """The searcher section as Tune's; an error naming each key Tune cannot honour."""
    name = searcher.get("name")
    if name not in SEARCHERS:
        raise ExperimentError(
            f"searcher.name is {name!r}: Ray Tune runs {', '.join(SEARCHERS)} (Determined's "
            "meaning); use one of them, or Determined for the others."
        )
    if search_alg not in SEARCH_ALGS:
        raise ExperimentError(f"--search-alg {search_alg}: use one of {', '.join(SEARCH_ALGS)}.")
    if name in ("grid", "single") and search_alg != "random":
        raise ExperimentError(
            f"--search-alg {search_alg} with searcher.name {name}: the {name} searcher picks its "
            "points itself; leave --search-alg out, or use random or adaptive_asha."
        )
    metric = searcher.get("metric")
    if not metric:
        raise ExperimentError("searcher.metric is not set: name the validation metric to search.")
    mode = "min" if searcher.get("smaller_is_better", True) else "max"
    concurrent = int(searcher.get("max_concurrent_trials") or 0)
    samples = 1 if name in ("single", "grid") else int(searcher["max_trials"])
    if name != "adaptive_asha":
        return Search(metric, mode, samples, concurrent, FIFOScheduler(), name == "grid", [])
    settings = {**ASHA_DEFAULTS, **searcher}
    unit, max_time = searcher["time_metric"], int(searcher["max_time"])
    divisor = float(settings["divisor"])
    # As Determined: no more rungs than the length allows (the first at >= 1 unit).
    rungs = min(int(settings["max_rungs"]), int(math.log(max_time, divisor) + 1e-9) + 1)
    brackets = asha_brackets(settings, rungs)
    grace = max_time / divisor ** (rungs - 1)
    scheduler = ASHAScheduler(
        time_attr=unit,
        max_t=max_time,
        grace_period=grace,
        reduction_factor=divisor,
        brackets=brackets,
    )
    first = [grace * divisor**k for k in range(rungs)]
    return Search(metric, mode, samples, concurrent, scheduler, False, first)


def asha_brackets(settings: dict[str, Any], rungs: int) -> int:
    """Determined's brackets of `mode` (or `bracket_rungs`): Ray's brackets are the same when
    they have rungs, rungs-1, ... (Ray's bracket s starts s rungs later)."""
    explicit = settings.get("bracket_rungs")
    if explicit:
        expected = list(range(rungs, rungs - len(explicit), -1))
        if list(explicit) != expected:
            raise ExperimentError(
                f"searcher.bracket_rungs {list(explicit)}: Ray's ASHA brackets have "
                f"{rungs}, {rungs - 1}, ... rungs; use e.g. {expected}, or mode."
            )
        return len(explicit)
    mode = settings["mode"]
    count = {"aggressive": 1, "standard": (rungs - 1) // 2 + 1, "conservative": rungs}.get(mode)
    if count is None:
        raise ExperimentError(
            f"searcher.mode is {mode!r}: use aggressive, standard or conservative."
        )
    return count
