"""What a Determined trial's container holds, for `--check`: the trial's context (the repository
folder that `det experiment create EXPERIMENT .` uploads, minus what `.detignore` leaves out) and
the data the experiment mounts (`bind_mounts`, a pod spec's `volumeMounts`)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path, PurePosixPath
from typing import Any

from utils.check.data import EngineRules
from utils.config.build import REPO_ROOT


def detignored(relative: Path, detignore: Path = REPO_ROOT / ".detignore") -> str | None:
    """The `.detignore` pattern that leaves `relative` (a path in the repository) out of the
    uploaded context, if any."""
    if not detignore.is_file():
        return None
    parts = PurePosixPath(relative.as_posix()).parts
    for line in detignore.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        folder = pattern.endswith("/")
        bare = pattern.strip("/")
        if "/" in bare:
            if fnmatch.fnmatch(relative.as_posix(), bare + ("/*" if folder else "")):
                return pattern
        elif any(fnmatch.fnmatch(part, bare) for part in (parts[:-1] if folder else parts)):
            return pattern
    return None


def context_problem(key: str, name: str, path: Path) -> str | None:
    """Why the config file `name` (found at `path`) would not be in the trial's context, the
    repository folder that `det experiment create EXPERIMENT .` uploads, if it would not."""
    where = f"hyperparameters.{key}: {name}"
    try:
        relative = path.resolve().relative_to(REPO_ROOT)
    except ValueError:
        return (
            f"{where} is outside the repository ({REPO_ROOT}), and Determined uploads only the "
            "repository folder: move it under configs/ and name it relative to the repository."
        )
    escapes = os.path.normpath(name).startswith("..")  # relative to the repository's own name
    if Path(name).is_absolute() or escapes:
        how = (
            "is an absolute path" if Path(name).is_absolute() else "leaves the folder through '..'"
        )
        return (
            f"{where} {how}, which the trial's container does not have (it holds the uploaded "
            f"repository folder only): name it relative to the repository, as {relative}."
        )
    pattern = detignored(relative)
    if pattern:
        return (
            f"{where} is left out of the uploaded context by .detignore ({pattern}): move it "
            "under configs/."
        )
    return None


def mount_of(exp: dict[str, Any], path: str) -> str | None:
    """The host path (or volume) that the experiment mounts at `path` or above it, if any."""
    target = PurePosixPath(path)
    mounts = [
        (m.get("container_path"), m.get("host_path"))
        for m in exp.get("bind_mounts") or []
        if isinstance(m, dict)
    ]
    pod_spec = (exp.get("environment") or {}).get("pod_spec") or {}
    for container in (pod_spec.get("spec") or {}).get("containers") or []:
        for volume in container.get("volumeMounts") or []:
            mounts.append((volume.get("mountPath"), f"volume {volume.get('name')}"))
    for container_path, source in mounts:
        if isinstance(container_path, str) and container_path.startswith("/"):
            mount = PurePosixPath(container_path)
            if target == mount or mount in target.parents:
                return str(source)
    return None


DETERMINED_RULES = EngineRules(file_problem=context_problem, mount_of=mount_of)
