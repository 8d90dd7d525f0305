"""`--check`'s look at the hyperparameters' values: each value a hyperparameter can take
(`candidates`) checked as the trial would read it (`hparam_problems`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from utils.base.errors import ConfigError
from utils.config.build import KNOWN_HPARAMS, resolve_config_path
from utils.evaluation.drawings import visualization_settings
from utils.evaluation.evaluator import coco_backend, streamed_evaluation
from utils.evaluation.report import plot_settings

NUMERIC = ("lr", "weight_decay", "momentum")

# An engine's objection to a config file an experiment names: (key, name, path) -> problem.
FileRule = Callable[[str, str, Path], "str | None"]


def candidates(spec: Any) -> list[Any]:
    """The values a hyperparameter can take (a range gives its two ends)."""
    if not isinstance(spec, dict) or "type" not in spec:
        return [spec]
    kind = spec["type"]
    if kind == "const":
        return [spec.get("val")]
    if kind == "categorical":
        return list(spec.get("vals") or [])
    if kind == "log":
        base = spec.get("base", 10)
        return [base ** spec.get("minval", 0), base ** spec.get("maxval", 0)]
    return [spec.get("minval"), spec.get("maxval")]


def hparam_problems(
    specs: dict[str, Any], slots: int, file_rule: FileRule | None = None
) -> list[str]:
    """Wrong types, config files that do not resolve or that `file_rule` refuses (an engine's:
    e.g. not in what Determined uploads), batches that do not split (names the trial does not
    read are `utils.training.keys`' to report)."""
    problems = []
    for name, spec in specs.items():
        if name not in KNOWN_HPARAMS:
            continue
        for value in candidates(spec):
            if name in ("config_file", "merge_config"):
                if not isinstance(value, str):
                    problems.append(f"hyperparameters.{name} must be a config path, not {value!r}.")
                    continue
                try:
                    path = resolve_config_path(value, name)
                except ConfigError as err:
                    problems.append(str(err))
                    continue
                if (
                    file_rule is not None
                    and not value.startswith("mmdet::")
                    and (problem := file_rule(name, value, path))
                ):
                    problems.append(problem)
            elif name == "global_batch_size":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    problems.append(
                        f"hyperparameters.global_batch_size {value!r} is not a positive int."
                    )
                elif value % slots:
                    problems.append(
                        f"hyperparameters.global_batch_size {value} does not divide by "
                        f"resources.slots_per_trial {slots}: make it a multiple."
                    )
            elif name in NUMERIC and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                problems.append(f"hyperparameters.{name} must be a number, not {value!r}.")
            elif name == "load_from" and not (isinstance(value, str) and value):
                problems.append(
                    f"hyperparameters.load_from must be a path, URL or gs:// path, not {value!r}."
                )
            elif name == "override_mmdet_config" and not isinstance(value, dict):
                problems.append(
                    "hyperparameters.override_mmdet_config must map dotted keys to values."
                )
            elif name in ("coco_backend", "streamed_evaluation"):
                try:
                    (coco_backend if name == "coco_backend" else streamed_evaluation)(value)
                except ConfigError as err:
                    problems.append(str(err))
            elif name in ("visualization", "evaluation_plots"):
                settings = visualization_settings if name == "visualization" else plot_settings
                try:
                    settings({name: value})
                except ConfigError as err:
                    problems.append(str(err))
    return problems
