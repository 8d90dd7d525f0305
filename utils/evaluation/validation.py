"""A validation pass over ranks that never leaves a rank waiting, for any training engine.

A rank that raised where a validation fails (an image that does not load, a prediction, the
evaluation) would leave the other ranks waiting in the engine's collectives. Each rank keeps
its failures instead (`RankValidation`); the engine gathers every rank's `share()` to the chief,
whose `combine` gives the metrics, or the one metric VALIDATION_FAILURE saying what failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from utils.base.errors import USER_ERRORS
from utils.evaluation.evaluator import CocoEvaluator

logger = logging.getLogger(__name__)
# A failed validation's only metric: what failed, in one line.
VALIDATION_FAILURE = "validation_failure"
# A validation batch's key for its samples that did not load (LoadFailure).
LOAD_FAILURES = "load_failures"


def describe(err: Exception) -> str:
    """A failure in one line: a user error's own message (it names the file and what to do),
    else its type and message; the traceback of an unexpected error goes to the log."""
    if isinstance(err, USER_ERRORS):
        return str(err)
    logger.error("Validation failed", exc_info=err)
    return f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class LoadFailure:
    """In place of a validation sample that did not load (picklable, for loader workers)."""

    message: str

    def to(self, device: Any) -> LoadFailure:
        return self  # what an engine calls to move a batch's items to the device


class KeepLoadFailures(torch.utils.data.Dataset):
    """The validation dataset, with a LoadFailure for each sample that fails to load."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as err:
            return LoadFailure(describe(err))


class CollateLoaded:
    """A validation batch of the samples that loaded, with the others under LOAD_FAILURES."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list[Any]) -> Any:
        loaded = [sample for sample in samples if not isinstance(sample, LoadFailure)]
        batch = self.collate(loaded) if loaded else {"inputs": [], "data_samples": []}
        failures = [sample for sample in samples if isinstance(sample, LoadFailure)]
        if failures:
            batch[LOAD_FAILURES] = failures
        return batch


def failure_keeping_loader(loader_class: Callable[..., Any]) -> Callable[..., Any]:
    """A `loader_class` for `TrainingSession.val_loader` whose batches keep load failures."""

    def loader(dataset: Any, collate_fn: Callable[[list[Any]], Any], **kwargs: Any) -> Any:
        return loader_class(
            KeepLoadFailures(dataset), collate_fn=CollateLoaded(collate_fn), **kwargs
        )

    return loader


class Share(NamedTuple):
    """What the chief gathers from a rank."""

    entries: list[Any]  # CocoEvaluator.entries (image ids alone for streamed metrics)
    failures: list[str]
    streams: dict[int, Any]  # CocoEvaluator.stream_states(): empty unless streamed


class RankValidation:
    """One rank's part of a validation: its COCO entries (and streams), or what failed."""

    def __init__(self, evaluator: CocoEvaluator) -> None:
        self.evaluator = evaluator
        self.failures: list[str] = []

    def reset(self) -> None:
        self.evaluator.reset()
        self.failures = []

    def update(self, batch: Any, predict: Callable[[Any], list[Any]]) -> None:
        """Predict a validation batch and add its entries; once this rank has a failure, the
        rest of its batches are not predicted."""
        self.failures += [failure.message for failure in batch.get(LOAD_FAILURES, [])]
        if self.failures:
            return
        try:
            self.evaluator.update(predict(batch))
        except Exception as err:
            self.failures.append(describe(err))

    def share(self) -> Share:
        """What the chief gathers from this rank."""
        return Share(self.evaluator.entries, self.failures, self.evaluator.stream_states())


def combine(evaluator: CocoEvaluator, shares: list[Share]) -> dict[str, Any]:
    """On the chief: the metrics of every rank's entries and streams, or VALIDATION_FAILURE if
    any failed."""
    failures = [failure for share in shares for failure in share.failures]
    if not failures:
        try:
            return evaluator.compute(
                [share.entries for share in shares], [share.streams for share in shares]
            )
        except Exception as err:
            failures = [describe(err)]
    first = f"{len(failures)} failures, the first: " if len(failures) > 1 else ""
    return {VALIDATION_FAILURE: first + failures[0]}
