"""The engine-free session driven by a plain PyTorch loop over the core's train step and
validation pass: the trial's losses and metrics, no engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from tests.conftest import REPO, SGD_SETS, train
from utils.evaluation.validation import failure_keeping_loader
from utils.experiment.load import load_experiment, local_hparams
from utils.training.loaders import train_loader, val_loader
from utils.training.loop import TorchCollectives, TorchSteps, ValidationPass, train_step, validate
from utils.training.plan import plan_run
from utils.training.session import TrainingSession

CONFIG = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
BATCHES = 3


def plain_loop(data: dict) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Train BATCHES batches with the core's step in plain PyTorch, then validate once; returns
    the batches' metrics and the validation's."""
    exp = load_experiment(
        REPO / "experiments" / "demo.yaml",
        [
            f"hyperparameters.config_file={CONFIG}",
            "hyperparameters.global_batch_size=4",
            f"data={json.dumps(data)}",
            *SGD_SETS,  # as tests.conftest.train sets them
        ],
    )
    plan = plan_run(local_hparams(exp["hyperparameters"]), exp["data"])
    session = TrainingSession(plan)
    assert session.schedule.epoch_length == 4  # 16 images, 4 a batch
    steps = TorchSteps(session)
    records = []
    for batch in train_loader(session, rank=0):
        records.append(train_step(session, batch, steps))
        if session.batches_trained == BATCHES:
            break
    assert session.batches_trained == BATCHES
    batches = val_loader(session, failure_keeping_loader(DataLoader), rank=0)
    metrics = validate(ValidationPass(session), batches, TorchCollectives(1))
    assert session.model.training  # the pass ends in training mode
    return records, metrics


def test_plain_loop_gets_the_trials_losses_and_metrics(
    tmp_path: Path, synthetic_data: dict
) -> None:
    by_trial = train(
        tmp_path, CONFIG, synthetic_data, "--max-batches", str(BATCHES), "--report-every", "1"
    )
    trial = [r["metrics"] for r in by_trial if r["kind"] == "training"]
    (trial_metrics,) = [r["metrics"] for r in by_trial if r["kind"] == "validation"]
    plain, metrics = plain_loop(synthetic_data)
    assert len(trial) == len(plain) == BATCHES
    assert len({m["loss"] for m in plain}) == BATCHES  # the model learns: losses move
    for ours, theirs in zip(plain, trial, strict=True):
        for name, value in ours.items():
            assert theirs[name] == pytest.approx(value, rel=1e-6, abs=0), name
    assert set(metrics) == set(trial_metrics)
    assert "bbox_mAP" in metrics
    for name, value in metrics.items():
        assert trial_metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name
