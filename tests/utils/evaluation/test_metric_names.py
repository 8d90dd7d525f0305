"""The metric names a run reports, derived from its config and model, against what real runs and
the real evaluator report; a searcher metric checked against them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from determined.core._train import DummyTrainContext
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

from bench.coco_data import CLASSES, to_samples
from tests.conftest import REPO, SGD_SETS, train
from tests.utils.evaluation.generated import written_set
from utils.base.errors import ConfigError
from utils.evaluation.evaluator import CocoEvaluator
from utils.evaluation.metric_names import (
    ENGINE_KEYS,
    check_searcher,
    reported_metrics,
    searcher_metric_problems,
)
from utils.experiment.load import load_experiment, local_hparams
from utils.training.plan import plan_run
from utils.training.session import prepare_data

MASK_RCNN = "configs/synthetic/maskrcnn_r18_fpn_synthetic.py"


def test_derived_names_are_what_a_real_run_reports_to_determined(
    tmp_path: Path, synthetic_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch of the tiny Mask R-CNN (bbox and segm, 3 classes: per-class AP), validated:
    the names Determined's searcher gets are the derived ones, not one more or less."""
    reports: list[dict[str, Any]] = []
    report = DummyTrainContext.report_validation_metrics

    def record(self: DummyTrainContext, steps_completed: int, metrics: dict) -> None:
        reports.append(dict(metrics))  # what a master's searcher reads; then Determined's own
        report(self, steps_completed, metrics)

    monkeypatch.setattr(DummyTrainContext, "report_validation_metrics", record)
    records = train(tmp_path / "run", MASK_RCNN, synthetic_data, "--max-batches", "1")

    exp = load_experiment(
        REPO / "experiments" / "demo.yaml",
        [
            f"hyperparameters.config_file={MASK_RCNN}",
            "hyperparameters.global_batch_size=4",
            f"data={json.dumps(synthetic_data)}",
            *SGD_SETS,
        ],
    )
    plan = prepare_data(plan_run(local_hparams(exp["hyperparameters"]), exp["data"]))
    derived = reported_metrics(plan.cfg, MODELS.build(plan.cfg.model))
    (reported,) = reports
    assert derived == set(reported)
    (validation,) = [r["metrics"] for r in records if r["kind"] == "validation"]
    assert derived == set(validation) | set(ENGINE_KEYS)  # the core's, and what engines add
    assert {"segm_mAP", "bbox_AR_100", "bbox_AP_per_class/circle", "bbox_best_F1"} <= derived


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list]:
    ann_file, data = written_set(tmp_path_factory.mktemp("coco"), 8, image_size=128, seed=1)
    return ann_file, data.predictions


@pytest.mark.parametrize(
    "settings",
    [
        {"metric": ["bbox", "segm"]},
        {"metric": "bbox", "classwise": False},
        {"metric": ["bbox", "segm"], "metric_items": ["mAP", "mAP_50", "AR@100"]},
        {"metric": "bbox", "metric_items": None},  # mmdet's first six
        {"metric": ["bbox", "proposal"]},
        {"metric": "bbox", "format_only": True, "outfile_prefix": "unused"},
        [{"metric": "bbox", "classwise": True}, {"metric": "segm", "classwise": False}],
    ],
    ids=["default", "no-classwise", "items", "six", "proposals", "format-only", "two"],
)
def test_derived_names_are_what_the_evaluator_computes(
    evaluated: tuple[str, list], tmp_path: Path, settings: Any
) -> None:
    ann_file, records = evaluated
    evaluators = settings if isinstance(settings, list) else [settings]
    evaluators = [{"type": "CocoMetric", "ann_file": ann_file, **s} for s in evaluators]
    for evaluator in evaluators:
        if "outfile_prefix" in evaluator:
            evaluator["outfile_prefix"] = str(tmp_path / "results")
    cfg = Config(
        {
            "val_evaluator": evaluators if isinstance(settings, list) else evaluators[0],
            "val_dataloader": {"dataset": {"ann_file": ann_file, "metainfo": {"classes": CLASSES}}},
        }
    )
    evaluator = CocoEvaluator(cfg, "hotcoco", meta={"classes": CLASSES})
    evaluator.update(to_samples(records, with_masks=True))
    computed = evaluator.compute([evaluator.entries])
    assert reported_metrics(cfg) == set(computed) | set(ENGINE_KEYS)


def test_unknown_classes_and_evaluators_are_patterns() -> None:
    dataset = {"ann_file": "val.json"}  # classes not read yet
    cfg = Config({"val_evaluator": {"type": "CocoMetric"}, "val_dataloader": {"dataset": dataset}})
    names = reported_metrics(cfg)
    assert "bbox_AP_per_class/*" in names and "bbox_mAP" in names and "segm_mAP" not in names
    assert searcher_metric_problems("bbox_AP_per_class/tree", False, names) == ([], [])
    cfg.val_evaluator = [cfg.val_evaluator, {"type": "LVISMetric"}]
    assert searcher_metric_problems("lvis_bbox_AP", False, reported_metrics(cfg))[0] == []


def test_voc_names() -> None:
    cfg = Config(
        {
            "val_evaluator": {"type": "PrefixedVOCMetric", "metric": "mAP", "prefix": "voc"},
            "val_dataloader": {"dataset": {"ann_file": "test.txt"}},
        }
    )
    assert reported_metrics(cfg) == {"voc_mAP", "voc_AP50", "num_images", "batches", "epochs"}


def test_segm_keys_need_a_model_with_masks() -> None:
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(REPO / "configs" / "synthetic" / "retinanet_r18_fpn_synthetic.py")
    cfg.val_evaluator.metric = ["bbox", "segm"]
    model = MODELS.build(cfg.model)
    assert "segm_mAP" in reported_metrics(cfg) and "segm_mAP" not in reported_metrics(cfg, model)


BBOX = {"bbox_mAP", "bbox_mAP_50", "bbox_best_F1", "bbox_AP_per_class/tree", "num_images"}


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ("bbox_map", "searcher.metric 'bbox_map' is not a metric this run's validation reports"),
        ("bbox_map", "Did you mean bbox_mAP? Set searcher.metric to one it reports: "),
        ("segm_mAP", "the run evaluates no masks (val_evaluator.metric). Did you mean bbox_mAP?"),
        ("loss_cls", "'loss_cls' is a training metric; searchers read the validation's metrics"),
        ("mAP", "bbox_best_F1, bbox_mAP, bbox_mAP_50, num_images, bbox_AP_per_class/<class>"),
    ],
)
def test_unreported_metric_is_a_problem_with_the_close_name(metric: str, message: str) -> None:
    (problem,), _ = searcher_metric_problems(metric, False, BBOX)
    assert message in problem, problem


@pytest.mark.parametrize(
    ("metric", "smaller", "warned"),
    [
        ("bbox_mAP", True, "smaller_is_better is true (Determined's default) but bbox_mAP"),
        ("bbox_AP_per_class/tree", True, "but bbox_AP_per_class/tree is better when larger"),
        ("bbox_best_F1", True, "set smaller_is_better: false"),
        ("loss", False, "smaller_is_better is false but loss is a loss, better when smaller"),
        ("bbox_mAP", False, None),
        ("num_images", True, None),
        ("bbox_best_F1_score_thr", False, None),
    ],
)
def test_a_contradicting_direction_is_a_warning(metric: str, smaller: bool, warned: str) -> None:
    _, warnings = searcher_metric_problems(metric, smaller, BBOX | {"bbox_best_F1_score_thr"})
    assert warnings == [] if warned is None else warned in warnings[0]


def test_run_start_refuses_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    cfg = Config.fromfile(REPO / "configs" / "synthetic" / "retinanet_r18_fpn_synthetic.py")
    searcher = {"name": "single", "metric": "bbox_map"}
    with pytest.raises(ConfigError, match="Did you mean bbox_mAP"):
        check_searcher(cfg, searcher)
    check_searcher(cfg, searcher, refuse=False)
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("Did you mean bbox_mAP" in m for m in messages)
    assert any("smaller_is_better is true" in m for m in messages)


def test_plan_run_logs_the_searcher_metric(
    synthetic_data: dict, caplog: pytest.LogCaptureFixture
) -> None:
    hparams = {"config_file": MASK_RCNN, "global_batch_size": 4}
    plan_run(hparams, synthetic_data, searcher={"name": "single", "metric": "segm_map"})
    assert any("Did you mean segm_mAP" in r.getMessage() for r in caplog.records)
