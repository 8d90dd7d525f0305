"""A run's schedule, worked out once: every part that needs a length or a period reads it here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from utils.base.errors import ConfigError

EPOCH_LOOP = "EpochBasedTrainLoop"


def by_epoch(cfg: Any) -> bool:
    """Whether the config's training loop counts epochs (mmengine's default loop does)."""
    return (cfg.get("train_cfg") or {}).get("type", EPOCH_LOOP) == EPOCH_LOOP


def config_length(cfg: Any) -> tuple[int, str]:
    """The config's `train_cfg` length: `(max_epochs, "epochs")` or `(max_iters, "batches")`."""
    train_cfg = cfg.get("train_cfg") or {}
    if "max_epochs" in train_cfg:
        return int(train_cfg["max_epochs"]), "epochs"
    if "max_iters" in train_cfg:
        return int(train_cfg["max_iters"]), "batches"
    raise ConfigError(
        "The config's train_cfg names no max_epochs or max_iters, and the experiment's searcher no "
        "max_time: set one of them."
    )


def accumulation(cfg: Any) -> int:
    """Batches per optimizer step (`optim_wrapper.accumulative_counts`)."""
    counts = cfg.optim_wrapper.get("accumulative_counts", 1)
    if not isinstance(counts, int) or isinstance(counts, bool) or counts < 1:
        raise ConfigError(f"optim_wrapper.accumulative_counts is {counts!r}: use an int >= 1.")
    return counts


@dataclass(frozen=True)
class Schedule:
    """How long a run trains and when it validates, in batches (global steps of the loader).

    Attributes:
        epoch_length: batches per epoch (`ceil(training images / global batch)`).
        max_batches: batches the run trains.
        max_epochs: epochs those batches start (the last one may be partial).
        validation_period: batches between validations (and checkpoints).
        by_epoch: the config's loop counts epochs (`val_interval` is in epochs).
        accumulation: batches per optimizer step.
    """

    epoch_length: int
    max_batches: int
    max_epochs: int
    validation_period: int
    by_epoch: bool
    accumulation: int

    @classmethod
    def build(
        cls,
        cfg: Any,
        train_images: int,
        global_batch: int,
        length: tuple[int, str] | None = None,
    ) -> Schedule:
        """From the config, the training set's size, the global batch and, if the engine names
        one (a searcher's `max_time`), the length `(value, "epochs" | "batches")`."""
        epoch_length = -(-train_images // global_batch)
        value, unit = length or config_length(cfg)
        max_batches = value * epoch_length if unit == "epochs" else value
        loop_by_epoch = by_epoch(cfg)
        interval = (cfg.get("train_cfg") or {}).get("val_interval", 1)
        return cls(
            epoch_length=epoch_length,
            max_batches=max_batches,
            max_epochs=-(-max_batches // epoch_length),
            validation_period=interval * epoch_length if loop_by_epoch else interval,
            by_epoch=loop_by_epoch,
            accumulation=accumulation(cfg),
        )

    def epoch_of(self, batch_index: int) -> int:
        """The epoch (from 0) of the batch `batch_index` (from 0)."""
        return batch_index // self.epoch_length


def unfollowed_intervals(cfg: Any) -> str | None:
    """What to tell a user whose `train_cfg.dynamic_intervals` the fixed validation period
    (Determined's `validation_period`, from `val_interval`) cannot follow; None if nothing."""
    train_cfg = cfg.get("train_cfg") or {}
    intervals = train_cfg.get("dynamic_intervals")
    if not intervals:
        return None
    unit = "epochs" if by_epoch(cfg) else "batches"
    return (
        f"train_cfg.dynamic_intervals {list(intervals)} is not followed: validation runs every "
        f"{train_cfg.get('val_interval', 1)} {unit} (train_cfg.val_interval) throughout; lower "
        "val_interval to validate more often."
    )
