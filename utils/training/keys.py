"""The keys the trial reads in an experiment's `hyperparameters` and `data` sections: any other
key is a typo or unused, and an error in `--check` and in runs alike, with the close match.

`data` is free-form for Determined, so nothing else would notice `data.clases`: the run would
silently train every class of the annotation file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from utils.base.errors import ConfigError, DataError, ExperimentError
from utils.config.build import KNOWN_HPARAMS
from utils.data.source import DISK_DEFAULTS
from utils.data.synthetic import SyntheticSpec
from utils.data.voc import VOC_SPLIT_DEFAULTS
from utils.experiment.rules import section_problems
from utils.experiment.values import close_match

# Every key utils/data/source.py, utils/data/voc.py and utils/training/tracking.py read in `data`.
DATA_KEYS = (
    "backend",  # synthetic, disk or gcs
    "format",  # coco or voc
    "classes",
    "root",  # disk and VOC
    *DISK_DEFAULTS,  # the layout: train_ann, val_ann, train_img_prefix, val_img_prefix
    "synthetic",  # generated data: SyntheticSpec's fields
    "cache_dir",  # generated data and GCS annotation files
    "bucket",  # GCS
    "prefix",
    "image_cache_bytes",
    "years",  # VOC
    *VOC_SPLIT_DEFAULTS,  # train_split, val_split
    "mlflow",  # utils/training/tracking.py checks its own keys
)
SYNTHETIC_KEYS = tuple(field.name for field in dataclasses.fields(SyntheticSpec))


def unknown_key_problems(
    section: Any, known: tuple[str, ...], where: str, what: str, listing: bool = False
) -> list[str]:
    """One problem per key of `section` not in `known`, with the close match if there is one.

    Args:
        section: the mapping to check (anything else is left to the section's own checks).
        known: the keys read.
        where: the section's dotted name, e.g. `data`.
        what: how the problem says it, e.g. `a data key`.
        listing: also list the known keys.
    """
    if not isinstance(section, dict):
        return []
    problems = []
    for key in section:
        if key in known:
            continue
        close = close_match(key, known)  # "; did you mean X?", or ""
        problems.append(
            f"{where}.{key} is not {what}"
            + (close or ".")
            + (f" Known: {', '.join(known)}." if listing or not close else "")
        )
    return problems


def hyperparameter_key_problems(hparams: Any) -> list[str]:
    """Hyperparameters the trial does not read (`lrr`, `learning_rate`, ...)."""
    return unknown_key_problems(
        hparams, KNOWN_HPARAMS, "hyperparameters", "read by the trial", listing=True
    )


def data_key_problems(data: Any) -> list[str]:
    """`data` keys (and `data.synthetic` keys) that no part of the package reads."""
    problems = unknown_key_problems(data, DATA_KEYS, "data", "a data key")
    if isinstance(data, dict):
        problems += unknown_key_problems(
            data.get("synthetic"), SYNTHETIC_KEYS, "data.synthetic", "a data.synthetic key"
        )
    return problems


def check_run_keys(hparams: dict[str, Any], data: dict[str, Any]) -> None:
    """Fail on the first section with a key the run does not read, naming every such key."""
    if problems := hyperparameter_key_problems(hparams):
        raise ConfigError(" ".join(problems))
    if problems := data_key_problems(data):
        raise DataError(" ".join(problems))


def check_experiment_keys(exp: dict[str, Any]) -> None:
    """Before a local run builds anything: fail on what a Determined master would reject in
    `searcher`, `hyperparameters` and `resources`, and on hyperparameter and data keys the trial
    does not read (the rules of `--check`), every problem named in one message."""
    problems = section_problems(exp)
    problems += hyperparameter_key_problems(exp.get("hyperparameters") or {})
    problems += data_key_problems(exp.get("data") or {})
    if problems:
        raise ExperimentError(" ".join(problems))


def known_part(hparams: dict[str, Any], data: dict[str, Any]) -> tuple[dict, dict]:
    """The hyperparameters and data section without the keys the run does not read (`--check`
    reports those and plans the rest)."""
    hparams = {k: v for k, v in hparams.items() if k in KNOWN_HPARAMS}
    data = {k: v for k, v in data.items() if k in DATA_KEYS}
    if isinstance(data.get("synthetic"), dict):
        data["synthetic"] = {k: v for k, v in data["synthetic"].items() if k in SYNTHETIC_KEYS}
    return hparams, data
