"""`--check`'s view of the data: read it as the trial would when it is on this machine, else say
which checks could not be made.

Data on this machine (generated, or a disk root that exists) is prepared as the session
prepares it (`utils.training.session.prepare_data`: generated, annotation files and `data.classes`
checked), its datasets built as the session builds them, and every image file looked for. A disk
root that is missing here is a problem, unless the experiment mounts it into the containers
(`bind_mounts`, or a pod spec's `volumeMounts`): the data then lives on the cluster's agents.
Data on GCS is not read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.config.schedule import Schedule
from utils.data.datasets import build_dataset, image_problems, leaf_datasets
from utils.training.plan import RunPlan

# What reading the data would have checked.
UNCHECKED = "annotation files, image files, classes, image counts, batches per epoch"


@dataclass(frozen=True)
class DataPlace:
    """Where the data section points, seen from this machine.

    Attributes:
        here: the data can be read here, as the trial would.
        elsewhere: why it is not read (on the agents, on GCS), or None.
        problem: what to fix when it is neither here nor mounted on the agents, or None.
    """

    here: bool
    elsewhere: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class EngineRules:
    """What an engine adds to the check (`on_determined.context.DETERMINED_RULES`).

    Attributes:
        file_problem: `(key, name, path)`: its objection to a config file an experiment names
            (e.g. not in what Determined uploads), or None.
        mount_of: `(exp, path)`: the host path or volume its containers mount at `path`, or
            None; data that is not on this machine but mounted lives on the cluster's agents.
    """

    file_problem: Callable[[str, str, Path], str | None] | None = None
    mount_of: Callable[[dict[str, Any], str], str | None] | None = None


def locate_data(exp: dict[str, Any], rules: EngineRules) -> DataPlace:
    """Whether `--check` can read the experiment's data here, and if not, why."""
    data = exp.get("data") or {}
    backend = data.get("backend", "disk")
    if backend in ("gcs", "gcp"):
        prefix = str(data.get("prefix") or "").strip("/")
        where = f"gs://{data.get('bucket')}/{prefix}".rstrip("/")
        return DataPlace(False, elsewhere=f"data on GCS ({where}) was not read")
    if backend != "disk" or not data.get("root"):
        return DataPlace(True)  # generated data, or a section that planning reports as wrong
    root = str(data["root"])
    if Path(root).expanduser().exists():
        return DataPlace(True)
    source = rules.mount_of(exp, root) if rules.mount_of is not None else None
    if source:
        return DataPlace(
            False,
            elsewhere=f"data.root {root} is not on this machine; the agents mount it from {source}",
        )
    return DataPlace(
        False,
        problem=(
            f"data.root {root} does not exist on this machine: fix the path. If the data exists "
            "only on the cluster's agents, mount it into the containers (bind_mounts: host_path "
            f"on the agents, container_path {root} or a folder above it); --check then skips "
            "reading it."
        ),
    )


@dataclass(frozen=True)
class DataReport:
    """What reading the data found."""

    classes: tuple[str, ...]
    train_images: int
    val_images: int
    schedule: Schedule
    problems: list[str]


def read_data(plan: RunPlan) -> DataReport:
    """Build both datasets of a prepared plan (`prepare_data`) as the session does, and look
    for every image file."""
    train = build_dataset(plan.cfg, "train")
    val = build_dataset(plan.cfg, "val")
    classes = tuple(leaf_datasets(val)[0].metainfo["classes"])
    problems = image_problems(train, "train") + image_problems(val, "val")
    return DataReport(classes, len(train), len(val), plan.schedule(len(train)), problems)
