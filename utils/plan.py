"""What a run is before anything is built (`RunPlan`), and the datasets it trains on.

The training session builds from a plan; `--check` reads the same plan, so both see one config,
one hook plan and one schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmdet.registry import DATASETS
from mmdet.utils import register_all_modules
from mmengine.config import Config

from utils.config import build_config
from utils.config_tree import base_dataset
from utils.errors import DataError
from utils.experiment import training_length
from utils.hooks import HookPlan, plan_hooks
from utils.keys import check_run_keys
from utils.schedule import Schedule


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


def config_seed(cfg: Config) -> int | None:
    """The config's `randomness.seed`, which wins over any engine's seed."""
    seed = (cfg.get("randomness") or {}).get("seed")
    return None if seed is None else int(seed)


def build_dataset(cfg: Config, split: str) -> Any:
    """The split's mmdet dataset; an empty one is an error naming what to check."""
    empty = DataError(
        f"The {split} dataset is empty after mmdet's filtering ({split}_dataloader.dataset."
        f"filter_cfg drops images without objects and small images): check data.{split}_ann "
        "and the filter settings."
    )
    try:
        dataset = DATASETS.build(cfg[f"{split}_dataloader"].dataset)
    except ValueError as err:
        # mmengine fails to serialise an empty data list with numpy's bare message.
        if "need at least one array to concatenate" in str(err):
            raise empty from err
        raise
    if len(dataset) == 0:
        raise empty
    return dataset


def keeps_workers(loader_cfg: Any) -> bool:
    """Whether mmengine's runner keeps this loader's workers (and iterator) between passes."""
    return bool(loader_cfg.get("persistent_workers")) and loader_cfg.get("num_workers", 0) > 0


def loader_worker_init(cfg: Config) -> Callable[[int], None] | None:
    """What each data loader worker runs first: with data on GCS, registering the gs:// file
    backend (a forked worker inherits it, a spawned one starts without it)."""
    root = str(base_dataset(cfg.train_dataloader.dataset).get("data_root") or "")
    if not root.startswith("gs://"):
        return None
    from utils.gcs import register_gcs_backend

    return register_gcs_backend
