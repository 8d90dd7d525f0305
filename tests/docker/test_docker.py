"""Static checks of the agent image (docker/): lint, pins and contents. No Docker engine needed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from utils.base import versions

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKER_README = ROOT / "docker" / "README.md"
DOCKERIGNORE = ROOT / ".dockerignore"
SETUP_SCRIPT = ROOT / "scripts" / "setup_env.sh"
# Determined uploads the training code with each experiment; the image must not carry a copy.
TRAINING_CODE = ("model_def.py", "configs", "experiments")
# The only part of utils/ the set-up needs (its final `python -m utils.base.versions`).
SETUP_UTILS = {"utils/__init__.py", "utils/base/__init__.py", "utils/base/versions.py"}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):  # comments may sit inside continuations too
            continue
        continued = text.endswith("\\")
        text = text.removesuffix("\\").strip()
        current = f"{current} {text}".strip()
        if not continued:
            keyword, _, args = current.partition(" ")
            result.append((keyword.upper(), args.strip()))
            current = ""
    assert not current, "the Dockerfile ends inside a continuation line"
    return result


def variables() -> dict[str, str]:
    """Every ARG default and ENV value of the Dockerfile."""
    values = {}
    for keyword, args in instructions():
        if keyword in ("ARG", "ENV"):
            for token in shlex.split(args):
                name, sep, value = token.partition("=")
                if sep:
                    values[name] = value
    return values


def copied_sources() -> list[str]:
    """The build-context paths that COPY/ADD put into the image (not copies from other stages)."""
    sources = []
    for keyword, args in instructions():
        if keyword in ("COPY", "ADD"):
            tokens = shlex.split(args)
            if any(t.startswith("--from") for t in tokens):
                continue
            sources += [t for t in tokens if not t.startswith("--")][:-1]  # the last is the target
    return sources


def run_commands() -> list[str]:
    return [args for keyword, args in instructions() if keyword == "RUN"]


def python_minor() -> str:
    """The Python minor the lock was resolved on, from ruff's target version (`py311`)."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    digits = target.removeprefix("py")
    return f"{digits[0]}.{digits[1:]}"


def cuda_version(pins: dict[str, str]) -> tuple[str, str]:
    """CUDA (major, minor) of torch's runtime wheel in the lock."""
    major, minor, *_ = pins["nvidia-cuda-runtime"].split(".")
    return major, minor


def agrees(named: str, pinned: str) -> bool:
    """`torch 2.14` agrees with the pin 2.14.1, `torch 2.14.1` too; `torch 2.13` does not."""
    return pinned == named or pinned.startswith(named + ".")


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), f"{hadolint} is missing: install the lock (`make setup`)"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_give_a_reason() -> None:
    """Each ignored rule is named, with its reason, in the comment block right above the pragma."""
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            block = []
            for above in reversed(lines[:number]):
                if not above.startswith("#"):
                    break
                block.append(above)
            for rule in line.removeprefix("# hadolint ignore=").split(","):
                assert any(rule.strip() in comment for comment in block), (
                    f"line {number + 1}: explain why {rule.strip()} is ignored right above it"
                )


def test_packages_come_from_the_lock_through_the_setup_script() -> None:
    assert "requirements.lock" in copied_sources()
    assert "scripts/setup_env.sh" in copied_sources()
    setup_runs = [run for run in run_commands() if "setup_env.sh" in run]
    assert len(setup_runs) == 1, "the set-up script should run exactly once"
    for setting in ("FORCE_CUDA=1", "MMCV_WITH_OPS=1", "TORCH_CUDA_ARCH_LIST=", "MAX_JOBS="):
        assert setting in setup_runs[0]
    assert re.search(r"\bVENV=\S*/opt/venv|VENV=\"?\$\{VIRTUAL_ENV\}", setup_runs[0])
    assert variables()["VIRTUAL_ENV"] == "/opt/venv"
    assert re.search(r"\binstall\b.*-r requirements\.lock", SETUP_SCRIPT.read_text())
    # No package is installed around the lock: any pip install in the Dockerfile reads the lock.
    for run in run_commands():
        for args in re.findall(r"\bpip3?\s+install\s+([^&;|]*)", run):
            named = [a for a in shlex.split(args) if not a.startswith("-")]
            assert named in ([], ["requirements.lock"]), f"pip installs {named} outside the lock"


def test_mmcv_version_is_the_same_everywhere() -> None:
    script = re.search(r"^MMCV_VERSION=(\S+)$", SETUP_SCRIPT.read_text(), re.MULTILINE)
    assert script and script.group(1) == versions.MMCV_VERSION


def test_python_version_matches_the_lock() -> None:
    minor = python_minor()
    assert variables()["PYTHON_VERSION"] == minor
    for path in (DOCKERFILE, DOCKER_README):
        for named in re.findall(r"(?i)\bc?python\s?(\d+\.\d+)", path.read_text()):
            assert named == minor, f"{path.name} names Python {named}, the lock is for {minor}"


def test_cuda_version_matches_torchs_wheels() -> None:
    major, minor = cuda_version(versions.pinned_versions())
    base = [args for keyword, args in instructions() if keyword == "FROM" and "nvidia/cuda" in args]
    assert len(base) == 1
    tag = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(\w+)-", base[0])
    assert tag and tag.groups() == (major, minor, "devel"), base[0]
    # The wheels' header folder in CPATH (nvidia/cu13/include for CUDA 13).
    assert set(re.findall(r"nvidia/cu(\d+)/include", DOCKERFILE.read_text())) == {major}
    for path in (DOCKERFILE, DOCKER_README):
        for named in re.findall(r"(?i)\bCUDA[ -](\d+(?:\.\d+)?)", path.read_text()):
            assert agrees(named, f"{major}.{minor}"), f"{path.name} names CUDA {named}"


def test_versions_named_agree_with_the_pins() -> None:
    pins = versions.pinned_versions()
    for path in (DOCKERFILE, DOCKER_README):
        text = path.read_text()
        for name, pinned in pins.items():
            spelled = "[-_.]".join(re.escape(part) for part in re.split(r"[-_.]", name))
            pattern = rf"(?i)(?<![\w.-]){spelled}(?:==|-|\s)v?(\d+(?:\.\d+)+)"
            for named in re.findall(pattern, text):
                assert agrees(named, pinned), f"{path.name} names {name} {named}, pinned {pinned}"
    # Version build arguments must name something with a source of truth.
    major, minor = cuda_version(pins)
    known = {"python": python_minor(), "cuda": f"{major}.{minor}"} | pins
    for variable, value in variables().items():
        if variable.endswith("_VERSION"):
            name = variable.removesuffix("_VERSION").lower().replace("_", "-")
            assert name in known, f"{variable}: no pin to check it against"
            assert agrees(value, known[name]), f"{variable}={value}, pinned {known[name]}"


def test_training_code_is_not_copied() -> None:
    for source in copied_sources():
        parts = Path(source).parts
        assert parts and source not in (".", "./") and "*" not in source, source
        assert parts[0] not in TRAINING_CODE, f"the image copies {source}: Determined uploads it"
        if parts[0] == "utils":
            assert source in SETUP_UTILS, f"the image copies {source}, training code"


def test_dockerignore_admits_exactly_what_is_copied() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "exclude everything, then re-include what the image needs"
    admitted = {p.removeprefix("!") for p in patterns[1:] if p.startswith("!")}
    assert admitted == set(copied_sources())
