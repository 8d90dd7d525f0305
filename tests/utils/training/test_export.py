"""Checkpoints carry an mmdet export that MMDetection's own API loads and predicts with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mmdet
import pytest
import torch
from mmdet.apis import inference_detector, init_detector
from mmdet.registry import DATASETS, MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.dataset import pseudo_collate

import model_def
from utils.training.plan import build_config

REPO = Path(__file__).resolve().parents[3]


def checkpoint_of(run: Path) -> Path:
    (checkpoint,) = (run / "determined").iterdir()
    return checkpoint


def trial_detector(checkpoint: Path) -> tuple[torch.nn.Module, Config]:
    """The detector as Determined restores a trial: built from the checkpoint's hyperparameters
    and data section, weights from `state_dict.pth`'s `models_state_dict`."""
    register_all_modules(init_default_scope=True)
    load_data = json.loads((checkpoint / "load_data.json").read_text())
    cfg = build_config(load_data["hparams"], load_data["experiment_config"]["data"])
    detector = MODELS.build(cfg.model)
    state = torch.load(checkpoint / "state_dict.pth", map_location="cpu", weights_only=True)
    detector.load_state_dict(state["models_state_dict"][0])
    return detector.eval(), cfg


def test_checkpoint_holds_mmdet_export(trained_maskrcnn: Path) -> None:
    export = checkpoint_of(trained_maskrcnn) / "mmdet"
    saved = torch.load(export / "model.pth", map_location="cpu", weights_only=True)
    assert set(saved) == {"state_dict", "meta"}
    meta = saved["meta"]
    assert meta["dataset_meta"]["classes"] == ("circle", "square", "triangle")
    assert len(meta["dataset_meta"]["palette"]) == 3
    assert meta["iter"] == 2
    assert meta["mmdet_version"] == mmdet.__version__
    assert meta["cfg"] == (export / "config.py").read_text()
    assert not any(key.startswith("module.") for key in saved["state_dict"])

    cfg = Config.fromfile(export / "config.py")
    # mmdet's tools test on the trial's validation split, at absolute paths.
    ann_file = Path(cfg.test_dataloader.dataset.ann_file)
    assert ann_file.is_absolute() and ann_file.is_file()
    assert ann_file == Path(cfg.val_dataloader.dataset.ann_file)
    assert cfg.test_evaluator.ann_file == str(ann_file)
    assert cfg.model.roi_head.bbox_head.num_classes == 3


def test_init_detector_predicts_as_the_trial(trained_maskrcnn: Path) -> None:
    checkpoint = checkpoint_of(trained_maskrcnn)
    detector, cfg = trial_detector(checkpoint)
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    model = init_detector(
        str(checkpoint / "mmdet" / "config.py"),
        str(checkpoint / "mmdet" / "model.pth"),
        device="cpu",
    )
    assert model.dataset_meta["classes"] == ("circle", "square", "triangle")
    for index in range(2):
        with torch.no_grad():  # as MMDetTrial.evaluate_batch
            data = detector.data_preprocessor(pseudo_collate([dataset[index]]), training=False)
            (ours,) = detector(**data, mode="predict")
        theirs = inference_detector(model, dataset.get_data_info(index)["img_path"])
        ours, theirs = ours.pred_instances, theirs.pred_instances
        assert len(ours) > 0
        torch.testing.assert_close(theirs.bboxes, ours.bboxes, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.scores, ours.scores, atol=1e-5, rtol=0)
        assert torch.equal(theirs.labels, ours.labels)
        assert theirs.masks.shape == ours.masks.shape == (len(ours), 128, 128)
        assert torch.equal(theirs.masks, ours.masks)


def test_export_command_writes_the_checkpoints_export(
    trained_maskrcnn: Path, tmp_path: Path
) -> None:
    checkpoint = checkpoint_of(trained_maskrcnn)
    out = tmp_path / "export"
    # A fresh process, as users run it: nothing set up by the training in this one.
    command = [sys.executable, "model_def.py", "export", str(checkpoint), "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {out / 'model.pth'}" in result.stdout
    written = torch.load(out / "model.pth", map_location="cpu", weights_only=True)
    saved = torch.load(checkpoint / "mmdet" / "model.pth", map_location="cpu", weights_only=True)
    assert written["meta"] == saved["meta"]
    assert (out / "config.py").read_text() == (checkpoint / "mmdet" / "config.py").read_text()
    assert written["state_dict"].keys() == saved["state_dict"].keys()
    for key, tensor in saved["state_dict"].items():
        assert torch.equal(written["state_dict"][key], tensor), key


def test_export_command_names_a_bad_checkpoint(trained_maskrcnn: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no such checkpoint folder"):
        model_def.main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty/load_data.json is missing"):
        model_def.main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    # A checkpoint whose weights file was cut short (e.g. an interrupted copy).
    truncated = tmp_path / "truncated"
    checkpoint = checkpoint_of(trained_maskrcnn)
    shutil.copytree(checkpoint, truncated, ignore=shutil.ignore_patterns("*.pth"))
    with (checkpoint / "state_dict.pth").open("rb") as stream:
        (truncated / "state_dict.pth").write_bytes(stream.read(1000))
    with pytest.raises(SystemExit, match=r"truncated/state_dict.pth cannot be loaded"):
        model_def.main(["export", str(truncated), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "model.pth").exists()
