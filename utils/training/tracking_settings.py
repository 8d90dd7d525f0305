"""Whether and where a run is tracked in MLflow.

Enabled by a `data.mlflow` mapping in the experiment YAML or by `MLFLOW_TRACKING_URI` in the
environment (see utils/training/tracking.py for what a run logs). Credentials stay out of the
YAML and out of the run (`utils.training.tracking.redact`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from utils.base.errors import TrackingError

SECTION_KEYS = ("tracking_uri", "experiment_name", "tags")


@dataclass
class MlflowSettings:
    tracking_uri: str | None  # None: MLflow's default store (./mlruns or MLflow's own default)
    experiment_name: str
    tags: dict[str, str] = field(default_factory=dict)


def mlflow_settings(
    exp_conf: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> MlflowSettings | None:
    """What to track to, or None when MLflow tracking is not enabled (`data.mlflow: false` turns
    it off even with MLFLOW_TRACKING_URI set)."""
    section = (exp_conf.get("data") or {}).get("mlflow")
    if section is False or (section is None and not environ.get("MLFLOW_TRACKING_URI")):
        return None
    section = {} if section is None or section is True else section
    if not isinstance(section, Mapping):
        raise TrackingError(
            f"data.mlflow is {section!r}: write a mapping with any of {', '.join(SECTION_KEYS)}, "
            "or false to turn MLflow tracking off."
        )
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise TrackingError(
            f"data.mlflow: unknown key(s) {', '.join(unknown)}; use {', '.join(SECTION_KEYS)}."
        )
    tags = section.get("tags") or {}
    if not isinstance(tags, Mapping):
        raise TrackingError(f"data.mlflow.tags is {tags!r}: write a mapping of tag: value.")
    name = (
        section.get("experiment_name")
        or environ.get("MLFLOW_EXPERIMENT_NAME")
        or exp_conf.get("name")
        or "Default"
    )
    uri = section.get("tracking_uri") or environ.get("MLFLOW_TRACKING_URI") or None
    return MlflowSettings(uri, str(name), {str(k): str(v) for k, v in tags.items()})
