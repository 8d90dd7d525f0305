"""What a run is before anything is built (`RunPlan`), and the one step that readies its data.

`plan_run` reads the experiment and the config files and nothing else: the plan is made once
(by the local run, the Ray driver, a Tune trial, `--check`) and handed to whatever builds the run,
in this process or another (it pickles). `prepare_data` then readies the plan's data on the host
that builds datasets from it (generation, downloads, annotation checks, the annotation file's
classes); the training session calls it itself, so no engine can build from unprepared data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmdet.utils import register_all_modules
from mmengine.config import Config

from utils.base.errors import ConfigError
from utils.config.build import apply_hparams, apply_overrides, load_config, scale_lr
from utils.config.schedule import Schedule, accumulation
from utils.data.prepare import prepared_config
from utils.data.source import DataPlan, plan_data
from utils.evaluation.metric_names import check_searcher
from utils.experiment.load import training_length
from utils.training.hooks import HookPlan, plan_hooks
from utils.training.keys import check_run_keys


@dataclass(frozen=True, eq=False)
class RunPlan:
    """What a run is, before anything is built: shared by the session and `--check`.

    Attributes:
        cfg: the resolved mmdet config (hyperparameters, data section and overrides applied;
            the annotation file's classes once prepared, when the data section names none).
        hparams: the trial's hyperparameters.
        hooks: what the config's `custom_hooks` ask of the loop.
        world_size: processes sharing each global batch.
        global_batch: images per step over all processes.
        length: the engine's training length `(value, "epochs" | "batches")` (a searcher's
            `max_time`), or None for the config's `train_cfg`.
        data: what the data needs on a host before datasets are built (`prepare_data`).
    """

    cfg: Config
    hparams: dict[str, Any]
    hooks: HookPlan
    world_size: int
    global_batch: int
    length: tuple[int, str] | None
    data: DataPlan

    def schedule(self, train_images: int) -> Schedule:
        return Schedule.build(self.cfg, train_images, self.global_batch, self.length)

    @property
    def accumulation(self) -> int:
        """Batches per optimizer step (the config's `optim_wrapper.accumulative_counts`)."""
        return accumulation(self.cfg)

    def __eq__(self, other: object) -> bool:
        # mmengine's Config compares by identity: a plan shipped to another process (pickled)
        # equals its original by what the config holds.
        if not isinstance(other, RunPlan):
            return NotImplemented
        fields = [field.name for field in dataclasses.fields(self) if field.name != "cfg"]
        return self.cfg.to_dict() == other.cfg.to_dict() and all(
            getattr(self, name) == getattr(other, name) for name in fields
        )

    __hash__ = None  # a plan holds a mutable config


def plan_run(
    hparams: dict[str, Any],
    data: dict[str, Any],
    *,
    world_size: int = 1,
    searcher: dict[str, Any] | None = None,
    refuse_searcher: bool = False,
) -> RunPlan:
    """The run's config, hook plan, batch split and length, from the experiment alone.

    Reads the config files and nothing else (no data is generated, fetched or checked: see
    `prepare_data`). An unsupported hook or setting, a hyperparameter or data key the run does
    not read, or a data section that cannot work fails here, before anything is built. A
    `searcher.metric` the run never reports fails too with `refuse_searcher` (a cluster's
    searcher reads it), else is logged (Determined's local mode reads none)."""
    cfg, data_plan = resolve_config(hparams, data, world_size)
    check_searcher(cfg, searcher or {}, refuse=refuse_searcher)
    hooks = plan_hooks(cfg)
    length = training_length(searcher or {})
    return RunPlan(cfg, hparams, hooks, world_size, hparams["global_batch_size"], length, data_plan)


def resolve_config(
    hparams: dict[str, Any], data: dict[str, Any], slots: int = 1
) -> tuple[Config, DataPlan]:
    """The trial's config (`config_file`, `merge_config` on top, hyperparameters, data,
    overrides) and what its data needs on a host; reads nothing but the config files. A
    hyperparameter or data key the run does not read fails first.

    Args:
        hparams: the trial's hyperparameters (`config_file`, `global_batch_size`, `lr`, ...).
        data: the experiment's `data` section (`backend`, paths).
        slots: processes sharing the global batch (`resources.slots_per_trial`).
    """
    check_run_keys(hparams, data)
    register_all_modules(init_default_scope=True)
    cfg = load_config(hparams)
    apply_hparams(cfg, hparams)
    data_plan = plan_data(cfg, data)
    global_batch = hparams.get("global_batch_size")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(
            f"hyperparameters.global_batch_size is {global_batch!r}: set a positive integer."
        )
    if global_batch % slots:
        raise ConfigError(
            f"hyperparameters.global_batch_size {global_batch} does not divide by "
            f"resources.slots_per_trial {slots}: make it a multiple."
        )
    cfg.train_dataloader.batch_size = global_batch // slots
    scale_lr(cfg, global_batch, hparams.get("auto_scale_lr"))
    overrides = hparams.get("override_mmdet_config") or {}
    if "train_dataloader.batch_size" in overrides:
        raise ConfigError(
            "override_mmdet_config: train_dataloader.batch_size follows "
            "hyperparameters.global_batch_size / resources.slots_per_trial; set those instead."
        )
    apply_overrides(cfg, overrides)
    return cfg, data_plan


def build_config(
    hparams: dict[str, Any], data: dict[str, Any], slots: int = 1, verify_paths: bool = True
) -> Config:
    """The run's config alone, for callers that need no plan (export, benchmarks, tests): as
    `plan_run` resolves it, then with its data ready here as `prepare_data` readies it, unless
    `verify_paths` is False (a machine without the data)."""
    cfg, data_plan = resolve_config(hparams, data, slots)
    return prepared_config(cfg, data_plan, hparams) if verify_paths else cfg
