"""`model_def.py EXPERIMENT --check` on a searcher metric the validation does not report (refused,
with the close name) and on a `smaller_is_better` that contradicts it (a warning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import model_def
from tests.conftest import TINY_SYNTHETIC

RETINANET = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
MASK_RCNN = "configs/synthetic/maskrcnn_r18_fpn_synthetic.py"


def check(
    tmp_path: Path, cache: Path, searcher: dict, config: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """--check on an experiment written to `tmp_path`: its exit status and what it printed."""
    experiment = {
        "name": "metric-check",
        "entrypoint": "python3 model_def.py",
        "hyperparameters": {"config_file": config, "global_batch_size": 4},
        "data": {"backend": "synthetic", "cache_dir": str(cache), "synthetic": TINY_SYNTHETIC},
        "searcher": {"name": "single", **searcher},
        "resources": {"slots_per_trial": 1},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(experiment))))
    with pytest.raises(SystemExit) as exit_info:
        model_def.main([str(path), "--check"])
    return exit_info.value.code, capsys.readouterr().out


@pytest.mark.parametrize(
    ("searcher", "config", "printed"),
    [
        (
            {"metric": "bbox_map", "smaller_is_better": False},
            MASK_RCNN,
            "searcher.metric 'bbox_map' is not a metric this run's validation reports (a cluster "
            "trial would fail there). Did you mean bbox_mAP? Set searcher.metric to one it "
            "reports: batches, bbox_AR_100,",
        ),
        (
            {"metric": "segm_mAP", "smaller_is_better": False},
            RETINANET,
            "searcher.metric 'segm_mAP' is not reported: the run evaluates no masks "
            "(val_evaluator.metric). Did you mean bbox_mAP?",
        ),
        (
            {"metric": "loss", "smaller_is_better": True},
            MASK_RCNN,
            "searcher.metric 'loss' is a training metric; searchers read the validation's metrics",
        ),
    ],
    ids=["case", "segm-for-boxes", "loss"],
)
def test_unreported_searcher_metric_fails_the_check(
    tmp_path: Path,
    synthetic_cache: Path,
    capsys: pytest.CaptureFixture[str],
    searcher: dict,
    config: str,
    printed: str,
) -> None:
    status, out = check(tmp_path, synthetic_cache, searcher, config, capsys)
    assert status == 1
    assert "1 problem(s):" in out and f"  - {printed}" in out, out


def test_per_class_metric_of_the_data_passes(
    tmp_path: Path, synthetic_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    searcher = {"metric": "bbox_AP_per_class/circle", "smaller_is_better": False}
    status, out = check(tmp_path, synthetic_cache, searcher, RETINANET, capsys)
    assert status == 0, out
    searcher["metric"] = "bbox_AP_per_class/hexagon"
    status, out = check(tmp_path, synthetic_cache, searcher, RETINANET, capsys)
    assert status == 1 and "bbox_AP_per_class/<class>" in out, out


@pytest.mark.parametrize(
    ("searcher", "warning"),
    [
        (
            {"metric": "bbox_mAP"},
            "warning: searcher.smaller_is_better is true (Determined's default) but bbox_mAP is "
            "better when larger: the searcher would keep the worst trials; set "
            "smaller_is_better: false.",
        ),
        (
            {"metric": "segm_best_F1", "smaller_is_better": True},
            "but segm_best_F1 is better when larger",
        ),
    ],
)
def test_contradicting_direction_is_printed_not_fatal(
    tmp_path: Path,
    synthetic_cache: Path,
    capsys: pytest.CaptureFixture[str],
    searcher: dict,
    warning: str,
) -> None:
    status, out = check(tmp_path, synthetic_cache, searcher, MASK_RCNN, capsys)
    assert status == 0 and "OK: ready to submit" in out
    assert warning in out, out


def test_agreeing_direction_prints_no_warning(
    tmp_path: Path, synthetic_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    searcher = {"metric": "segm_mAP_50", "smaller_is_better": False}
    status, out = check(tmp_path, synthetic_cache, searcher, MASK_RCNN, capsys)
    assert status == 0 and "warning:" not in out, out
