"""Start-up check that the installed stack is the pinned one (torch/mmcv/mmdet break first).

Each command checks the shared stack and its own engine's packages, no others: `python -m on_ray`
runs where Determined is not installed, `model_def.py` where Ray is not. `python -m
utils.base.versions` (the set-up's last step) checks everything the lock installs.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"
MMCV_VERSION = "2.1.0"
# The packages whose combination is fragile, which every command needs (mmcv is checked last,
# once its version is known to be right); the rest of the lock is checked by `pip check`.
SHARED = ("torch", "torchvision", "mmengine", "mmdet", "numpy", "pycocotools", "hotcoco")
# Each engine's own packages: Determined for model_def.py; Ray and the search algorithms of
# `python -m on_ray tune` for on_ray.
ENGINES = {"determined": ("determined",), "ray": ("ray", "hyperopt", "optuna")}


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


def checked_packages(*engines: str) -> tuple[str, ...]:
    """The packages a command of `engines` checks: the shared stack, the engines' own, mmcv."""
    unknown = [engine for engine in engines if engine not in ENGINES]
    if unknown:  # a caller's typo must not silently check less
        raise ValueError(f"engine {unknown[0]!r} is unknown; use one of {', '.join(ENGINES)}.")
    return (*SHARED, *(name for engine in engines for name in ENGINES[engine]), "mmcv")


def version_problems(
    pins: dict[str, str], names: tuple[str, ...] = checked_packages()
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


def check_versions(engine: str = "determined") -> None:
    """Raise with an actionable message when the shared stack or `engine`'s packages differ from
    requirements.lock: "determined" for model_def.py (the default), "ray" for `python -m on_ray`."""
    raise_problems(version_problems(pinned_versions(), checked_packages(engine)))


def raise_problems(problems: list[str]) -> None:
    """Raise the message `check_versions` gives when there are problems."""
    if problems:
        raise RuntimeError(
            "The installed packages differ from the pins in requirements.lock:\n  "
            + "\n  ".join(problems)
            + "\nRun `make setup` (or `bash scripts/setup_env.sh`) to install the pinned stack, "
            "or use the Docker image in docker/."
        )


if __name__ == "__main__":
    names = checked_packages(*ENGINES)  # what the set-up installs: every engine's packages
    raise_problems(version_problems(pinned_versions(), names))
    print("Pinned stack OK: " + ", ".join(f"{n} {md.version(n)}" for n in names))
