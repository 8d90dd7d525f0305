"""The core's loop pieces on their own: `TorchSteps` takes Determined's optimizer steps
(accumulated gradients averaged, clipping, one step per accumulation), `train_step` reports
`grad_norm` only when every batch has one, and `validate` gives every rank the chief's result.
End to end (the trial's losses and metrics from a plain loop):
tests/utils/training/test_session.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from utils.training.loop import TorchCollectives, TorchSteps, train_step, validate


def linear_session(accumulation: int, clip: bool = False) -> Any:
    """The parts of a session that `TorchSteps` and `train_step` use, around a linear model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = SimpleNamespace(
        model=model,
        optimizer=optimizer,
        scaler=None,
        schedule=SimpleNamespace(accumulation=accumulation),
        clip_grad=clip,
        batches_trained=0,
    )

    def training_loss(batch: torch.Tensor, index: int) -> tuple[torch.Tensor, dict]:
        assert index == session.batches_trained
        session.batches_trained = index + 1
        loss = model(batch).pow(2).mean()
        return loss, {"loss": loss.item()}

    session.training_loss = training_loss
    session.steps_optimizer = lambda index: (index + 1) % accumulation == 0
    session.clip = lambda params: float(torch.nn.utils.clip_grad_norm_(params, 1e9))
    session.after_step = lambda index, metrics: metrics.update(lr=0.1)
    return session


def test_accumulated_steps_average_the_batches_gradients() -> None:
    batches = [torch.randn(4, 3), torch.randn(4, 3)]
    accumulated = linear_session(accumulation=2)
    whole = linear_session(accumulation=1)
    reference = copy.deepcopy(whole.model.state_dict())
    steps = TorchSteps(accumulated)
    first = train_step(accumulated, batches[0], steps)
    assert accumulated.model.state_dict()["weight"].equal(reference["weight"])  # no step yet
    train_step(accumulated, batches[1], steps)
    # One step on both batches at once: the mean of the two batches' mean losses.
    loss = whole.model(torch.cat(batches)).pow(2).mean()
    loss.backward()
    whole.optimizer.step()
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[name], value, msg=name)
    assert accumulated.batches_trained == 2 and first["lr"] == 0.1
    assert all(p.grad is None or not p.grad.any() for p in accumulated.model.parameters())


@pytest.mark.parametrize(("accumulation", "reported"), [(1, True), (2, False)])
def test_grad_norm_only_when_every_batch_has_one(accumulation: int, reported: bool) -> None:
    session = linear_session(accumulation, clip=True)
    steps = TorchSteps(session)
    metrics = [train_step(session, torch.randn(4, 3), steps) for _ in range(2)]
    assert all(("grad_norm" in m) == reported for m in metrics)


def test_validate_gives_the_chiefs_result_after_the_pass() -> None:
    events: list[Any] = []

    class Pass:
        def start(self) -> None:
            events.append("start")

        def add(self, batch: Any) -> None:
            events.append(batch)

        def share(self) -> bytes:
            return b"share"

        def result(self, shares: list[bytes]) -> dict[str, Any]:
            assert shares == [b"share"]
            return {"bbox_mAP": 0.5}

        def end(self) -> None:
            events.append("end")

    metrics = validate(Pass(), [1, 2], TorchCollectives(1), before_end=events.append)
    assert metrics == {"bbox_mAP": 0.5}
    assert events == ["start", 1, 2, {"bbox_mAP": 0.5}, "end"]
