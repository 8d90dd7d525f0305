"""What Determined supplies to the core's loop (`utils/training/loop.py`): the optimizer steps
of what its context wrapped, and the collective that gathers a validation's shares."""

from __future__ import annotations

from typing import Any

from determined import pytorch

from utils.training.loop import ValidationPass


class EvaluatorReducer(pytorch.MetricReducer):
    """Determined's collective for the core's validation pass: every rank's share gathered,
    evaluated once on the chief (`ValidationPass.result`)."""

    def __init__(self, validation: ValidationPass, chief: bool) -> None:
        self.validation = validation
        self.chief = chief

    def reset(self) -> None:
        pass  # the pass starts in ValidationStart (callbacks), before the first batch

    def per_slot_reduce(self) -> bytes:
        return self.validation.share()

    def cross_slot_reduce(self, per_slot_metrics: list[bytes]) -> dict[str, Any]:
        # The chief's metrics are broadcast to the others before the callbacks see them
        # (Determined does when a callback reads them: ours do).
        return self.validation.result(per_slot_metrics) if self.chief else {}


class DeterminedSteps:
    """The core's optimizer steps (`utils.training.loop.OptimizerSteps`) by Determined's context,
    which syncs, accumulates and averages the gradients of what it wrapped itself."""

    def __init__(self, context: pytorch.PyTorchTrialContext, optimizer: Any, scaler: Any) -> None:
        self.context = context
        self.optimizer = optimizer
        self.scaler = scaler

    def backward(self, loss: Any, steps: bool) -> None:
        self.context.backward(loss)

    def step(self, steps: bool, clip: Any) -> None:
        # Called every batch: Determined steps at its aggregation frequency (the plan's
        # accumulation, see on_determined/local.py), which is when `steps` is true.
        self.context.step_optimizer(self.optimizer, clip_grads=clip, scaler=self.scaler)
