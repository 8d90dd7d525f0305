"""A long run never loses its training to a late failure: what the first validation would fail on
is found at start-up, and a validation that still fails leaves a checkpoint of the trained weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.logging import MMLogger

from on_determined.callbacks import ValidationFailed
from tests.conftest import REPO, TINY_SYNTHETIC, disk_data, train
from utils.base.errors import ConfigError, DataError
from utils.config.build import resolve_config_path
from utils.evaluation.preflight import evaluation_problems, predicts_masks
from utils.training.weights import INIT_LOG_VARIABLE, init_weights

RETINANET = "configs/synthetic/retinanet_r18_fpn_synthetic.py"


def override(mapping: str) -> tuple[str, str]:
    return "--set", f"hyperparameters.override_mmdet_config={mapping}"


def build_model(config: str) -> torch.nn.Module:
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(resolve_config_path(config)))
    cfg.model.backbone.init_cfg = None  # no download: the structure is what matters
    return MODELS.build(cfg.model)


# Start-up checks.


@pytest.mark.parametrize(
    ("config", "masks"),
    [
        ("mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py", False),
        ("mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", False),
        ("mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", True),
        ("mmdet::rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py", True),
        ("mmdet::solo/solo_r50_fpn_1x_coco.py", True),
    ],
)
def test_which_detectors_predict_masks(config: str, masks: bool) -> None:
    model = build_model(config)
    assert predicts_masks(model) is masks
    cfg = Config({"val_evaluator": {"type": "CocoMetric", "metric": ["bbox", "segm"]}})
    problems = evaluation_problems(cfg, model)
    if masks:
        assert problems == []
    else:
        (problem,) = problems
        assert problem.startswith(
            f"val_evaluator.metric asks for 'segm', but the model ({type(model).__name__}) "
            "predicts no masks: evaluate bbox"
        )


def test_box_only_detector_with_a_segm_evaluator_fails_at_start_up(
    tmp_path: Path, synthetic_data: dict
) -> None:
    with pytest.raises(
        ConfigError,
        match=r"val_evaluator.metric asks for 'segm', but the model \(RetinaNet\) predicts no "
        "masks: evaluate bbox",
    ):
        train(
            tmp_path, RETINANET, synthetic_data, *override("{val_evaluator.metric: [bbox, segm]}")
        )
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was trained


def test_iou_thresholds_without_half_and_three_quarters_fail_at_start_up(
    tmp_path: Path, synthetic_data: dict
) -> None:
    merge = tmp_path / "iou.py"  # a key the config does not have: merge_config, not an override
    merge.write_text("val_evaluator = dict(iou_thrs=[0.6, 0.7])\n")
    with pytest.raises(
        ConfigError,
        match=r"val_evaluator.iou_thrs \[0.6, 0.7\] lacks 0.5 and 0.75, which mAP_50 and mAP_75 "
        "are measured at",
    ):
        train(tmp_path, RETINANET, synthetic_data, "--set", f"hyperparameters.merge_config={merge}")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_coco_settings_the_engine_cannot_compute_are_named() -> None:
    def problems(**metric: object) -> list[str]:
        cfg = Config({"val_evaluator": [{"type": "VOCMetric"}, {"type": "CocoMetric", **metric}]})
        return evaluation_problems(cfg, None)

    assert problems() == []
    assert problems(iou_thrs=[0.5, 0.75, 0.9]) == []
    # Without mAP_50 and mAP_75 among the statistics, other thresholds are fine.
    assert problems(iou_thrs=[0.6, 0.7], metric_items=["mAP", "AR@100"]) == []
    (lacking,) = problems(iou_thrs=[0.5, 0.6])
    assert lacking.startswith("val_evaluator.1.iou_thrs [0.5, 0.6] lacks 0.75, which mAP_75")
    (short,) = problems(proposal_nums=[10, 100])
    assert (
        "val_evaluator.1.proposal_nums is [10, 100]: the COCO engine needs three or more" in short
    )
    (no_100,) = problems(proposal_nums=[10, 20, 50])
    assert no_100.startswith("val_evaluator.1.proposal_nums [10, 20, 50] lacks 100")
    (items,) = problems(metric_items=["mAP", "AP50"])
    assert items.startswith("val_evaluator.1.metric_items: ['AP50'] are not COCO statistics")
    (metric,) = problems(metric="keypoints")
    assert metric.startswith("val_evaluator.1.metric: ['keypoints'] are not CocoMetric metrics")
    # proposal_fast is mmdet's own recall: the COCO engine's settings do not apply.
    assert problems(metric="proposal_fast", proposal_nums=[10, 20]) == []


@pytest.mark.parametrize("backend", ["hotcoco", "pycocotools"])
def test_iou_thresholds_given_as_a_list_are_computed(tmp_path: Path, backend: str) -> None:
    """A config's list of thresholds crashed both engines (`iouThr == list` is one bool)."""
    from bench.coco_data import CLASSES, generate, to_samples
    from utils.evaluation.evaluator import CocoEvaluator

    register_all_modules(init_default_scope=True)
    data = generate(4, image_size=128, seed=3)
    ann_file = tmp_path / "instances_val.json"
    ann_file.write_text(json.dumps(data.gt))
    metric = {"type": "CocoMetric", "ann_file": str(ann_file), "metric": ["bbox", "segm"]}
    results = []
    for thresholds in (None, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]):
        evaluator = CocoEvaluator(
            Config({"val_evaluator": {**metric, "iou_thrs": thresholds}}),
            backend,
            meta={"classes": CLASSES},
        )
        evaluator.update(to_samples(data.predictions, with_masks=True))
        results.append(evaluator.compute([evaluator.entries]))
    assert results[0]["bbox_mAP_50"] >= 0
    assert results[1] == pytest.approx(results[0], abs=1e-12)


def test_a_missing_validation_image_fails_at_start_up(tmp_path: Path, coco: Path) -> None:
    (coco / "val" / "000003.png").unlink()
    with pytest.raises(
        DataError,
        match=r"data.val_img_prefix: 1 of 8 val images are missing or empty, e\.g\. "
        r"\S*val/000003.png",
    ):
        train(tmp_path / "run", RETINANET, disk_data(coco), "--max-batches", "2")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# A validation that still fails.


def checkpoint_in(message: str) -> Path:
    match = re.search(r"The trained weights are in checkpoint (\S+): fix the cause", message)
    assert match, message
    return Path(match.group(1))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(checkpoint / "mmdet" / "model.pth", map_location="cpu", weights_only=True)
    assert saved["meta"]["iter"] == 2
    return saved["state_dict"]


def test_a_truncated_validation_image_leaves_a_checkpoint_of_the_trained_weights(
    tmp_path: Path, coco: Path
) -> None:
    data = disk_data(coco)
    train(tmp_path / "good", RETINANET, data, "--max-batches", "2")
    (good,) = (tmp_path / "good" / "determined").iterdir()
    image = coco / "val" / "000003.png"
    original = image.read_bytes()
    image.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # exists, 10 bytes: found only by decoding

    with pytest.raises(ValidationFailed) as failed:
        train(tmp_path / "bad", RETINANET, data, "--max-batches", "2")
    message = str(failed.value)
    assert re.match(
        r"The validation after 2 batches failed: \S*val/000003.png: cannot load it", message
    ), message
    checkpoint = checkpoint_in(message)
    assert checkpoint.parent == tmp_path / "bad" / "determined"
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]
    trained, reference = weights(checkpoint), weights(good)
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[k], reference[k]) for k in reference)
    records = [
        json.loads(line) for line in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["kind"], r["batches"]) for r in records] == [("training", 2)]

    image.write_bytes(original)  # fixed: the run resumes from the checkpoint
    resumed = train(
        tmp_path / "resumed",
        RETINANET,
        data,
        "--max-batches",
        "4",
        "--report-every",
        "1",
        "--resume",
        str(checkpoint),
    )
    assert [(r["kind"], r["batches"]) for r in resumed] == [
        ("training", 3),
        ("training", 4),
        ("validation", 4),
    ]
    assert resumed[-1]["metrics"]["num_images"] == TINY_SYNTHETIC["num_val"]


@pytest.mark.slow
def test_a_validation_failing_on_one_rank_ends_every_rank_with_a_checkpoint(
    tmp_path: Path, coco: Path
) -> None:
    """Two ranks share the 8 validation images in two batches of 4: the second is rank 1's."""
    (coco / "val" / "000005.png").write_bytes(b"not a png")
    run = [str(REPO / "model_def.py"), str(REPO / "experiments" / "demo.yaml"), "--local"]
    run += ["--output", str(tmp_path / "run"), "--max-batches", "2"]
    for key, value in [
        ("hyperparameters.config_file", RETINANET),
        ("hyperparameters.global_batch_size", 4),
        ("data", json.dumps(disk_data(coco))),
    ]:
        run += ["--set", f"{key}={value}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node=2", "--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A rank left waiting in a collective would hang until the timeout.
    result = subprocess.run(
        [*torchrun, *run], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode != 0
    failed = "model_def.py: The validation after 2 batches failed: "
    lines = [line for line in result.stderr.splitlines() if line.startswith(failed)]
    assert len(lines) == 2, result.stderr[-3000:]  # one line from each rank
    assert all("val/000005.png: cannot load it" in line for line in lines)
    checkpoint = checkpoint_in(next(line for line in lines if "/determined/" in line))
    assert (checkpoint / "mmdet" / "model.pth").is_file()
    assert (checkpoint / "state_dict.pth").is_file()


# Weight-initialisation messages.


def test_init_messages_stay_off_the_console_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(RETINANET)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    # mmengine's current logger is the one this process made last; one with a file handler (a
    # Runner's, from another test) takes the init messages into its file instead: a fresh one.
    mm_logger = MMLogger.get_instance("init-messages-test", log_level="INFO")
    assert MMLogger.get_current_instance() is mm_logger
    level = mm_logger.level
    mm_logger.addHandler(handler)
    try:
        monkeypatch.delenv(INIT_LOG_VARIABLE, raising=False)
        init_weights(model)
        assert not [r for r in records if "torch.Size" in r.getMessage()]
        assert mm_logger.level == level
        monkeypatch.setenv(INIT_LOG_VARIABLE, "1")
        init_weights(build_model(RETINANET))
        shown = [r for r in records if "torch.Size" in r.getMessage()]
        assert len(shown) == len(list(model.parameters()))
    finally:
        mm_logger.removeHandler(handler)
