"""The start-up sanity pass (utils/training/sanity.py): one training step and one validation on
real images that leave no trace, and a broken pipeline that stops the run before its first batch
in one line naming the stage, the config key or transform, and the image."""

from __future__ import annotations

import copy
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import REPO, SGD_SETS
from utils.base.errors import ConfigError, StageError
from utils.check.experiment import check_experiment
from utils.evaluation.validation import VALIDATION_FAILURE, failure_keeping_loader
from utils.experiment.load import load_experiment, local_hparams
from utils.training.loaders import train_loader, val_loader
from utils.training.loop import TorchCollectives, TorchSteps, ValidationPass, train_step, validate
from utils.training.plan import plan_run
from utils.training.sanity import enabled, run_sanity_pass
from utils.training.session import TrainingSession

CONFIG = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
LOAD = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
NO_RESIZE = {"val_dataloader.dataset.pipeline": [*LOAD, dict(type="PackDetInputs")]}
# A Resize before the image is loaded: mmcv fails with a bare KeyError.
RESIZE = dict(type="Resize", scale=(64, 64), keep_ratio=True)
BROKEN_TRAIN = {"train_dataloader.dataset.pipeline": [RESIZE, *LOAD, dict(type="PackDetInputs")]}
NO_RESIZE_MESSAGE = "the test pipeline val_dataloader.dataset.pipeline has no Resize"


def sets(data: dict, overrides: dict, *extra: str) -> list[str]:
    return [
        f"hyperparameters.config_file={CONFIG}",
        "hyperparameters.global_batch_size=2",
        f"hyperparameters.override_mmdet_config={json.dumps(overrides)}",
        f"data={json.dumps(data)}",
        *SGD_SETS,
        *extra,
    ]


def experiment(data: dict, overrides: dict, *extra: str) -> dict:
    return load_experiment(REPO / "experiments" / "demo.yaml", sets(data, overrides, *extra))


def session_of(exp: dict) -> TrainingSession:
    plan = plan_run(local_hparams(exp["hyperparameters"]), exp["data"])
    return TrainingSession(plan)


def state(session: TrainingSession) -> dict[str, Any]:
    """Everything of a run the pass could touch, copied."""
    detector = session.detector
    return {
        "tensors": {k: v.clone() for k, v in detector.state_dict().items()},
        "grads": [p.grad for p in detector.parameters()],
        "modes": {name: m.training for name, m in detector.named_modules()},
        "optimizer": copy.deepcopy(session.optimizer.state_dict()),
        "schedulers": copy.deepcopy(session.lr_schedulers.state_dict()),
        "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state()),
        "position": session.batches_trained,
        "entries": list(session.evaluator.entries),
        # A metric's collected results and the ground truth the COCO engine evaluates against.
        "metrics": [
            (list(m.results), pickle.dumps(m._coco_api.dataset)) for m in session.evaluator.metrics
        ],
        "pipeline": session.train_dataset.pipeline,
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(tensor, after["tensors"][name]), name  # bit for bit
    assert all(grad is None for grad in before["grads"] + after["grads"])
    assert before["modes"] == after["modes"]
    assert repr(before["optimizer"]) == repr(after["optimizer"])
    assert before["schedulers"] == after["schedulers"]
    (py, np_state, torch_state), (py2, np_state2, torch_state2) = before["rng"], after["rng"]
    assert py == py2 and torch.equal(torch_state, torch_state2)
    assert all(np.array_equal(a, b) for a, b in zip(np_state, np_state2, strict=True))
    assert before["position"] == after["position"]
    assert before["entries"] == after["entries"]
    assert before["metrics"] == after["metrics"]
    assert before["pipeline"] is after["pipeline"]


def train_two(session: TrainingSession) -> tuple[list[dict], list[list[int]]]:
    """Two batches of the run's loop: their metrics and image ids."""
    steps, records, ids = TorchSteps(session), [], []
    for batch in train_loader(session, rank=0):
        ids.append([sample.img_id for sample in batch["data_samples"]])
        records.append(train_step(session, batch, steps))
        if session.batches_trained == 2:
            return records, ids
    raise AssertionError("the loader ended early")


def validation_of(session: TrainingSession) -> dict[str, float]:
    batches = val_loader(session, failure_keeping_loader(DataLoader), rank=0)
    return validate(ValidationPass(session), batches, TorchCollectives(1))


def test_the_pass_leaves_no_trace(synthetic_data: dict) -> None:
    # Norms in training mode, so that a training forward moves their statistics; every
    # detection kept, so that the validations measure something.
    overrides = {"model.backbone.norm_eval": False, "model.test_cfg.score_thr": 0.0}
    exp = experiment(synthetic_data, overrides)
    session = session_of(exp)
    norm = session.detector.backbone.bn1
    modes: list[bool] = []  # the stem's norm in each forward of the pass
    hook = norm.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    before = state(session)
    assert run_sanity_pass(session) > 0
    hook.remove()
    assert modes == [True, False]  # a training forward, then a prediction
    assert_same(before, state(session))

    # The run goes on exactly as one without the pass: same metrics, images, losses, weights.
    plain = session_of(exp)
    metrics = validation_of(session)
    assert metrics["bbox_AR_100"] > 0 and metrics == validation_of(plain)
    records, ids = train_two(session)
    plain_records, plain_ids = train_two(plain)
    assert ids == plain_ids
    assert records == plain_records
    trained, plain_trained = session.detector.state_dict(), plain.detector.state_dict()
    assert all(torch.equal(trained[name], plain_trained[name]) for name in trained)
    assert not torch.equal(norm.running_mean, before["tensors"]["backbone.bn1.running_mean"])


def test_a_val_pipeline_without_resize_stops_a_local_run_in_one_line(
    tmp_path: Path, synthetic_data: dict
) -> None:
    args = [sys.executable, str(REPO / "model_def.py"), str(REPO / "experiments" / "demo.yaml")]
    args += ["--local", "--output", str(tmp_path)]
    args += [part for value in sets(synthetic_data, NO_RESIZE) for part in ("--set", value)]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("model_def.py: Start-up sanity pass, validation: " + NO_RESIZE_MESSAGE)
    assert "add one" in last and "in model.bbox_head (RetinaHead)" in last
    assert "/val/000000.png" in last
    assert not (tmp_path / "metrics.jsonl").exists()  # stopped before the first batch
    assert not list((tmp_path / "determined").glob("*/metadata.json"))


def test_a_broken_training_transform_is_named_with_its_image_by_runs_and_check(
    synthetic_data: dict,
) -> None:
    exp = experiment(synthetic_data, BROKEN_TRAIN)
    session = session_of(exp)
    with pytest.raises(StageError) as raised:
        run_sanity_pass(session)
    message = str(raised.value)
    image = session.train_dataset.get_data_info(0)["img_path"]
    assert message == (
        "Start-up sanity pass, training step: train_dataloader.dataset.pipeline.0 (Resize) fails "
        f"on {image}: KeyError: 'scale_factor'. Check that transform's settings and its place "
        "in the pipeline."
    )
    # --check runs the same pass on this machine's data, and reports the same line.
    summary, problems = check_experiment(exp)
    assert summary and problems == [message]


def test_check_runs_the_pass_on_a_good_experiment(synthetic_data: dict) -> None:
    summary, problems = check_experiment(experiment(synthetic_data, {}))
    assert summary and problems == []
    _, problems = check_experiment(experiment(synthetic_data, NO_RESIZE))
    assert len(problems) == 1 and problems[0].startswith(
        "Start-up sanity pass, validation: " + NO_RESIZE_MESSAGE
    )


def test_the_switch_turns_the_pass_off_and_validation_still_explains(synthetic_data: dict) -> None:
    exp = experiment(synthetic_data, NO_RESIZE, "hyperparameters.sanity_pass=false")
    assert check_experiment(exp)[1] == []
    session = session_of(exp)
    assert run_sanity_pass(session) is None
    # Without the pass, the first validation fails, saying why in the same words.
    metrics = validation_of(session)
    assert metrics[VALIDATION_FAILURE].startswith(NO_RESIZE_MESSAGE)
    assert enabled({}) and not enabled({"sanity_pass": False})
    with pytest.raises(ConfigError, match="hyperparameters.sanity_pass is 'no'"):
        enabled({"sanity_pass": "no"})
