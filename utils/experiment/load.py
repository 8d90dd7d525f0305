"""Experiment YAML handling for local runs: load, apply `--set` overrides, pick hyperparameters.

On a cluster Determined samples the hyperparameters; locally we take each one's constant value,
or a representative value of a searched range (and say which), so that the same YAML runs both ways.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml

from utils.base.errors import ExperimentError
from utils.experiment.rules import hyperparameters_problems

logger = logging.getLogger(__name__)


def load_experiment(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Load an experiment YAML and apply `KEY=VALUE` overrides given as dotted paths."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(
            f"Experiment file {path} does not exist: pass a YAML from experiments/."
        )
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ExperimentError(
            f"Experiment file {path} is not valid YAML{yaml_error_place(err)}: fix it there."
        ) from err
    if not isinstance(config, dict):
        raise ExperimentError(f"Experiment file {path} must hold a mapping at the top level.")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise ExperimentError(f"--set {item!r}: write it as dotted.key=value.")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ExperimentError(
                f"--set {item!r}: the value is not valid YAML{yaml_error_place(err)}; quote it or "
                "fix its syntax."
            ) from err
        set_dotted(config, key, parsed, source=f"--set {item!r}")
    return config


def yaml_error_place(err: yaml.YAMLError) -> str:
    """Where a YAML error is and what it is: ` (line 4, column 7: mapping values are not allowed
    here)`, lines and columns counted from 1."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return f" ({problem})"
    return f" (line {mark.line + 1}, column {mark.column + 1}: {problem})"


def set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set `a.b.c` in nested dicts, creating missing levels; refuse to descend into a non-dict."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ExperimentError(f"{source}: {where} is {child!r}, not a mapping.")
        node = child
    node[parts[-1]] = value


def local_hparams(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """Resolve Determined hyperparameter specs to the single values a local run uses.

    Specs that a Determined master would reject fail here too, each named.
    """
    problems = hyperparameters_problems(hyperparameters)
    if problems:
        raise ExperimentError(" ".join(problems))
    resolved = {}
    for name, spec in hyperparameters.items():
        resolved[name] = _resolve(name, spec)
    return resolved


def _resolve(name: str, spec: Any) -> Any:
    if not isinstance(spec, dict) or "type" not in spec:
        if isinstance(spec, dict):  # a nested group of hyperparameters, as Determined allows
            return {k: _resolve(f"{name}.{k}", v) for k, v in spec.items()}
        return copy.deepcopy(spec)
    kind = spec["type"]
    if kind == "const":
        return copy.deepcopy(spec["val"])
    if kind == "categorical":
        if not spec["vals"]:
            raise ExperimentError(f"hyperparameters.{name}: categorical vals is empty; list them.")
        value = spec["vals"][0]
    elif kind in ("int", "double"):
        value = (spec["minval"] + spec["maxval"]) / 2
        value = round(value) if kind == "int" else value
    elif kind == "log":
        value = spec.get("base", 10) ** ((spec["minval"] + spec["maxval"]) / 2)
        value = float(f"{value:.3g}")
    else:
        raise ExperimentError(
            f"hyperparameters.{name}: unknown type {kind!r}; use const, int, double, log or "
            "categorical. Determined reads any mapping with a 'type' key as a hyperparameter: "
            "wrap an mmdet config mapping as {type: const, val: {...}}."
        )
    logger.warning(
        "hyperparameters.%s is searched (%s); this local run uses %r.", name, kind, value
    )
    return value


def training_length(searcher: dict[str, Any]) -> tuple[int, str] | None:
    """Training length `(value, "batches" | "epochs")` named by the searcher, if any.

    Determined 0.38 names it with `max_time` + `time_metric`; the legacy `max_length` is read too.
    None means: take the length from the MMDetection config's `train_cfg`.
    """
    if searcher.get("max_time") is not None:
        unit = searcher.get("time_metric")
        if unit not in ("batches", "epochs"):
            raise ExperimentError(
                f"searcher.time_metric is {unit!r}: use 'batches' or 'epochs' with max_time."
            )
        return int(searcher["max_time"]), unit
    length = searcher.get("max_length")
    if isinstance(length, dict) and len(length) == 1:
        ((unit, value),) = length.items()
        if unit in ("batches", "epochs"):
            return int(value), unit
    if length is not None:
        raise ExperimentError(
            f"searcher.max_length {length!r}: use {{batches: N}} or {{epochs: N}}, or max_time."
        )
    return None


def environment_variables(exp_conf: dict[str, Any], cuda: bool) -> dict[str, str]:
    """`environment.environment_variables` as a cluster's container gets them: a list of
    `KEY=VALUE`, or lists per device type (`cpu`, `cuda`, its old name `gpu`, `rocm`)."""
    entries = (exp_conf.get("environment") or {}).get("environment_variables") or []
    if isinstance(entries, dict):
        device = ("cuda", "gpu") if cuda else ("cpu",)
        entries = next((entries[d] for d in device if entries.get(d)), [])
    variables = {}
    for entry in entries:
        key, sep, value = str(entry).partition("=")
        if not key:
            raise ExperimentError(f"environment.environment_variables: {entry!r} is not KEY=VALUE.")
        if sep:  # a bare KEY passes the host's value through, as with Docker
            variables[key] = value
    return variables
