"""A config's custom hooks: the supported ones through a trial's resume and export, the others
refused by name. (Their equality with mmengine's Runner: tests/utils/training/test_parity.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import torch
from mmcv.transforms import BaseTransform
from mmdet.registry import TRANSFORMS
from mmengine.config import Config

from on_determined.checkpoints import load_determined_weights
from on_determined.context import DETERMINED_RULES
from on_determined.local import free_ports
from tests.conftest import TINY_SYNTHETIC, train
from utils.base.errors import ConfigError
from utils.check.experiment import check_experiment
from utils.experiment.load import load_experiment
from utils.training.hooks import PipelineSchedule, plan_hooks, runner_environment, sync_norms

REPO = Path(__file__).resolve().parents[3]
HOOKS = """
custom_hooks = [
    dict(type="EMAHook", ema_type="ExpMomentumEMA", momentum=0.2, gamma=4, priority=49),
    dict(type="PipelineSwitchHook", switch_epoch=1, switch_pipeline=[
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=(96, 96), keep_ratio=True),
        dict(type="PackDetInputs"),
    ]),
]
"""


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        (
            [dict(type="MeanTeacherHook")],
            r"custom_hooks\[0\] is 'MeanTeacherHook', which this trial cannot run: it supports "
            r"EMAHook, PipelineSwitchHook, YOLOXModeSwitchHook, SyncNormHook, "
            r"CheckInvalidLossHook. Remove the hook",
        ),
        (
            [dict(type="EMAHook"), dict(type="mmdet.EMAHook")],
            r"custom_hooks\[1\]: a second EMAHook",
        ),
        (
            [dict(type="PipelineSwitchHook", switch_pipeline=[dict(type="PackDetInputs")])],
            r"custom_hooks\[0\]: PipelineSwitchHook needs switch_epoch .* got None",
        ),
    ],
)
def test_hooks_it_cannot_run_are_named(hooks: list[dict], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_hooks(Config({"custom_hooks": hooks}))


def test_pipelines_follow_the_epoch() -> None:
    class Dataset:
        pipeline = "original"

    dataset = Dataset()
    pack = [dict(type="PackDetInputs")]
    schedule = PipelineSchedule(dataset, [(3, pack), (1, pack)])
    chosen = []
    for epoch in (0, 1, 2, 3, 4, 0):  # a resumed run may load any epoch's sample next
        schedule.select(epoch)
        chosen.append(dataset.pipeline)
    assert chosen[0] == chosen[5] == "original"
    assert chosen[1] is chosen[2] is schedule.stages[1][1]
    assert chosen[3] is chosen[4] is schedule.stages[2][1]
    assert schedule.stages[1][1] is not schedule.stages[2][1]


def test_check_summarises_the_hooks(tmp_path: Path) -> None:
    (tmp_path / "hooks.py").write_text(HOOKS)
    exp = load_experiment(
        REPO / "experiments" / "demo.yaml",
        [f"hyperparameters.merge_config={tmp_path / 'hooks.py'}"],
    )
    summary, problems = check_experiment(exp, DETERMINED_RULES)
    # The only problem: a merge_config outside the repository would not be uploaded.
    assert len(problems) == 1 and "hooks.py is outside the repository" in problems[0]
    assert "EMA weights (ExpMomentumEMA): validated and exported" in summary
    assert "training pipeline switch: from epoch 2 (switch_epoch 1)" in summary
    (tmp_path / "hooks.py").write_text("custom_hooks = [dict(type='MeanTeacherHook')]\n")
    exp["hyperparameters"]["merge_config"] = str(tmp_path / "hooks.py")
    _, problems = check_experiment(exp, DETERMINED_RULES)
    assert any("custom_hooks[0] is 'MeanTeacherHook'" in problem for problem in problems)


def final_checkpoint(output: Path) -> Path:
    return max(
        (output / "determined").iterdir(),
        key=lambda path: json.loads((path / "metadata.json").read_text())["steps_completed"],
    )


def test_averaged_weights_resume_exactly_and_are_exported(
    tmp_path: Path, synthetic_cache: Path
) -> None:
    """4 batches an epoch: the resumed half crosses the pipeline switch, in loader workers."""
    (tmp_path / "hooks.py").write_text(HOOKS)
    data = {"backend": "synthetic", "cache_dir": str(synthetic_cache), "synthetic": TINY_SYNTHETIC}
    config = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
    common = ("--set", f"hyperparameters.merge_config={tmp_path / 'hooks.py'}")
    common += ("--report-every", "1")
    straight = train(tmp_path / "straight", config, data, *common, "--max-batches", "6")
    train(tmp_path / "first", config, data, *common, "--max-batches", "3")
    resumed = train(
        tmp_path / "second",
        config,
        data,
        *common,
        "--max-batches",
        "6",
        "--resume",
        str(final_checkpoint(tmp_path / "first")),
    )

    def losses(records: list[dict]) -> dict[int, float]:
        return {r["batches"]: r["metrics"]["loss"] for r in records if r["kind"] == "training"}

    expected = {b: loss for b, loss in losses(straight).items() if b > 3}
    assert losses(resumed) == pytest.approx(expected, rel=1e-5)

    def exported(output: Path) -> dict[str, torch.Tensor]:
        path = final_checkpoint(output) / "mmdet" / "model.pth"
        return torch.load(path, weights_only=False)["state_dict"]

    averaged, again = exported(tmp_path / "straight"), exported(tmp_path / "second")
    assert set(averaged) == set(again)
    for name, value in averaged.items():
        torch.testing.assert_close(again[name], value, rtol=1e-5, atol=1e-7)
    # `model_def.py export` of the checkpoint takes the averaged weights too; the trained ones
    # differ from them.
    checkpoint = final_checkpoint(tmp_path / "straight")
    from_checkpoint = load_determined_weights(checkpoint)
    trained = load_determined_weights(checkpoint, averaged=False)
    assert all(torch.equal(from_checkpoint[name], value) for name, value in averaged.items())
    assert any(not torch.equal(trained[name], value) for name, value in averaged.items())


def test_rtmdet_recipe_is_summarised_with_its_hooks_and_intervals() -> None:
    summary, problems = check_experiment(
        load_experiment(REPO / "experiments" / "rtmdet.yaml", []), DETERMINED_RULES
    )
    assert not problems
    assert "EMA weights (ExpMomentumEMA): validated and exported" in summary
    assert "training pipeline switch: from epoch 281 (switch_epoch 280)" in summary
    assert (
        "note: train_cfg.dynamic_intervals [(280, 1)] is not followed: validation runs every 10 "
        "epochs (train_cfg.val_interval) throughout; lower val_interval to validate more often."
    ) in summary


@TRANSFORMS.register_module(force=True)
class CountCalls(BaseTransform):
    """Test-only transform: appends a line to `path` each time it runs (in any process)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def transform(self, results: dict) -> dict:
        with open(self.path, "a") as out:
            out.write("called\n")
        return results


def yolox_merge(tmp_path: Path) -> Path:
    """The synthetic YOLOX with CountCalls among the transforms its mode switch skips."""
    calls = tmp_path / "calls.txt"
    merge = tmp_path / "yolox_merge.py"
    merge.write_text(f"""
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type="CountCalls", path="{calls}"),
    dict(type="Mosaic", img_scale=(128, 128), pad_val=114.0),
    dict(type="RandomAffine", scaling_ratio_range=(0.5, 1.5), border=(-64, -64)),
    dict(type="Resize", scale=(128, 128), keep_ratio=True),
    dict(type="Pad", pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0))),
    dict(type="FilterAnnotations", min_gt_bbox_wh=(1, 1), keep_empty=False),
    dict(type="PackDetInputs"),
]))
train_cfg = dict(max_epochs=3)
custom_hooks = [
    dict(type="YOLOXModeSwitchHook", num_last_epochs=1,
         skip_type_keys=("CountCalls", "Mosaic", "RandomAffine")),
    dict(type="SyncNormHook"),
]
""")
    return merge


def test_yolox_mode_switch_skips_transforms_in_workers_and_adds_the_l1_loss(
    tmp_path: Path, synthetic_cache: Path
) -> None:
    """3 epochs of 4 batches: mmdet's hook switches when `epoch + 1 >= 3 - 1`, i.e. from the
    second epoch; the loaders' 2 persistent workers load the samples."""
    data = {"backend": "synthetic", "cache_dir": str(synthetic_cache), "synthetic": TINY_SYNTHETIC}
    records = train(
        tmp_path / "run",
        "configs/synthetic/yolox_tiny_synthetic.py",
        data,
        "--set",
        f"hyperparameters.merge_config={yolox_merge(tmp_path)}",
        "--report-every",
        "1",
    )
    training = {r["batches"]: r["metrics"] for r in records if r["kind"] == "training"}
    assert sorted(training) == list(range(1, 13))
    assert [b for b, metrics in training.items() if "loss_l1" in metrics] == list(range(5, 13))
    # The first epoch's 16 samples ran the transform, the switched epochs' did not; so did the
    # start-up sanity pass's 2 training images (the first epoch's pipeline).
    calls = (tmp_path / "calls.txt").read_text().count("called")
    assert calls == TINY_SYNTHETIC["num_train"] + 2


def sync_norms_on_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks: norm statistics that differ by rank, synced through DDP."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        wrapped = torch.nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's state
        model[1].running_mean.fill_(float(rank + 1))  # 1 and 2: the mean is 1.5
        model[1].running_var.fill_(float(2 * rank + 1))  # 1 and 3: the mean is 2
        sync_norms(wrapped)
        torch.save(model[1].state_dict(), Path(out_dir) / f"{rank}.pth")
    finally:
        torch.distributed.destroy_process_group()


def test_norm_statistics_are_averaged_over_ranks(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    torch.multiprocessing.spawn(sync_norms_on_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        state = torch.load(tmp_path / f"{rank}.pth")
        assert torch.equal(state["running_mean"], torch.full((4,), 1.5))
        assert torch.equal(state["running_var"], torch.full((4,), 2.0))


def test_runner_environment_follows_env_cfg() -> None:
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(3)
        runner_environment(Config({"env_cfg": {"mp_cfg": {"opencv_num_threads": 0}}}), False)
        assert cv2.getNumThreads() == 1  # OpenCV's count with threading off
        runner_environment(Config({"env_cfg": {"mp_cfg": {"opencv_num_threads": 2}}}), False)
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
