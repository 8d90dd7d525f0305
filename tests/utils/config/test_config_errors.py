"""A config file that cannot be read names the file and line at fault (its own, or one it
inherits), in `load_config`, `--check` and a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import model_def
from tests.conftest import REPO, train
from utils.base.errors import ConfigError
from utils.config.build import load_config

RETINANET = REPO / "configs" / "synthetic" / "retinanet_r18_fpn_synthetic.py"
UNCLOSED = 'model = dict(\n    type="RetinaNet",\n\nx = 1\n'


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def failure(config: Path, merge: Path | None = None) -> str:
    hparams = {"config_file": str(config)}
    if merge is not None:
        hparams["merge_config"] = str(merge)
    with pytest.raises(ConfigError) as error:
        load_config(hparams)
    return str(error.value)


def test_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.py", UNCLOSED)
    assert failure(path) == (
        f"{path}, line 1: '(' was never closed (hyperparameters.config_file): fix the syntax."
    )


def test_syntax_error_in_an_inherited_file_names_that_file(tmp_path: Path) -> None:
    base = write(tmp_path, "base.py", "a = 1\nb = [1, 2\n")
    path = write(tmp_path, "child.py", f'_base_ = ["{RETINANET}", "./base.py"]\n')
    assert failure(path) == (
        f"{base}, line 2: '[' was never closed (hyperparameters.config_file {path} inherits "
        "it): fix the syntax."
    )


def test_syntax_error_in_merge_config_names_it(tmp_path: Path) -> None:
    path = write(tmp_path, "merge.py", "train_cfg = dict(max_epochs=)\n")
    message = failure(RETINANET, path)
    assert message.startswith(f"{path}, line 1: ") and "(hyperparameters.merge_config)" in message


def test_missing_base_names_the_file_line_and_entry(tmp_path: Path) -> None:
    path = write(tmp_path, "child.py", f'x = 1\n_base_ = ["{RETINANET}", "./nowhere.py"]\n')
    assert failure(path) == (
        f"{path}, line 2: _base_ './nowhere.py' does not exist ({tmp_path / 'nowhere.py'}): fix "
        f"the path (relative to {tmp_path}), or name an mmdet config as mmdet::group/file.py."
    )


def test_missing_mmdet_base_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "child.py", '_base_ = "mmdet::retinanet/retinanet_r50_fpn_9x_coco.py"\n')
    message = failure(path)
    assert message.startswith(
        f"{path}, line 1: _base_ 'mmdet::retinanet/retinanet_r50_fpn_9x_coco.py' cannot be found"
    )
    assert "retinanet_r50_fpn_9x_coco.py" in message and "fix the name" in message


def test_failed_custom_imports_name_the_file_that_sets_them(tmp_path: Path) -> None:
    base = write(
        tmp_path,
        "base.py",
        f'_base_ = "{RETINANET}"\n\ncustom_imports = dict(imports=["no_such_module_x1"])\n',
    )
    path = write(tmp_path, "child.py", '_base_ = "./base.py"\nlr = 0.1\n')
    assert failure(path) == (
        f"{base}, line 3: custom_imports ['no_such_module_x1'] failed: ImportError: Failed to "
        "import no_such_module_x1. Install the module or fix its name; modules of this "
        "repository import from the working directory."
    )


def test_error_while_a_config_runs_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "child.py", f'_base_ = "{RETINANET}"\nx = 1\ny = undefined + 1\n')
    assert failure(path) == (
        f"{path}, line 3: NameError: name 'undefined' is not defined "
        "(hyperparameters.config_file): fix the config."
    )


def test_check_and_a_run_name_the_file(
    tmp_path: Path, synthetic_data: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "broken.py", UNCLOSED)
    expected = (
        f"{path}, line 1: '(' was never closed (hyperparameters.config_file): fix the syntax."
    )
    experiment = {
        "name": "broken-config",
        "entrypoint": "python3 model_def.py",
        "hyperparameters": {"config_file": str(path), "global_batch_size": 4},
        "data": synthetic_data,
        "searcher": {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False},
        "resources": {"slots_per_trial": 1},
    }
    exp_path = write(tmp_path, "experiment.yaml", yaml.safe_dump(experiment))
    with pytest.raises(SystemExit) as exit_info:
        model_def.main([str(exp_path), "--check"])
    assert exit_info.value.code == 1
    assert f"  - {expected}" in capsys.readouterr().out
    with pytest.raises(ConfigError) as error:
        train(tmp_path / "run", str(path), synthetic_data, "--max-batches", "1")
    assert str(error.value) == expected
