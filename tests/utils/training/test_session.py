"""The engine-free session driven by a plain PyTorch loop: the trial's losses, no engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, SGD_SETS, train
from utils.experiment.load import load_experiment, local_hparams
from utils.training.plan import config_seed, plan_run
from utils.training.session import TrainingSession

CONFIG = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
BATCHES = 3


def plain_loop(data: dict) -> list[dict[str, float]]:
    """Train BATCHES batches with the session's steps and torch's optimizer, nothing else."""
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
    session = TrainingSession(plan, seed=config_seed(plan.cfg) or 0)
    assert session.schedule.epoch_length == 4  # 16 images, 4 a batch
    records = []
    for index, batch in zip(range(BATCHES), session.train_loader(rank=0), strict=False):
        loss, metrics = session.training_loss(batch, index)
        loss.backward()
        norm = session.clip(session.detector.parameters())
        if norm is not None:
            metrics["grad_norm"] = norm
        session.optimizer.step()
        session.optimizer.zero_grad()
        session.after_step(index, metrics)
        records.append(metrics)
    assert session.batches_trained == BATCHES
    return records


def test_plain_loop_gets_the_trials_losses(tmp_path: Path, synthetic_data: dict) -> None:
    by_trial = train(
        tmp_path, CONFIG, synthetic_data, "--max-batches", str(BATCHES), "--report-every", "1"
    )
    trial = [r["metrics"] for r in by_trial if r["kind"] == "training"]
    plain = plain_loop(synthetic_data)
    assert len(trial) == len(plain) == BATCHES
    assert len({m["loss"] for m in plain}) == BATCHES  # the model learns: losses move
    for ours, theirs in zip(plain, trial, strict=True):
        for name, value in ours.items():
            assert theirs[name] == pytest.approx(value, rel=1e-6, abs=0), name
