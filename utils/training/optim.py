"""Optimizer, gradient clipping and LR schedule from the config's optim_wrapper and param_scheduler.

The schedule uses mmengine's own schedulers, stepped at the batches where mmengine's runner steps
them, so the LR of every batch equals what mmengine would set for the same config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS


def build_optimizer(
    model: torch.nn.Module, cfg: Config
) -> tuple[torch.optim.Optimizer, dict | None]:
    """The optimizer with the config's parameter-wise settings, and its `clip_grad` settings.

    AMP and gradient accumulation belong to the training loop, so the wrapper is built as a plain
    OptimWrapper and only its optimizer is kept.
    """
    wrapper_cfg = copy.deepcopy(cfg.optim_wrapper)
    wrapper_cfg.type = "OptimWrapper"
    for key in ("loss_scale", "dtype", "use_fsdp", "accumulative_counts"):
        wrapper_cfg.pop(key, None)
    return build_optim_wrapper(model, wrapper_cfg).optimizer, cfg.optim_wrapper.get("clip_grad")


def clip_gradients(params: Any, clip_grad: dict) -> torch.Tensor:
    """Clip like mmengine's OptimWrapper: by norm (default) or by value; returns the grad norm."""
    clip_grad = dict(clip_grad)
    kind = clip_grad.pop("type", "norm")
    params = [p for p in params if p.requires_grad and p.grad is not None]
    if kind == "norm":
        return torch.nn.utils.clip_grad_norm_(params, **clip_grad)
    if kind == "value":
        torch.nn.utils.clip_grad_value_(params, **clip_grad)
        return torch.tensor(float("nan"))
    raise ValueError(f"optim_wrapper.clip_grad.type {kind!r} is unknown; use 'norm' or 'value'.")


class ParamSchedulers:
    """The config's parameter schedulers, stepped as mmengine's ParamSchedulerHook steps them.

    `step()` is called once per batch: iteration-based schedulers step every batch, epoch-based
    ones every `epoch_length` batches, so the LR of every batch equals mmengine's for the config.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        epoch_length: int,
        max_batches: int,
    ) -> None:
        self.optimizer = optimizer
        self.epoch_length = epoch_length
        self.batches = 0
        self.schedulers = []
        scheduler_cfgs = cfg.get("param_scheduler") or []
        if isinstance(scheduler_cfgs, dict):
            scheduler_cfgs = [scheduler_cfgs]
        for scheduler_cfg in scheduler_cfgs:
            scheduler_cfg = copy.deepcopy(scheduler_cfg)
            # mmengine's runner ends open schedules with the training length, in their own unit.
            by_epoch = scheduler_cfg.get("by_epoch", True)
            scheduler_cfg.setdefault(
                "end", -(-max_batches // epoch_length) if by_epoch else max_batches
            )
            self.schedulers.append(
                PARAM_SCHEDULERS.build(
                    scheduler_cfg, default_args=dict(optimizer=optimizer, epoch_length=epoch_length)
                )
            )

    def step(self) -> None:
        self.batches += 1
        epoch_end = self.batches % self.epoch_length == 0
        for scheduler in self.schedulers:
            if not scheduler.by_epoch or epoch_end:
                scheduler.step()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state["batches"]
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(scheduler_state)


@dataclass(frozen=True)
class AmpSettings:
    """Mixed precision as the config's AmpOptimWrapper asks for it, on the device at hand."""

    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    loss_scale: str | float | dict | None  # GradScaler settings; None: no scaler (bfloat16)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """mmengine's mapping: 'dynamic', an initial static scale, or GradScaler's own keys."""
        if self.loss_scale == "dynamic":
            return torch.amp.GradScaler(self.device)
        if isinstance(self.loss_scale, int | float):
            return torch.amp.GradScaler(self.device, init_scale=float(self.loss_scale))
        return torch.amp.GradScaler(self.device, **dict(self.loss_scale))

    def static_scale(self) -> float | None:
        """The value to keep the scale at after each step (a number as loss_scale), else None."""
        return float(self.loss_scale) if isinstance(self.loss_scale, int | float) else None


def amp_settings(cfg: Config, cuda: bool) -> AmpSettings | None:
    """None unless `optim_wrapper.type` is AmpOptimWrapper.

    On CUDA: float16 (or the config's `dtype`) with a GradScaler from `loss_scale`. Without CUDA:
    bfloat16 autocast on the CPU, which needs no loss scaling.
    """
    wrapper = cfg.optim_wrapper
    if wrapper.get("type") != "AmpOptimWrapper":
        return None
    if not cuda:
        return AmpSettings("cpu", torch.bfloat16, None)
    dtype = getattr(torch, str(wrapper.get("dtype") or "float16").removeprefix("torch."))
    loss_scale = None if dtype == torch.bfloat16 else wrapper.get("loss_scale", "dynamic")
    return AmpSettings("cuda", dtype, loss_scale)
