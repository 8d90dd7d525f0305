"""Parity with MMDetection's own training: mmengine's Runner and our trial, iteration by iteration.

Both train from the config our trial builds (utils.config.build.build_config with the same
hyperparameters and data section), on the same generated data with the same seed: mmengine's
Runner as mmdet's tools/train.py runs it (`Runner.from_cfg(cfg).train()`), and our trial through
Determined's Trainer (`model_def.py --local`). Every loss term and the LR of the first 20
iterations must agree within 1e-5 relative; on the CPU they agree exactly.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from mmdet.datasets.samplers import AspectRatioBatchSampler
from mmdet.registry import METRICS
from mmengine.dataset import DefaultSampler
from mmengine.hooks import EMAHook, Hook
from mmengine.runner import Runner

import model_def
from on_determined.checkpoints import load_determined_weights
from tests.conftest import FEW_DRAWINGS
from utils.data.sampling import GroupedBatchSampler, LoaderSeedDraws
from utils.evaluation.coco_metric import BackendCocoMetric
from utils.experiment import load as experiment
from utils.training.plan import build_config

REPO = Path(__file__).resolve().parents[3]
# Our metric for the Runner too, so that both report the same unrounded statistics.
METRICS.register_module(name="ParityCocoMetric", module=BackendCocoMetric, force=True)
ITERATIONS = 20
TOLERANCE = 1e-5
# Settings both runs share for determinism, each in the config itself:
OVERRIDES = {
    # No random flips: our trial seeds each sample's augmentation from (seed, epoch, index), so
    # that resumes and any worker count repeat it, where mmengine draws from each worker's global
    # stream; the two can only agree on data without random augmentation.
    "train_dataloader.dataset.pipeline.3.prob": 0.0,
    # Loading in the main process: worker start-ups would only cost time in CI, as the data no
    # longer depend on workers. (Loaders with persistent workers: test_seed_draws_* below.)
    "train_dataloader.num_workers": 0,
    "train_dataloader.persistent_workers": False,
    "val_dataloader.num_workers": 0,
    "val_dataloader.persistent_workers": False,
    # 16 images in batches of 2: validations after iterations 8 and 16, so the comparison also
    # covers the epoch boundaries and what follows a validation.
    "train_cfg.val_interval": 1,
}


class RecordAndStop(Hook):
    """Records the loss terms and LR of each iteration, and the metrics of each validation."""

    priority = "HIGHEST"  # before ParamSchedulerHook moves the LR on to the next iteration

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        record = {name: float(value) for name, value in outputs.items()}
        record["lr"] = runner.optim_wrapper.get_lr()["lr"][0]
        self.records.append(record)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.validations.append(dict(metrics))


class StopAfter(Hook):
    """Stops the run after `iterations`, once every other hook has seen the last one (the
    EMAHook has averaged it in): `ema` is then the averaged weights, if there is an EMAHook."""

    priority = "LOWEST"

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations
        self.ema: dict[str, torch.Tensor] | None = None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 == self.iterations:
            for hook in runner.hooks:
                if isinstance(hook, EMAHook):
                    self.ema = copy.deepcopy(hook.ema_model.module.state_dict())
            raise EnoughIterations  # an epoch-based loop has no way to stop mid-epoch


class EnoughIterations(Exception):
    pass


def relative_difference(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else 0.0


def train_both(tmp_path: Path, synthetic_data: dict, model: str, merge: str = "") -> tuple:
    """Runner and trial on one config; returns (runner records, recorder, stopper, our records)."""
    # Every detection kept (no score threshold): the few iterations' validations then measure
    # something, where the default threshold leaves an untrained model without detections.
    test_cfg = "dict(rcnn=dict(score_thr=0.0))" if model == "maskrcnn" else "dict(score_thr=0.0)"
    settings = f"randomness = dict(seed=7)\nmodel = dict(test_cfg={test_cfg})\n"
    (tmp_path / "merge.py").write_text(settings + merge)
    sets = [
        f"hyperparameters.config_file=configs/synthetic/{model}_r18_fpn_synthetic.py",
        "hyperparameters.global_batch_size=2",
        f"hyperparameters.merge_config={tmp_path / 'merge.py'}",
        f"hyperparameters.override_mmdet_config={json.dumps(OVERRIDES)}",
        f"data={json.dumps(synthetic_data)}",
    ]
    if model == "maskrcnn":
        # A few drawings, as tests.conftest.train's: mmdet's drawing of masks draws colours from
        # numpy's global generator, and this parity shows training's random stream stays the
        # Runner's.
        sets.append(FEW_DRAWINGS)
    else:  # our validations' drawings and plots are compared with nothing here
        sets += [
            "hyperparameters.evaluation_plots=false",
            "hyperparameters.visualization={num_images: 0}",
        ]
    exp_conf = experiment.load_experiment(REPO / "experiments" / "demo.yaml", sets)
    cfg = build_config(experiment.local_hparams(exp_conf["hyperparameters"]), exp_conf["data"])
    assert cfg.randomness.seed == 7 and not (cfg.get("auto_scale_lr") or {}).get("enable")
    cfg.work_dir = str(tmp_path / "runner")
    cfg.launcher = "none"
    cfg.default_hooks.checkpoint = None  # checkpoints are not compared; they only cost time
    # mmdet's CocoMetric rounds to 3 decimals; ours does not: the same metric on both sides.
    cfg.val_evaluator.type = "ParityCocoMetric"
    runner = Runner.from_cfg(cfg)
    recorder, stopper = RecordAndStop(), StopAfter(ITERATIONS)
    runner.register_hook(recorder)
    runner.register_hook(stopper)
    with pytest.raises(EnoughIterations):
        runner.train()

    args = [str(REPO / "experiments" / "demo.yaml"), "--local", "--output", str(tmp_path / "ours")]
    args += ["--max-batches", str(ITERATIONS), "--report-every", "1"]
    model_def.main(args + [part for value in sets for part in ("--set", value)])
    records = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").open()]
    assert [r["batches"] for r in records if r["kind"] == "validation"] == [8, 16, 20]
    return recorder, stopper, records


def assert_same_losses(model: str, expected: list[dict], records: list[dict]) -> None:
    ours = [r["metrics"] for r in records if r["kind"] == "training"]
    assert len(ours) == len(expected) == ITERATIONS
    worst = (0.0, 0, "")
    for iteration, (theirs, mine) in enumerate(zip(expected, ours, strict=True), start=1):
        assert set(theirs) <= set(mine), set(theirs) - set(mine)
        for name, value in theirs.items():
            assert math.isfinite(value)
            difference = relative_difference(value, mine[name])
            if difference > worst[0]:
                worst = (difference, iteration, name)
    where = f" ({worst[2]}, iteration {worst[1]})" if worst[0] else ""
    print(f"{model}: max relative difference {worst[0]:.3g} over {ITERATIONS} iterations{where}")
    assert worst[0] <= TOLERANCE, f"{model}: {worst[2]} differs by {worst[0]:.3g} at {worst[1]}"
    # Not a constant stream: the losses move, and the LR warms up.
    assert len({round(r["loss"], 6) for r in expected}) == ITERATIONS
    assert expected[0]["lr"] < expected[-1]["lr"]


def assert_same_validations(expected: list[dict], records: list[dict]) -> None:
    """The Runner's validations after iterations 8 and 16 against ours, metric by metric."""
    ours = [r["metrics"] for r in records if r["kind"] == "validation"][:2]
    assert len(expected) == len(ours) == 2
    for theirs, mine in zip(expected, ours, strict=True):
        theirs = {name.removeprefix("coco/"): value for name, value in theirs.items()}
        assert len(theirs) >= 6 and set(theirs) <= set(mine), set(theirs) - set(mine)
        for name, value in theirs.items():
            assert mine[name] == pytest.approx(value, rel=TOLERANCE, abs=1e-9), name
    # Metrics that say something: not all zero (after 8 iterations GFL finds nothing yet).
    assert ours[-1]["bbox_mAP"] > 0 and ours[-1]["bbox_AR_100"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["maskrcnn", "retinanet", "gfl"])
def test_trial_trains_like_mmengine_runner(
    tmp_path: Path, synthetic_data: dict, model: str
) -> None:
    recorder, _, records = train_both(tmp_path, synthetic_data, model)
    assert_same_losses(model, recorder.records, records)
    assert_same_validations(recorder.validations, records)


@pytest.mark.slow
def test_gradient_accumulation_trains_like_mmengine_runner(
    tmp_path: Path, synthetic_data: dict
) -> None:
    """accumulative_counts 2 under the iteration-based warm-up: mmengine's OptimWrapper steps
    every second iteration while ParamSchedulerHook moves the LR after every one; the session
    does the same (Determined averages the two batches' gradients where mmengine halves each
    loss: equal up to rounding)."""
    accumulate = "optim_wrapper = dict(accumulative_counts=2)\n"
    recorder, _, records = train_both(tmp_path, synthetic_data, "retinanet", accumulate)
    assert_same_losses("retinanet, accumulation 2", recorder.records, records)
    lrs = [r["lr"] for r in recorder.records]
    assert lrs[0] < lrs[1] < lrs[2]  # the LR moves every iteration, not every optimizer step


# An EMA that lags (gamma 4 instead of RTMDet's 2000) and a pipeline switch after the first epoch
# of 8 iterations (to 96 px images, where the original pipeline resizes to 128).
HOOKS = """
custom_hooks = [
    dict(type="EMAHook", ema_type="ExpMomentumEMA", momentum=0.2, gamma=4, update_buffers=True,
         priority=49),
    dict(type="PipelineSwitchHook", switch_epoch=1, switch_pipeline=[
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="Resize", scale=(96, 96), keep_ratio=True),
        dict(type="PackDetInputs"),
    ]),
]
"""


@pytest.mark.slow
def test_ema_and_pipeline_switch_hooks_act_as_in_mmengine(
    tmp_path: Path, synthetic_data: dict
) -> None:
    """The losses follow the switched pipeline from iteration 9 on, validations see the averaged
    weights, and the checkpoint's export holds them as the Runner's EMAHook has them."""
    recorder, stopper, records = train_both(tmp_path, synthetic_data, "retinanet", HOOKS)
    assert_same_losses("retinanet with hooks", recorder.records, records)
    assert_same_validations(recorder.validations, records)
    checkpoint = max(
        (tmp_path / "ours" / "determined").iterdir(),
        key=lambda path: json.loads((path / "metadata.json").read_text())["steps_completed"],
    )
    exported = torch.load(checkpoint / "mmdet" / "model.pth", weights_only=False)["state_dict"]
    assert stopper.ema is not None and set(exported) == set(stopper.ema)
    for name, value in stopper.ema.items():
        torch.testing.assert_close(exported[name], value, rtol=TOLERANCE, atol=0)
    trained = load_determined_weights(checkpoint, averaged=False)
    assert any(not torch.equal(trained[name], exported[name]) for name in exported)


class Shapes:
    """A dataset stand-in with mmdet's `get_data_info`: landscape, portrait and square images."""

    def __init__(self) -> None:
        self.sizes = [(64, 48)] * 9 + [(48, 64)] * 7 + [(40, 40)] * 5

    def __len__(self) -> int:
        return len(self.sizes)

    def get_data_info(self, index: int) -> dict:
        width, height = self.sizes[index]
        return {"width": width, "height": height}


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("batch_size", [1, 2, 4, 5])
def test_single_slot_batches_are_mmengine_batches(seed: int, batch_size: int) -> None:
    """DefaultSampler(shuffle, seed) + AspectRatioBatchSampler, epoch by epoch, as the runner
    sets the sampler's epoch."""
    dataset = Shapes()
    sampler = DefaultSampler(dataset, shuffle=True, seed=seed)
    reference = AspectRatioBatchSampler(sampler, batch_size=batch_size)
    ours = GroupedBatchSampler(dataset, batch_size=batch_size, seed=seed)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert [[i for _, i in batch] for batch in ours] == list(reference)


@pytest.mark.parametrize("persistent", [False, True])
def test_seed_draws_follow_torch_loaders(persistent: bool) -> None:
    """The global generator advances as with mmengine's loaders: 3 epochs, each validated."""
    workers = 1 if persistent else 0

    def loader(data: list[int]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            data, batch_size=2, num_workers=workers, persistent_workers=persistent
        )

    def model_step() -> float:  # what a model's random sampling takes, e.g. torch.randperm
        return torch.rand(()).item()

    torch.manual_seed(3)
    train, val = loader(list(range(8))), loader(list(range(3)))
    reference = []
    for _ in range(3):
        reference += [model_step() for _ in train]
        reference += [model_step() for _ in val]

    torch.manual_seed(3)
    draws = LoaderSeedDraws(persistent, persistent, epoch_length=4)
    ours = []
    for epoch in range(3):
        for batch in range(4):
            draws.before_train_batch(epoch * 4 + batch)
            ours.append(model_step())
        draws.before_validation(first=epoch == 0)
        ours += [model_step() for _ in range(2)]
    assert ours == reference
