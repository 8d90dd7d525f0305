"""`python -m on_ray`'s checkpoint commands: they run where Determined is not installed, take
model_def.py's arguments and write what model_def.py writes; Ray's checkpoint folders are found.

"Not installed" is real in the subprocesses: a `sitecustomize` replaces Python's path finder by
one for which the package neither imports nor has metadata, and records every attempt."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from on_ray import checkpoints as ray_checkpoints
from on_ray import cli as ray_cli
from tests.conftest import REPO, TINY_SYNTHETIC, disk_data
from utils.inference.commands import COMMANDS, positive_int

HIDE = """
import atexit, importlib.machinery, json, os, sys

HIDDEN = os.environ["HIDE_PACKAGE"]
attempts = []


def hidden(name):
    return name.partition(".")[0] == HIDDEN


class Finder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if hidden(name):
            attempts.append(name)
            return None
        return super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        found = super().find_distributions(*args, **kwargs)
        return (d for d in found if (d.metadata["Name"] or "").lower() != HIDDEN)


sys.meta_path[:] = [Finder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


@atexit.register
def report():
    loaded = sorted(name for name in sys.modules if hidden(name))
    with open(os.environ["HIDE_REPORT"], "w") as out:
        json.dump({"attempts": attempts, "loaded": loaded}, out)
"""
NOTHING = {"attempts": [], "loaded": []}


def run_without(
    package: str | None, folder: Path, *argv: str
) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `python *argv` in the repository with `package` not installed (None: as it is);
    returns the result and what tried to import `package` or got it."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    report = folder / "report.json"
    if package:
        (folder / "sitecustomize.py").write_text(HIDE)
        path = [str(folder), *filter(None, [env.get("PYTHONPATH")])]
        env.update(PYTHONPATH=os.pathsep.join(path), HIDE_PACKAGE=package, HIDE_REPORT=str(report))
    result = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    return result, json.loads(report.read_text()) if package else {}


@pytest.fixture
def checkpoint(trained_maskrcnn: Path) -> Path:
    (folder,) = (trained_maskrcnn / "determined").iterdir()
    return folder


@pytest.fixture
def ray_run(checkpoint: Path, tmp_path: Path) -> Path:
    """A Ray run's folder as `python -m on_ray train` leaves it (`<storage>/<run>/`), as far as
    the commands read it: checkpoints holding the mmdet export and naming their MLflow run."""
    run = tmp_path / "storage" / "TorchTrainer_2025"
    for batches in (1, 2):
        folder = run / f"checkpoint_{batches:07d}"
        shutil.copytree(checkpoint / "mmdet", folder / "mmdet")
        (folder / "metadata.json").write_text(json.dumps({"batches_trained": batches}))
        (folder / "mlflow_run.json").write_text(json.dumps({"run_id": f"run-{batches}"}))
    return run


@pytest.fixture
def val_split(synthetic_cache: Path) -> tuple[Path, Path]:
    """The annotation file and images of the run's validation split."""
    from utils.data import synthetic

    root = synthetic.ensure_dataset(synthetic_cache, synthetic.SyntheticSpec(**TINY_SYNTHETIC))
    return root / "annotations" / "instances_val.json", root / "val"


def test_the_hiding_works_and_model_def_still_needs_determined(tmp_path: Path) -> None:
    """The check stays strict for what a command needs: model_def.py without Determined stops
    at start-up, naming it and what to run."""
    result, report = run_without("determined", tmp_path, "model_def.py", "predict", "--help")
    assert result.returncode != 0
    assert "determined: installed nothing, pinned 0.38.1" in result.stderr
    assert "make setup" in result.stderr
    assert report == NOTHING  # stopped before anything imported it


@pytest.mark.parametrize("command", [[], ["predict"], ["export"], ["evaluate"]])
def test_on_ray_help_without_determined(tmp_path: Path, command: list[str]) -> None:
    result, report = run_without("determined", tmp_path, "-m", "on_ray", *command, "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: {' '.join(['python -m on_ray', *command])}")
    assert report == NOTHING


def test_model_def_commands_without_ray(tmp_path: Path) -> None:
    result, report = run_without("ray", tmp_path, "model_def.py", "evaluate", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: model_def.py evaluate")
    assert report == NOTHING


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> list[tuple]:
    keys = ("option_strings", "dest", "nargs", "const", "default", "type", "choices", "required")
    return [tuple(getattr(a, key) for key in (*keys, "help", "metavar")) for a in parser._actions]


def test_both_command_lines_take_the_same_arguments() -> None:
    from on_determined import cli as determined_cli

    ours, theirs = subcommands(ray_cli.build_parser()), subcommands(determined_cli.command_parser())
    assert set(COMMANDS) <= set(ours) and set(COMMANDS) == set(theirs)
    for name in COMMANDS:
        assert options(ours[name]) == options(theirs[name]), name
    # One argparse type for both command lines' counts.
    assert determined_cli.positive_int is ray_cli.positive_int is positive_int
    train = {a.dest: a.type for a in subcommands(ray_cli.build_parser())["train"]._actions}
    assert train["max_batches"] is train["workers"] is positive_int


def test_predict_writes_the_same_from_both_command_lines(
    checkpoint: Path, val_split: tuple[Path, Path], tmp_path: Path
) -> None:
    """One checkpoint, the same arguments: model_def.py (with Determined) and `python -m on_ray`
    (without it) write the same files, byte for byte, and print the same lines."""
    ann_file, image_root = val_split
    args = [str(checkpoint), str(ann_file), "--image-root", str(image_root), "--device", "cpu"]
    args += ["--batch-size", "3", "--max-rendered", "2"]
    outs = {name: tmp_path / name / "out" for name in ("determined", "ray")}
    det, _ = run_without(None, tmp_path / "determined", "model_def.py", "predict", *args,
                         "--out", str(outs["determined"]))  # fmt: skip
    assert det.returncode == 0, det.stderr[-3000:]
    ray, report = run_without("determined", tmp_path / "ray", "-m", "on_ray", "predict", *args,
                              "--out", str(outs["ray"]))  # fmt: skip
    assert ray.returncode == 0, ray.stderr[-3000:]
    assert report == NOTHING
    written = {
        name: {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        for name, out in outs.items()
    }
    assert {"results.bbox.json", "results.segm.json", "images.json"} <= set(written["ray"])
    assert len([name for name in written["ray"] if name.startswith("images/")]) == 2
    assert written["ray"] == written["determined"]
    assert "COCO evaluation on" in ray.stdout
    assert ray.stdout.replace(str(outs["ray"]), "OUT") == det.stdout.replace(
        str(outs["determined"]), "OUT"
    )


def test_ray_checkpoints_are_found(ray_run: Path, tmp_path: Path) -> None:
    last = ray_run / "checkpoint_0000002"
    assert ray_checkpoints.ray_checkpoint(str(last)) == str(last)
    with pytest.raises(SystemExit) as exit_info:
        ray_cli.main(["predict", str(ray_run), "image.png", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == (
        f"predict: {ray_run} is a Ray run's folder: pass one of its checkpoints, e.g. its last, "
        f"{last}."
    )
    with pytest.raises(SystemExit, match=r"^export: Checkpoint s3://b/run is in cloud storage"):
        ray_cli.main(["export", "s3://b/run", "--out", str(tmp_path / "out")])
    uuid = "0f2b5a61-3c1d-4e7a-9b8c-2d4e6f8a0b1c"
    with pytest.raises(SystemExit, match=f"model_def.py export {uuid} --out DIR` once"):
        ray_cli.main(["evaluate", uuid, "ann.json"])


def test_a_fetched_determined_checkpoint_is_found_by_uuid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uuid = "0f2b5a61-3c1d-4e7a-9b8c-2d4e6f8a0b1c"
    (tmp_path / uuid).mkdir()
    monkeypatch.setattr(ray_checkpoints, "FETCHED", tmp_path)
    assert ray_checkpoints.ray_checkpoint(uuid) == str(tmp_path / uuid)


def test_evaluate_logs_into_the_ray_checkpoints_run(ray_run: Path) -> None:
    """A Ray checkpoint names its MLflow run; its export folder counts as the checkpoint."""
    last = ray_run / "checkpoint_0000002"
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_EXPERIMENT_NAME": "ray"}
    for folder in (last, last / "mmdet"):
        settings, run = ray_checkpoints.CHECKPOINTS.tracking(folder, environ)
        assert (settings.tracking_uri, settings.experiment_name, run) == (
            "http://mlflow:5000", "ray", "run-2",
        )  # fmt: skip
    assert ray_checkpoints.CHECKPOINTS.tracking(last, {}) == (None, None)  # MLflow not configured


def read_export(folder: Path) -> tuple[dict, str]:
    return torch.load(folder / "model.pth", weights_only=True), (folder / "config.py").read_text()


def test_export_of_a_ray_checkpoint(ray_run: Path, coco: Path, tmp_path: Path) -> None:
    last = ray_run / "checkpoint_0000002"
    saved, saved_config = read_export(last / "mmdet")
    out = ray_cli.main(["export", str(last), "--out", str(tmp_path / "as-is")])
    assert (out / "model.pth").read_bytes() == (last / "mmdet" / "model.pth").read_bytes()
    assert (out / "config.py").read_text() == saved_config

    # The data moved (`coco`, a copy of it elsewhere): the config points at it, same model.
    demo = str(REPO / "experiments" / "demo.yaml")
    moved = ["--set", f"data={json.dumps(disk_data(coco))}"]
    out = ray_cli.main(["export", str(last), "--out", str(tmp_path / "moved"), "--experiment",
                        demo, *moved])  # fmt: skip
    written, config = read_export(out)
    assert str(coco / "annotations" / "instances_val.json") in config
    assert str(coco) not in saved_config
    assert written["meta"]["dataset_meta"] == saved["meta"]["dataset_meta"]
    assert written["meta"]["iter"] == saved["meta"]["iter"]
    assert written["state_dict"].keys() == saved["state_dict"].keys()
    assert all(torch.equal(written["state_dict"][k], v) for k, v in saved["state_dict"].items())

    # Data of other classes: the model's weights would not fit them.
    other = ["--set", f"data={json.dumps(disk_data(coco, classes=['circle']))}"]
    with pytest.raises(SystemExit) as exit_info:
        ray_cli.main(["export", str(last), "--out", str(tmp_path / "other"), "--experiment",
                      demo, *other])  # fmt: skip
    assert exit_info.value.code == (
        "export: the experiment's data has the classes ['circle'], the model ['circle', "
        "'square', 'triangle']: point its data section at data with the model's classes."
    )
