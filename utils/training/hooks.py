"""A config's `custom_hooks`, reproduced outside mmengine's Runner.

mmengine's Runner calls hooks at points of its own loops; a training engine has other loops. The
hooks whose effect can be reproduced exactly are taken here, and any other is an error that names
it: a run that silently trains differently from `tools/train.py` is worse than one that refuses.

- EMAHook (mmengine): `EmaWeights` runs mmengine's own hook against a view of the loop: the
  averaged weights are updated after every iteration, swapped in for validation, kept in
  checkpoints, and are the weights an export ships, as mmengine saves them.
- PipelineSwitchHook (mmdet): `PipelineSchedule` gives the training pipeline of a sample's epoch,
  so the switch holds in persistent workers and on resumes.
- CheckInvalidLossHook (mmdet): nothing to add; the trial stops at the first non-finite loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from mmcv.transforms import Compose
from mmdet.engine.hooks import SyncNormHook
from mmdet.registry import TRANSFORMS
from mmengine.logging import MessageHub
from mmengine.registry import HOOKS
from mmengine.utils.dl_utils import set_multi_processing

from utils.base.errors import ConfigError
from utils.config.schedule import Schedule

SUPPORTED = (
    "EMAHook",
    "PipelineSwitchHook",
    "YOLOXModeSwitchHook",
    "SyncNormHook",
    "CheckInvalidLossHook",
)
YOLOX_SKIPPED = ("Mosaic", "RandomAffine", "MixUp")  # YOLOXModeSwitchHook's default


@dataclass
class HookPlan:
    """What a config's `custom_hooks` ask of a training loop."""

    ema: dict[str, Any] | None = None  # the EMAHook's config
    switches: list[tuple[int, list[dict]]] = field(default_factory=list)  # (epoch, pipeline)
    # YOLOXModeSwitchHook: (num_last_epochs, skip_type_keys)
    yolox: tuple[int, tuple[str, ...]] | None = None
    sync_norm: bool = False


def plan_hooks(cfg: Any) -> HookPlan:
    """Read `custom_hooks`; a hook this package cannot reproduce is a ConfigError naming it."""
    plan = HookPlan()
    for position, hook in enumerate(cfg.get("custom_hooks") or []):
        where = f"custom_hooks[{position}]"
        kind = str(hook.get("type", "")).split(".")[-1]  # `mmdet.EMAHook` names the same hook
        if kind not in SUPPORTED:
            raise ConfigError(
                f"{where} is {hook.get('type')!r}, which this trial cannot run: it supports "
                f"{', '.join(SUPPORTED)}. Remove the hook (e.g. set custom_hooks to the list "
                "without it through hyperparameters.merge_config) and check that training "
                "without it is what you want."
            )
        if kind == "EMAHook":
            if plan.ema is not None:
                raise ConfigError(f"{where}: a second EMAHook; keep one.")
            plan.ema = copy.deepcopy(dict(hook))
        elif kind == "PipelineSwitchHook":
            epoch, pipeline = hook.get("switch_epoch"), hook.get("switch_pipeline")
            if not isinstance(epoch, int) or epoch < 0 or not pipeline:
                raise ConfigError(
                    f"{where}: PipelineSwitchHook needs switch_epoch (an int >= 0) and "
                    f"switch_pipeline (a list of transforms); got {epoch!r} and {pipeline!r}."
                )
            plan.switches.append((epoch, copy.deepcopy(list(pipeline))))
        elif kind == "YOLOXModeSwitchHook":
            last = hook.get("num_last_epochs", 15)
            if not isinstance(last, int) or last < 0:
                raise ConfigError(f"{where}: num_last_epochs {last!r} is not an int >= 0.")
            plan.yolox = (last, tuple(hook.get("skip_type_keys", YOLOX_SKIPPED)))
        elif kind == "SyncNormHook":
            plan.sync_norm = True
    return plan


def runner_environment(cfg: Any, distributed: bool) -> None:
    """What mmengine's Runner sets from `env_cfg` before training, with mmengine's own function:
    cuDNN autotuning if asked, the loader workers' start method, OpenCV's threads (mmdet's 0: no
    thread pool in each loader worker) and, when distributed, one OpenMP and MKL thread per
    process unless the environment says otherwise."""
    env_cfg = cfg.get("env_cfg") or {}
    if env_cfg.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    set_multi_processing(**(env_cfg.get("mp_cfg") or {}), distributed=distributed)


def publish_runtime_info(iteration: int, epoch: int, max_iters: int, max_epochs: int) -> None:
    """The loop's position in mmengine's MessageHub, as RuntimeInfoHook sets it before an
    iteration (`iteration` and `epoch` count from 0)."""
    hub = MessageHub.get_current_instance()
    hub.update_info("iter", iteration)
    hub.update_info("epoch", epoch)
    hub.update_info("max_iters", max_iters)
    hub.update_info("max_epochs", max_epochs)


def yolox_switch_epoch(num_last_epochs: int, max_epochs: int) -> int:
    """The first epoch (from 0) of YOLOXModeSwitchHook's last stage, as the hook decides it."""
    return max(max_epochs - num_last_epochs - 1, 0)


def use_l1_loss(model: torch.nn.Module) -> None:
    """What YOLOXModeSwitchHook does to the model: the YOLOX head adds its L1 loss."""
    head = model.detector.bbox_head if hasattr(model, "detector") else model.bbox_head
    head.use_l1 = True


def sync_norms(model: torch.nn.Module) -> None:
    """mmdet's SyncNormHook before a validation: norm statistics averaged over the ranks."""
    SyncNormHook().before_val_epoch(SimpleNamespace(model=model))


class EmaWeights:
    """mmengine's EMAHook over `model`, driven by batch counts instead of a Runner.

    Args:
        hook_cfg: the EMAHook's config (`ema_type`, `momentum`, `begin_iter`, ...).
        model: the bare detector (not a DistributedDataParallel wrapper).
        schedule: the run's `utils.config.schedule.Schedule`.
    """

    def __init__(
        self, hook_cfg: dict[str, Any], model: torch.nn.Module, schedule: Schedule
    ) -> None:
        self.schedule = schedule
        # What the hook reads of a runner: the model, the loop's position and its length.
        self.view = SimpleNamespace(
            model=model,
            iter=0,
            epoch=0,
            max_iters=schedule.max_batches,
            max_epochs=schedule.max_epochs,
        )
        hook_cfg = {k: v for k, v in hook_cfg.items() if k != "priority"}  # the Runner's key
        try:
            self.hook = HOOKS.build(hook_cfg)
            self.hook.before_run(self.view)
            self.hook.before_train(self.view)
        except (AssertionError, KeyError, TypeError) as err:
            raise ConfigError(f"custom_hooks EMAHook {hook_cfg}: {err}") from err
        self.swapped = False

    def after_batch(self, batch_index: int) -> None:
        """After the optimizer (or accumulation) step of `batch_index`, counted from 0."""
        self.view.iter = batch_index
        self.view.epoch = self.schedule.epoch_of(batch_index)
        self.hook.after_train_iter(self.view, batch_index)

    def swap_in(self) -> None:
        """The averaged weights into the model, for validation."""
        if not self.swapped:
            self.hook.before_val_epoch(self.view)
            self.swapped = True

    def swap_out(self) -> None:
        """The trained weights back into the model."""
        if self.swapped:
            self.hook.after_val_epoch(self.view)
            self.swapped = False

    def averaged_weights(self) -> dict[str, torch.Tensor]:
        """The averaged detector's weights under the detector's own names."""
        return self.hook.ema_model.module.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.hook.ema_model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.hook.ema_model.load_state_dict(state, strict=True)


class PipelineSchedule:
    """A dataset's training pipeline by epoch: its own, then each switch's from its epoch on;
    and, with `skip` `(epoch, types)`, a dataset wrapper's skipped transforms from that epoch on.

    `select(epoch)` sets them for a sample's epoch before the sample is loaded (one sample at a
    time per process), as mmdet's PipelineSwitchHook and YOLOXModeSwitchHook set them on the
    dataset at the start of an epoch.
    """

    def __init__(
        self,
        dataset: Any,
        switches: list[tuple[int, list[dict]]],
        skip: tuple[int, tuple[str, ...]] | None = None,
    ) -> None:
        self.dataset = dataset
        self.skip = skip
        if skip is not None and not hasattr(dataset, "update_skip_type_keys"):
            raise ConfigError(
                f"custom_hooks YOLOXModeSwitchHook skips {list(skip[1])} from epoch {skip[0]}, "
                f"but the training dataset ({type(dataset).__name__}) cannot skip transforms: "
                "it needs a MultiImageMixDataset, as mmdet's YOLOX configs have."
            )
        self.unskipped = list(getattr(dataset, "_skip_type_keys", None) or [])
        ordered = sorted(switches, key=lambda switch: switch[0])  # stable: later hooks win ties
        self.stages = [(0, dataset.pipeline)]
        for epoch, transforms in ordered:  # built in mmdet's registry whatever the default scope
            self.stages.append((epoch, Compose([TRANSFORMS.build(t) for t in transforms])))

    def select(self, epoch: int) -> None:
        pipeline = self.stages[0][1]
        for start, stage in self.stages:
            if epoch >= start:
                pipeline = stage
        self.dataset.pipeline = pipeline
        if self.skip is not None:
            start, types = self.skip
            self.dataset.update_skip_type_keys(list(types) if epoch >= start else self.unskipped)
