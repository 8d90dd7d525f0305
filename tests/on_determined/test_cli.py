"""Command-line errors end in one line naming what to fix, not a traceback; typos stop local runs
as they stop `--check`. In-process through `model_def.main`, except the script entry's test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import model_def
from tests.conftest import TINY_SYNTHETIC
from utils.training.plan import build_config

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "experiments" / "demo.yaml")
DEMO_CONFIG = "configs/synthetic/maskrcnn_r18_fpn_synthetic.py"


def exit_message(*argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        model_def.main(list(argv))
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    message = exit_info.value.code
    assert "\n" not in message and "Traceback" not in message
    return message


def tiny(synthetic_cache: Path) -> list[str]:
    """The `--set` options of DEMO on the tiny generated data."""
    data = {"backend": "synthetic", "cache_dir": str(synthetic_cache), "synthetic": TINY_SYNTHETIC}
    return ["--set", "hyperparameters.global_batch_size=4", "--set", f"data={json.dumps(data)}"]


def local(output: Path, synthetic_cache: Path, *extra: str) -> list[str]:
    """`DEMO --local` on the tiny generated data, writing into `output`."""
    return [DEMO, "--local", "--output", str(output), *tiny(synthetic_cache), *extra]


@pytest.mark.parametrize("mode", ["--check", "--local"])
def test_missing_experiment_file(tmp_path: Path, mode: str) -> None:
    message = exit_message(str(tmp_path / "nothere.yaml"), mode)
    assert "nothere.yaml does not exist: pass a YAML from experiments/" in message


@pytest.mark.parametrize("mode", ["--check", "--local"])
def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nhyperparameters:\n  lr: 0.01\n    momentum: 0.9\n")
    message = exit_message(str(path), mode)
    assert f"Experiment file {path} is not valid YAML (line 4, column 13:" in message
    assert "mapping values are not allowed here" in message


def test_set_without_equals(tmp_path: Path) -> None:
    message = exit_message(DEMO, "--check", "--set", "hyperparameters.lr")
    assert message == "--set 'hyperparameters.lr': write it as dotted.key=value."


def test_set_with_a_value_that_is_not_yaml() -> None:
    message = exit_message(DEMO, "--check", "--set", "data.classes=[a, b")
    assert message.startswith("--set 'data.classes=[a, b': the value is not valid YAML (line 1")


@pytest.mark.parametrize("value", ["-3", "0", "ten"])
def test_max_batches_must_be_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        model_def.main([DEMO, "--local", "--max-batches", value])
    assert exit_info.value.code == 2
    assert "argument --max-batches:" in capsys.readouterr().err


def test_local_run_refuses_an_unknown_hyperparameter(tmp_path: Path, synthetic_cache: Path) -> None:
    argv = local(tmp_path, synthetic_cache, "--set", "hyperparameters.lrr=0.01")
    message = exit_message(*argv)
    assert message.startswith("hyperparameters.lrr is not read by the trial; did you mean lr?")
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.clases=[circle]", "data.clases is not a data key; did you mean classes?"),
        (
            "data.val_annotation=x.json",
            "data.val_annotation is not a data key; did you mean val_ann?",
        ),
        ("data.synthetic.num_trian=4", "data.synthetic.num_trian is not a data.synthetic key"),
        ("searcher.metrc=bbox_mAP", "searcher.metrc is not a searcher key; did you mean metric?"),
        ("searcher.name=bayes", "searcher.name 'bayes' is not a searcher of Determined 0.38.1"),
        ("resources.slots_per_trial=-1", "resources.slots_per_trial is -1: use an integer >= 0"),
        ("hyperparameters.lr={type: log, minval: -3, maxval: -2}", "needs base"),
    ],
)
def test_local_run_refuses_what_check_refuses(
    tmp_path: Path,
    synthetic_cache: Path,
    capsys: pytest.CaptureFixture[str],
    override: str,
    message: str,
) -> None:
    assert message in exit_message(*local(tmp_path, synthetic_cache, "--set", override))
    assert not (tmp_path / "metrics.jsonl").exists()
    # --check names the same problem.
    with pytest.raises(SystemExit) as exit_info:
        model_def.main([DEMO, "--check", *tiny(synthetic_cache), "--set", override])
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().out


def fake_checkpoint(folder: Path, synthetic_data: dict, num_classes: int) -> Path:
    """A checkpoint folder as far as the resume check reads it: `metadata.json` and the mmdet
    export's `config.py`, of the demo model with `num_classes` classes."""
    cfg = build_config({"config_file": DEMO_CONFIG, "global_batch_size": 4}, synthetic_data)
    cfg.model.roi_head.bbox_head.num_classes = num_classes
    (folder / "mmdet").mkdir(parents=True)
    cfg.dump(str(folder / "mmdet" / "config.py"))
    (folder / "metadata.json").write_text(json.dumps({"steps_completed": 2}))
    return folder


def test_resume_of_another_model_is_one_line(
    tmp_path: Path, synthetic_cache: Path, synthetic_data: dict
) -> None:
    checkpoint = fake_checkpoint(tmp_path / "ckpt", synthetic_data, num_classes=80)
    message = exit_message(*local(tmp_path / "run", synthetic_cache, "--resume", str(checkpoint)))
    assert message.startswith(f"--resume {checkpoint}: the checkpoint is of another model")
    assert "model.roi_head.bbox_head.num_classes is 80 there and 3 here" in message
    assert "hyperparameters.load_from=" in message


def test_script_prints_run_errors_as_one_line(tmp_path: Path, synthetic_cache: Path) -> None:
    """`python model_def.py ...`: an error of the run (a config that does not exist, found
    when the trial plans its config) ends with its message, without a traceback."""
    argv = local(tmp_path, synthetic_cache, "--set", "hyperparameters.config_file=configs/nope.py")
    result = subprocess.run(
        [sys.executable, "model_def.py", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("model_def.py: hyperparameters.config_file: config 'configs/nope.py'")


def test_export_of_a_folder_without_training_state(trained_maskrcnn: Path, tmp_path: Path) -> None:
    """A Ray checkpoint or an export folder (an mmdet export, no Determined training state):
    `export` writes its export as it is, as `python -m on_ray export` does."""
    (checkpoint,) = (trained_maskrcnn / "determined").iterdir()
    ray = tmp_path / "checkpoint_0000002"
    shutil.copytree(checkpoint / "mmdet", ray / "mmdet")
    for source in (ray, ray / "mmdet"):
        out = model_def.main(["export", str(source), "--out", str(tmp_path / source.name)])
        for name in ("model.pth", "config.py"):
            assert (out / name).read_bytes() == (ray / "mmdet" / name).read_bytes(), name


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_zero_batch_size_is_one_line(tmp_path: Path, command: str) -> None:
    inputs = ["ann.json"] if command == "evaluate" else ["image.png", "--out", str(tmp_path)]
    message = exit_message(command, str(tmp_path), *inputs, "--batch-size", "0")
    assert message == f"{command}: --batch-size 0: use 1 or more."
