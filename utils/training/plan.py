"""What a run is before anything is built (`RunPlan`), and the datasets it trains on.

The training session builds from a plan; `--check` reads the same plan, so both see one config,
one hook plan and one schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmdet.utils import register_all_modules
from mmengine.config import Config

from utils.base.errors import ConfigError
from utils.config.build import apply_hparams, apply_overrides, load_config, scale_lr
from utils.config.schedule import Schedule
from utils.config.tree import base_dataset
from utils.data.source import apply_data_section
from utils.experiment.load import training_length
from utils.training.hooks import HookPlan, plan_hooks
from utils.training.keys import check_run_keys


@dataclass(frozen=True)
class RunPlan:
    """What a run is, before anything is built: shared by the session and `--check`.

    Attributes:
        cfg: the resolved mmdet config (hyperparameters, data section and overrides applied).
        hparams: the trial's hyperparameters.
        hooks: what the config's `custom_hooks` ask of the loop.
        world_size: processes sharing each global batch.
        global_batch: images per step over all processes.
        length: the engine's training length `(value, "epochs" | "batches")` (a searcher's
            `max_time`), or None for the config's `train_cfg`.
    """

    cfg: Config
    hparams: dict[str, Any]
    hooks: HookPlan
    world_size: int
    global_batch: int
    length: tuple[int, str] | None

    def schedule(self, train_images: int) -> Schedule:
        return Schedule.build(self.cfg, train_images, self.global_batch, self.length)


def plan_run(
    hparams: dict[str, Any],
    data: dict[str, Any],
    *,
    world_size: int = 1,
    searcher: dict[str, Any] | None = None,
    verify_paths: bool = True,
) -> RunPlan:
    """The run's config and hook plan; an unsupported hook or setting, or a hyperparameter or
    data key the run does not read, fails here, before any model or data is built."""
    check_run_keys(hparams, data)
    register_all_modules(init_default_scope=True)
    cfg = build_config(hparams, data, world_size, verify_paths)
    hooks = plan_hooks(cfg)
    length = training_length(searcher or {})
    return RunPlan(cfg, hparams, hooks, world_size, hparams["global_batch_size"], length)


def build_config(
    hparams: dict[str, Any], data: dict[str, Any], slots: int = 1, verify_paths: bool = True
) -> Config:
    """The trial's config: `config_file`, `merge_config` on top, hyperparameters, data, overrides.

    Args:
        hparams: the trial's hyperparameters (`config_file`, `global_batch_size`, `lr`, ...).
        data: the experiment's `data` section (`backend`, paths).
        slots: processes sharing the global batch (`resources.slots_per_trial`).
        verify_paths: check that the data's files exist (off for checks without the data).
    """
    cfg = load_config(hparams)
    apply_hparams(cfg, hparams)
    apply_data_section(cfg, data, verify_paths)
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
    return cfg


def config_seed(cfg: Config) -> int | None:
    """The config's `randomness.seed`, which wins over any engine's seed."""
    seed = (cfg.get("randomness") or {}).get("seed")
    return None if seed is None else int(seed)


def keeps_workers(loader_cfg: Any) -> bool:
    """Whether mmengine's runner keeps this loader's workers (and iterator) between passes."""
    return bool(loader_cfg.get("persistent_workers")) and loader_cfg.get("num_workers", 0) > 0


def loader_worker_init(cfg: Config) -> Callable[[int], None] | None:
    """What each data loader worker runs first: with data on GCS, registering the gs:// file
    backend (a forked worker inherits it, a spawned one starts without it)."""
    root = str(base_dataset(cfg.train_dataloader.dataset).get("data_root") or "")
    if not root.startswith("gs://"):
        return None
    from utils.data.gcs import register_gcs_backend

    return register_gcs_backend
