"""The LR of every batch equals what mmengine's runner would set for the same config."""

from __future__ import annotations

import copy

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import PARAM_SCHEDULERS

from utils.training.optim import ParamSchedulers, amp_settings, build_optimizer, clip_gradients

EPOCH_LENGTH = 37
EPOCHS = 12


def optimizer_for(cfg: Config) -> torch.optim.Optimizer:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    return build_optimizer(model, cfg)[0]


def mmengine_lrs(cfg: Config, total: int) -> list[float]:
    """LR per iteration as mmengine's ParamSchedulerHook steps the schedulers."""
    optimizer = optimizer_for(cfg)
    schedulers = []
    for scheduler_cfg in copy.deepcopy(cfg.param_scheduler):
        by_epoch = scheduler_cfg.get("by_epoch", True)
        scheduler_cfg.setdefault("end", EPOCHS if by_epoch else total)
        schedulers.append(
            PARAM_SCHEDULERS.build(
                scheduler_cfg, default_args=dict(optimizer=optimizer, epoch_length=EPOCH_LENGTH)
            )
        )
    lrs = []
    for epoch in range(EPOCHS):
        for _ in range(EPOCH_LENGTH):
            lrs.append(optimizer.param_groups[0]["lr"])
            for scheduler in schedulers:  # after_train_iter
                if not scheduler.by_epoch:
                    scheduler.step()
        for scheduler in schedulers:  # after_train_epoch
            if scheduler.by_epoch:
                scheduler.step()
        assert epoch < EPOCHS
    return lrs


def our_lrs(cfg: Config, total: int) -> list[float]:
    optimizer = optimizer_for(cfg)
    schedulers = ParamSchedulers(optimizer, cfg, EPOCH_LENGTH, total)
    lrs = []
    for _ in range(total):
        lrs.append(schedulers.get_last_lr()[0])
        schedulers.step()
    return lrs


SCHEDULES = {
    "mmdet 1x (warm-up by iteration, steps by epoch)": [
        dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=100),
        dict(type="MultiStepLR", begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
    ],
    "cosine by epoch, open end": [
        dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=50),
        dict(type="CosineAnnealingLR", T_max=12, by_epoch=True, begin=0, eta_min=1e-4),
    ],
    "iteration-based steps": [
        dict(type="MultiStepLR", by_epoch=False, milestones=[150, 300], gamma=0.5),
    ],
    "epoch-based converted to iterations": [
        dict(type="CosineAnnealingLR", by_epoch=True, begin=0, end=12, convert_to_iter_based=True),
    ],
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lr_sequence_equals_mmengine(name: str) -> None:
    cfg = Config(
        dict(
            param_scheduler=SCHEDULES[name],
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.02, momentum=0.9)),
        )
    )
    total = EPOCHS * EPOCH_LENGTH
    expected, got = mmengine_lrs(cfg, total), our_lrs(cfg, total)
    assert len(got) == total == 444
    assert len(set(got)) >= 3  # the schedule really changes the LR
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_scheduler_state_resumes_mid_epoch() -> None:
    cfg = Config(
        dict(
            param_scheduler=SCHEDULES["mmdet 1x (warm-up by iteration, steps by epoch)"],
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.02)),
        )
    )
    total = EPOCHS * EPOCH_LENGTH
    reference = our_lrs(cfg, total)
    optimizer = optimizer_for(cfg)
    first = ParamSchedulers(optimizer, cfg, EPOCH_LENGTH, total)
    for _ in range(300):
        first.step()
    state, optimizer_state = first.state_dict(), optimizer.state_dict()
    # As Determined restores a checkpoint: fresh objects, then optimizer and scheduler state.
    optimizer = optimizer_for(cfg)
    second = ParamSchedulers(optimizer, cfg, EPOCH_LENGTH, total)
    optimizer.load_state_dict(optimizer_state)
    second.load_state_dict(state)
    resumed = []
    for _ in range(300, total):
        resumed.append(optimizer.param_groups[0]["lr"])
        second.step()
    assert resumed == pytest.approx(reference[300:], rel=1e-12)


def test_paramwise_settings_reach_the_optimizer() -> None:
    cfg = Config(
        dict(
            optim_wrapper=dict(
                optimizer=dict(type="SGD", lr=0.02, weight_decay=1e-4),
                paramwise_cfg=dict(norm_decay_mult=0.0),
                clip_grad=dict(max_norm=1.0),
            )
        )
    )
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer, clip_grad = build_optimizer(model, cfg)
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays[0] == 0.0 and decays[-1] == 1e-4
    assert clip_grad == {"max_norm": 1.0}


def test_clip_gradients_by_norm_like_mmengine() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([3.0, 4.0, 0.0])
    norm = clip_gradients([weight], {"max_norm": 1.0, "norm_type": 2})
    assert float(norm) == pytest.approx(5.0)
    assert float(weight.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="clip_grad.type 'median'"):
        clip_gradients([weight], {"type": "median"})


def amp_cfg(**wrapper: object) -> Config:
    return Config(
        dict(optim_wrapper=dict(type="AmpOptimWrapper", optimizer=dict(type="SGD"), **wrapper))
    )


def test_amp_settings_follow_mmengine() -> None:
    assert amp_settings(Config(dict(optim_wrapper=dict(type="OptimWrapper"))), cuda=True) is None
    cpu = amp_settings(amp_cfg(loss_scale=512.0), cuda=False)
    assert (cpu.device, cpu.dtype, cpu.loss_scale) == ("cpu", torch.bfloat16, None)
    dynamic = amp_settings(amp_cfg(), cuda=True)
    assert (dynamic.dtype, dynamic.loss_scale, dynamic.static_scale()) == (
        torch.float16,
        "dynamic",
        None,
    )
    static = amp_settings(amp_cfg(loss_scale=512.0), cuda=True)
    assert static.static_scale() == 512.0
    custom = amp_settings(amp_cfg(loss_scale=dict(init_scale=64.0, growth_interval=10)), cuda=True)
    assert custom.loss_scale == {"init_scale": 64.0, "growth_interval": 10}
    assert amp_settings(amp_cfg(dtype="bfloat16"), cuda=True).loss_scale is None


def test_cpu_autocast_runs_in_bfloat16() -> None:
    settings = amp_settings(amp_cfg(), cuda=False)
    layer = torch.nn.Linear(4, 4)
    with settings.autocast():
        out = layer(torch.ones(2, 4))
    assert out.dtype == torch.bfloat16
