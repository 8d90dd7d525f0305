"""Start-up check that the installed stack is the pinned one (torch/mmcv/mmdet break first)."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"
MMCV_VERSION = "2.1.0"
# The packages whose combination is fragile; the rest of the lock is checked by `pip check`.
CHECKED = ("torch", "torchvision", "mmengine", "mmdet", "numpy", "determined", "pycocotools")
# The Ray adapter's engine and search algorithms, checked when it starts.
RAY_CHECKED = ("ray", "hyperopt", "optuna")


def pinned_versions(lock_file: Path = LOCK_FILE) -> dict[str, str]:
    """Read the `name==version` pins of the lock file."""
    pins = {}
    for line in lock_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    pins["mmcv"] = MMCV_VERSION
    return pins


def version_problems(
    pins: dict[str, str], names: tuple[str, ...] = (*CHECKED, "mmcv")
) -> list[str]:
    """Describe every package of `names` whose installed version differs from its pin."""
    problems = []
    for name in names:
        try:
            installed = md.version(name).split("+")[0]
        except md.PackageNotFoundError:
            installed = None
        if installed != pins[name]:
            problems.append(f"{name}: installed {installed or 'nothing'}, pinned {pins[name]}")
    if "mmcv" in names and not problems:
        try:
            import mmcv.ops  # noqa: F401  (fails when mmcv was built without its compiled ops)
            from mmcv.ops import nms  # noqa: F401
        except (ImportError, OSError) as err:
            problems.append(
                f"mmcv {MMCV_VERSION} is installed without working compiled ops ({err})"
            )
    return problems


def check_versions(extra: tuple[str, ...] = ()) -> None:
    """Raise with an actionable message when the installed stack (and the `extra` packages)
    differs from requirements.lock."""
    problems = version_problems(pinned_versions(), (*CHECKED, *extra, "mmcv"))
    if problems:
        raise RuntimeError(
            "The installed packages differ from the pins in requirements.lock:\n  "
            + "\n  ".join(problems)
            + "\nRun `make setup` (or `bash scripts/setup_env.sh`) to install the pinned stack, "
            "or use the Docker image in docker/."
        )


if __name__ == "__main__":
    check_versions()
    print("Pinned stack OK: " + ", ".join(f"{n} {md.version(n)}" for n in (*CHECKED, "mmcv")))
