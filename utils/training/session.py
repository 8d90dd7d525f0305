"""The training session: everything a run needs, assembled once, for any training engine.

An engine (Determined's trial, the Ray worker, the tests' plain loop) builds a `TrainingSession`
from a `RunPlan`, wraps `session.model` if it must (DDP), and runs the core's loop over it
(`utils/training/loop.py`); the engine owns nothing of the run itself. The session keeps the
one loop position, `batches_trained` (the batches trained so far): `loop.train_step` advances
it, the MessageHub, the EMA hook and the LR schedulers are told it, checkpoints carry it, and
everything else reads it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Any

import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.runner import set_random_seed
from mmengine.utils import import_modules_from_strings

from utils.base.errors import ConfigError, DataError, TrainingStopped, raise_problems
from utils.config.schedule import Schedule, unfollowed_intervals
from utils.data.datasets import build_dataset, image_problems
from utils.data.prepare import prepared_config
from utils.data.sampling import LoaderSeedDraws
from utils.evaluation.evaluator import CocoEvaluator
from utils.evaluation.preflight import evaluation_problems
from utils.training.hooks import (
    EmaWeights,
    PipelineSchedule,
    publish_runtime_info,
    runner_environment,
    sync_norms,
    use_l1_loss,
    yolox_switch_epoch,
)
from utils.training.loaders import keeps_workers
from utils.training.optim import ParamSchedulers, amp_settings, build_optimizer, clip_gradients
from utils.training.plan import RunPlan
from utils.training.weights import init_weights, load_weights

logger = logging.getLogger(__name__)


def prepare_data(plan: RunPlan) -> RunPlan:
    """The plan with its data ready on this host: generated, fetched, checked (bad data fails
    here, naming the file or key), and the annotation file's classes in its config when the data
    section names none. The plan passed in is left as it is.

    Call it once in each process that builds datasets, before building them: the training
    session does, for every engine; `--check` does where it reads the data. Idempotent, and
    cheap after the first call on a host (per-host caches and file locks), so the ranks of a host
    and a driver before them may all call it.
    """
    # A plan made in another process (Ray ships it) brings no registrations: this process
    # needs mmdet's modules and the config's `custom_imports` to build from it.
    register_all_modules(init_default_scope=True)
    imports = plan.cfg.get("custom_imports")
    if imports:
        import_modules_from_strings(**imports)
    return dataclasses.replace(plan, cfg=prepared_config(plan.cfg, plan.data, plan.hparams))


def config_seed(cfg: Config) -> int | None:
    """The config's `randomness.seed`, which wins over any engine's seed."""
    seed = (cfg.get("randomness") or {}).get("seed")
    return None if seed is None else int(seed)


class TrainingSession:
    """One run of an mmdet config: model, weights, optimizer, data, schedule, hooks, evaluator.

    Args:
        plan: from `plan_run`, in this process or another; its data is readied here first.
        seed: the engine's seed (Determined's trial seed), unless the config sets
            `randomness.seed` (`config_seed`), which wins.
        rank: this process's rank among `plan.world_size`.
        device: where the model trains (`cuda:N` on a GPU, else the CPU).
        resumed_batches: batches a resumed run already trained, when the engine does not skip
            them itself (the sampler skips them and the loop position starts there).
    """

    def __init__(
        self,
        plan: RunPlan,
        *,
        seed: int = 0,
        rank: int = 0,
        device: str | torch.device = "cpu",
        resumed_batches: int = 0,
    ) -> None:
        configured = config_seed(plan.cfg)
        # Once per process, for every engine: no dataset is built from unprepared data.
        plan = prepare_data(plan)
        cfg = self.cfg = plan.cfg
        self.plan = plan
        self.seed = seed = seed if configured is None else configured
        self.rank = rank
        self.world_size = plan.world_size
        self.resumed_batches = resumed_batches
        self.batches_trained = resumed_batches
        self.device = torch.device(device)
        # The model first: its initial weights are the first random draws after the seed.
        set_random_seed(seed)
        # A copy: mmdet's detectors write into the config they are built from (roi_head.train_cfg,
        # ...), and self.cfg stays the resolved config as the checkpoints export it.
        self.detector = MODELS.build(copy.deepcopy(cfg.model))
        # What the first validation would fail on, found before any weights or data are loaded.
        problems = evaluation_problems(cfg, self.detector)
        raise_problems(problems, ConfigError)
        init_weights(self.detector)
        load_from = plan.hparams.get("load_from") or cfg.get("load_from")
        if load_from:
            logger.info("Pretrained weights: %s", load_weights(self.detector, load_from))
        self.detector.to(self.device)
        # What runs the forward pass: the detector, or an engine's wrapper of it (DDP).
        self.model: torch.nn.Module = self.detector

        self.train_dataset = build_dataset(cfg, "train")
        self.val_dataset = build_dataset(cfg, "val")
        problems = image_problems(self.val_dataset, "val")  # a stat per image
        raise_problems(problems, DataError)
        self.schedule = Schedule.build(cfg, len(self.train_dataset), plan.global_batch, plan.length)
        note = unfollowed_intervals(cfg)
        if note:
            logger.warning(note)
        # The global torch generator advances where mmengine's would (see LoaderSeedDraws).
        self.seed_draws = LoaderSeedDraws(
            keeps_workers(cfg.train_dataloader),
            keeps_workers(cfg.val_dataloader),
            self.schedule.epoch_length,
        )

        # What mmengine's Runner and the config's custom hooks (utils/training/hooks.py) do to
        # the process and the loop, built once the model is on its device.
        runner_environment(cfg, distributed=plan.world_size > 1)
        hooks = plan.hooks
        self.ema = EmaWeights(hooks.ema, self.detector, self.schedule) if hooks.ema else None
        self.sync_norm = hooks.sync_norm
        self.l1_from_epoch = None
        skip = None
        if hooks.yolox is not None:
            last, skipped = hooks.yolox
            self.l1_from_epoch = yolox_switch_epoch(last, self.schedule.max_epochs)
            skip = (self.l1_from_epoch, skipped)
        self.pipelines = (
            PipelineSchedule(self.train_dataset, hooks.switches, skip)
            if hooks.switches or skip
            else None
        )

        # Mixed precision where the config asks for it (AmpOptimWrapper).
        self.amp = amp_settings(cfg, self.device.type == "cuda")
        self.scaler = None
        if self.amp:
            logger.info("Mixed precision: %s autocast on %s.", self.amp.dtype, self.amp.device)
            if self.amp.loss_scale is not None:
                self.scaler = self.amp.grad_scaler()
        self.optimizer, self.clip_grad = build_optimizer(self.detector, cfg)
        self.lr_schedulers = ParamSchedulers(
            self.optimizer, cfg, self.schedule.epoch_length, self.schedule.max_batches
        )
        self.evaluator = CocoEvaluator(
            cfg,
            plan.hparams.get("coco_backend"),
            plan.hparams.get("streamed_evaluation"),
            meta=self.val_dataset.metainfo,
        )

    # Training steps.

    def training_loss(self, batch: Any, batch_index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss to back-propagate for the run's batch `batch_index` (from 0), scaled when a
        loss scaler is on, and its terms as floats. Stops the run on a non-finite loss."""
        self.seed_draws.before_train_batch(batch_index)
        self.batches_trained = batch_index + 1
        epoch = self.schedule.epoch_of(batch_index)
        publish_runtime_info(
            batch_index, epoch, self.schedule.max_batches, self.schedule.max_epochs
        )
        if self.l1_from_epoch is not None and epoch >= self.l1_from_epoch:
            use_l1_loss(self.detector)
        data = self.detector.data_preprocessor(batch, training=True)
        with self.amp.autocast() if self.amp else contextlib.nullcontext():
            losses = self.model(**data, mode="loss")
        loss, log_vars = self.detector.parse_losses(losses)
        if not torch.isfinite(loss):
            # Stop before the step: the last checkpoint keeps the last good weights.
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in log_vars.items())
            raise TrainingStopped(
                f"The loss is not finite at batch {batch_index + 1} ({terms}): stopping. Lower "
                "the LR or enable optim_wrapper.clip_grad, and resume from the last checkpoint."
            )
        metrics = {name: value.item() for name, value in log_vars.items()}
        return (self.scaler.scale(loss) if self.scaler else loss), metrics

    def clip(self, params: Any) -> float | None:
        """Clip the gradients as the config's `clip_grad` says; returns the gradient norm (None
        without clipping). Call before the optimizer step."""
        if not self.clip_grad:
            return None
        if self.scaler:  # clip the true gradients, not the scaled ones
            self.scaler.unscale_(self.optimizer)
        return float(clip_gradients(params, self.clip_grad))

    def steps_optimizer(self, batch_index: int) -> bool:
        """Whether the optimizer steps after batch `batch_index` (gradient accumulation)."""
        return (batch_index + 1) % self.schedule.accumulation == 0

    def after_step(self, batch_index: int, metrics: dict[str, Any]) -> None:
        """After the optimizer (or accumulation) step of batch `batch_index`: the loss scale,
        the averaged weights, the LR into `metrics`, then the LR schedule's step."""
        if self.scaler and self.steps_optimizer(batch_index):  # after a real step only
            self.scaler.update(self.amp.static_scale())
        if self.ema is not None:  # every batch, as mmengine calls EMAHook after every iteration
            self.ema.after_batch(batch_index)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.lr_schedulers.step()

    # Validation.

    def before_validation(self) -> None:
        """As a validation starts: the loader seed mmengine draws, the norm statistics averaged
        over the ranks (SyncNormHook), then the averaged weights (EMAHook), in mmengine's order."""
        self.seed_draws.before_validation(
            first=self.batches_trained <= self.schedule.validation_period
        )
        if self.sync_norm:
            sync_norms(self.model)
        if self.ema is not None:
            self.ema.swap_in()

    def predict(self, batch: Any) -> list[Any]:
        """The detector's predictions (DetDataSample with `pred_instances`) for a batch."""
        data = self.detector.data_preprocessor(batch, training=False)
        with torch.no_grad():
            return self.detector(**data, mode="predict")

    def after_validation(self) -> None:
        """As a validation ends: the trained weights back into the model."""
        if self.ema is not None:
            self.ema.swap_out()

    # Checkpoints.

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The weights an export ships: the EMAHook's averaged ones if any (as mmengine saves
        them), else the trained ones, under the bare detector's names."""
        return self.ema.averaged_weights() if self.ema is not None else self.detector.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds besides the model, optimizer, LR schedule and RNG states: the
        loop position, the averaged weights."""
        state: dict[str, Any] = {"batches_trained": self.batches_trained}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "batches_trained" in state:  # absent from checkpoints of earlier versions
            self.continue_from(int(state["batches_trained"]))
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def continue_from(self, batches: int) -> None:
        """The loop position of a restored run: the batches its checkpoint had trained (the
        sampler of a locally resumed run skips them already, see `resumed_batches`)."""
        self.batches_trained = max(self.batches_trained, batches)
