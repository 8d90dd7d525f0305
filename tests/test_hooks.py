"""A config's custom hooks: the supported ones through a trial's resume and export, the others
refused by name. (Their equality with mmengine's Runner: tests/test_parity.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from tests.conftest import TINY_SYNTHETIC, train
from utils.check import check_experiment
from utils.config import ConfigError
from utils.experiment import load_experiment
from utils.export import load_determined_weights
from utils.hooks import PipelineSchedule, plan_hooks

REPO = Path(__file__).resolve().parent.parent
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
            [dict(type="YOLOXModeSwitchHook", num_last_epochs=15)],
            r"custom_hooks\[0\] is 'YOLOXModeSwitchHook', which this trial cannot run: it "
            r"supports EMAHook, PipelineSwitchHook, CheckInvalidLossHook. Remove the hook",
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
    summary, problems = check_experiment(exp)
    assert not problems
    assert "EMA weights (ExpMomentumEMA): validated and exported" in summary
    assert "training pipeline switch: from epoch 2 (switch_epoch 1)" in summary
    (tmp_path / "hooks.py").write_text("custom_hooks = [dict(type='MeanTeacherHook')]\n")
    exp["hyperparameters"]["merge_config"] = str(tmp_path / "hooks.py")
    _, problems = check_experiment(exp)
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
    summary, problems = check_experiment(load_experiment(REPO / "experiments" / "rtmdet.yaml", []))
    assert not problems
    assert "EMA weights (ExpMomentumEMA): validated and exported" in summary
    assert "training pipeline switch: from epoch 281 (switch_epoch 280)" in summary
    assert (
        "note: train_cfg.dynamic_intervals [(280, 1)] is not followed: validation runs every 10 "
        "epochs (train_cfg.val_interval) throughout; lower val_interval to validate more often."
    ) in summary
