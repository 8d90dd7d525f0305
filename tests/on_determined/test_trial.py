"""Train the small detectors through Determined's real Trainer on generated data."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mmcv.transforms import BaseTransform
from mmdet.registry import TRANSFORMS
from mmengine.config import Config

import model_def
from tests.conftest import TINY_SYNTHETIC, train
from utils.data.synthetic import CLASSES
from utils.experiment.load import environment_variables, load_experiment, local_hparams
from utils.training.keys import check_experiment_keys
from utils.training.plan import plan_run
from utils.training.session import prepare_data

REPO = Path(__file__).resolve().parents[2]
COCO_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_100", "AR_300", "AR_1000")
COCO_NAMES += ("AR_s_1000", "AR_m_1000", "AR_l_1000")


@TRANSFORMS.register_module(force=True)
class NanImage(BaseTransform):
    """Test-only transform: a NaN image, as corrupt data or a diverging model would produce."""

    def transform(self, results: dict) -> dict:
        results["img"] = np.full(results["img"].shape, np.nan, dtype=np.float32)
        return results


def run(output: Path, cache: Path, config: str, *extra: str) -> list[dict]:
    data = {"backend": "synthetic", "cache_dir": str(cache), "synthetic": TINY_SYNTHETIC}
    return train(output, f"configs/synthetic/{config}.py", data, "--report-every", "1", *extra)


@pytest.mark.slow  # three trainings, each validated: about 2 min on 2 shared cores
@pytest.mark.parametrize(
    ("config", "tasks", "losses"),
    [
        ("maskrcnn_r18_fpn_synthetic", ("bbox", "segm"), ("loss_rpn_cls", "loss_mask")),
        ("retinanet_r18_fpn_synthetic", ("bbox",), ("loss_cls", "loss_bbox")),
        ("gfl_r18_fpn_synthetic", ("bbox",), ("loss_cls", "loss_dfl")),
    ],
)
def test_trains_validates_and_checkpoints(
    tmp_path: Path, synthetic_cache: Path, config: str, tasks: tuple, losses: tuple
) -> None:
    records = run(tmp_path, synthetic_cache, config, "--max-batches", "3")
    training = [r for r in records if r["kind"] == "training"]
    validation = [r for r in records if r["kind"] == "validation"]
    assert [r["batches"] for r in training] == [1, 2, 3]
    for record in training:
        metrics = record["metrics"]
        assert all(math.isfinite(metrics[name]) for name in ("loss", "lr", *losses))
        assert metrics["loss"] > 0
    assert [r["batches"] for r in validation] == [3]
    metrics = validation[0]["metrics"]
    expected = {f"{task}_{name}" for task in tasks for name in COCO_NAMES}
    # Per-class AP, grouped under one prefix per IoU type (3 classes: on by default).
    expected |= {f"{task}_AP_per_class/{name}" for task in tasks for name in CLASSES}
    # The score threshold of best F1 at IoU 0.5, with that F1, precision and recall.
    best = ("_score_thr", "", "_precision", "_recall")
    expected |= {f"{task}_best_F1{suffix}" for task in tasks for suffix in best}
    assert expected <= set(metrics)
    # pycocotools reports -1 where an area range has no ground truth (no large objects here).
    assert all(0.0 <= metrics[name] <= 1.0 or metrics[name] == -1.0 for name in expected)
    assert metrics["bbox_mAP_m"] >= 0.0
    assert not {name for name in metrics if name.startswith("segm_")} - expected
    assert metrics["num_images"] == TINY_SYNTHETIC["num_val"]

    checkpoints = list((tmp_path / "determined").iterdir())
    assert len(checkpoints) == 1
    assert (checkpoints[0] / "metadata.json").is_file()
    code = checkpoints[0] / "code"
    assert (code / "model_def.py").is_file() and not (code / ".venv").exists()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow  # three runs, 15 batches in all: about 1.5 min on 2 shared cores
def test_resume_continues_exactly(tmp_path: Path, synthetic_cache: Path) -> None:
    config = "retinanet_r18_fpn_synthetic"
    straight = run(tmp_path / "straight", synthetic_cache, config, "--max-batches", "6")
    run(tmp_path / "first", synthetic_cache, config, "--max-batches", "3")
    (checkpoint,) = (tmp_path / "first" / "determined").iterdir()
    resumed = run(
        tmp_path / "second",
        synthetic_cache,
        config,
        "--max-batches",
        "6",
        "--resume",
        str(checkpoint),
    )

    def losses(records: list[dict]) -> dict[int, float]:
        return {r["batches"]: r["metrics"]["loss"] for r in records if r["kind"] == "training"}

    assert sorted(losses(resumed)) == [4, 5, 6]
    expected = {b: loss for b, loss in losses(straight).items() if b > 3}
    assert losses(resumed) == pytest.approx(expected, rel=1e-6)
    # 16 images, 4 per batch: 4 batches per epoch, so the resumed part crosses an epoch boundary.
    assert len(set(losses(straight).values())) == 6


def test_resume_needs_a_checkpoint_folder(tmp_path: Path, synthetic_cache: Path) -> None:
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        run(tmp_path, synthetic_cache, "retinanet_r18_fpn_synthetic", "--resume", str(tmp_path))


EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
# Experiments whose local run on generated data would train exactly the run of another (the test's
# overrides give them its global batch): checked to plan that run, not trained again. The twin is
# the experiment whose own global batch the test keeps (2).
SAME_RUN_AS = {"custom_coco": "maskrcnn_1gpu", "maskrcnn_16gpu": "maskrcnn_1gpu"}
# Experiments whose run differs from a trained twin's only in numbers that take the same code
# path whatever their value (the optimizer's lr and weight decay, and the hyperparameters that
# set them; a searcher's length that gives the config's own schedule): R50 at 1333x800 is not
# trained again to show that path, the config check below proves it.
SAME_CODE_AS = {"maskrcnn": "maskrcnn_1gpu", "maskrcnn_search": "maskrcnn_1gpu"}
NUMBERS = ("lr", "weight_decay", "auto_scale_lr")
TRAINED = [name for name in EXPERIMENTS if name not in SAME_RUN_AS | SAME_CODE_AS]


def experiment_sets(cache: Path) -> list[str]:
    """The `--set`s of the every-experiment tests: generated data, a global batch of 2."""
    return [
        "data.backend=synthetic",
        f"data.cache_dir={cache}",
        f"data.synthetic={json.dumps({**TINY_SYNTHETIC, 'num_val': 2})}",
        "hyperparameters.global_batch_size=2",
    ]


def planned_run(name: str, cache: Path) -> dict[str, Any]:
    """What `model_def.py EXPERIMENT --local --set ...` (`experiment_sets`) trains: the plan as
    on_determined/local.py and trial.plan_trial make it (one process), its data prepared as the
    session prepares it, with the config as a dict; and the environment variables the run sets.

    Nothing is normalised: the overrides give every experiment one process, a global batch of 2
    (so the same per-process batch, whatever `slots_per_trial` says) and one generated set (so the
    same data paths). The rest of an experiment file (resources, names, bind mounts, checkpoint
    storage) does not reach a local run's training.
    """
    exp_conf = load_experiment(REPO / "experiments" / f"{name}.yaml", experiment_sets(cache))
    check_experiment_keys(exp_conf)
    hparams = local_hparams(exp_conf.get("hyperparameters") or {})
    searcher = exp_conf.get("searcher") or {}
    plan = prepare_data(plan_run(hparams, exp_conf.get("data") or {}, searcher=searcher))
    run = {field.name: getattr(plan, field.name) for field in dataclasses.fields(plan)}
    run["cfg"] = plan.cfg.to_dict()  # mmengine's Config compares by identity
    run["schedule"] = plan.schedule(TINY_SYNTHETIC["num_train"])
    run["environment_variables"] = environment_variables(exp_conf, cuda=False)
    return run


def run_differences(run: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """How two planned runs differ: the fields, then the configs' text as a unified diff."""
    lines = [
        f"{key}: {run[key]!r} != {other.get(key)!r}"
        for key in run
        if key != "cfg" and run[key] != other.get(key)
    ]
    if run["cfg"] != other["cfg"]:
        texts = [Config(r["cfg"]).pretty_text.splitlines() for r in (run, other)]
        lines += difflib.unified_diff(*texts, lineterm="", n=1)
    return lines


@pytest.mark.parametrize(("name", "twin"), sorted(SAME_RUN_AS.items()))
def test_every_experiment_not_trained_plans_exactly_its_twins_run(
    synthetic_cache: Path, name: str, twin: str
) -> None:
    run, twins = (planned_run(n, synthetic_cache) for n in (name, twin))
    differences = "\n".join(run_differences(run, twins))
    assert not differences, f"{name} no longer plans {twin}'s run (SAME_RUN_AS):\n{differences}"


def without_numbers(run: dict[str, Any]) -> dict[str, Any]:
    """The run with the NUMBERS of SAME_CODE_AS taken out (its schedule stays, its length goes)."""
    run = copy.deepcopy(run)
    for key in NUMBERS:
        run["hparams"].pop(key, None)
    for key in ("lr", "weight_decay"):
        run["cfg"]["optim_wrapper"]["optimizer"].pop(key)
    run.pop("length")
    return run


@pytest.mark.parametrize(("name", "twin"), sorted(SAME_CODE_AS.items()))
def test_every_experiment_not_trained_differs_from_its_twin_in_numbers_only(
    synthetic_cache: Path, name: str, twin: str
) -> None:
    run, twins = (planned_run(n, synthetic_cache) for n in (name, twin))
    assert run_differences(run, twins), f"{name} plans {twin}'s run: list it in SAME_RUN_AS"
    differences = "\n".join(run_differences(without_numbers(run), without_numbers(twins)))
    assert not differences, f"{name} differs from {twin} beyond {NUMBERS}:\n{differences}"


def test_every_experiment_trained_plans_a_run_of_its_own(synthetic_cache: Path) -> None:
    """Else the test trains one run twice: list the second in SAME_RUN_AS."""
    runs = {name: planned_run(name, synthetic_cache) for name in TRAINED}
    same = [(a, b) for a, b in itertools.combinations(TRAINED, 2) if runs[a] == runs[b]]
    assert not same


def resize_overrides(run: dict[str, Any], side: int = 128) -> dict[str, int]:
    """`override_mmdet_config` keys that set every `Resize` of the run's loaders to `side` px."""
    overrides = {}

    def visit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, f"{path}.{key}")
        elif isinstance(node, list | tuple):
            for index, value in enumerate(node):
                if isinstance(value, dict) and value.get("type") == "Resize" and "scale" in value:
                    # An int: mmcv reads it as a square; a YAML list would not be a tuple.
                    overrides[f"{path}.{index}.scale"] = side
                else:
                    visit(value, f"{path}.{index}")

    for loader in ("train_dataloader", "val_dataloader"):
        visit(run["cfg"][loader], loader)
    return overrides


@pytest.mark.slow  # full-size detectors on the CPU: up to about 25 s each on 2 shared cores
@pytest.mark.parametrize("name", TRAINED)
def test_every_experiment_runs_locally_on_generated_data(
    tmp_path: Path, synthetic_cache: Path, name: str
) -> None:
    """Each experiment's recipe (its model, pipelines, optimizer and hooks) for one batch of 2,
    then validation; once per distinct run (`SAME_RUN_AS`, `SAME_CODE_AS`). Its `Resize` steps
    scale to the generated images' 128 px: R50 at 1333x800 would show the same code path at
    about 5x the time (the configs at their own scale are checked above)."""
    resize = resize_overrides(planned_run(name, synthetic_cache))
    assert resize, f"{name}: no Resize in its pipelines"
    args = [
        str(REPO / "experiments" / f"{name}.yaml"),
        "--local",
        "--output",
        str(tmp_path),
        "--max-batches",
        "1",
        "--report-every",
        "1",
        *(part for value in experiment_sets(synthetic_cache) for part in ("--set", value)),
        "--set",
        f"hyperparameters.override_mmdet_config={json.dumps(resize)}",
    ]
    model_def.main(args)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["batches"]) for r in records] == [("training", 1), ("validation", 1)]
    assert math.isfinite(records[0]["metrics"]["loss"])
    assert {f"bbox_{n}" for n in COCO_NAMES} <= set(records[1]["metrics"])
    assert records[1]["metrics"]["num_images"] == 2


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
    tmp_path: Path, synthetic_cache: Path
) -> None:
    config = "retinanet_r18_fpn_synthetic"
    run(tmp_path / "good", synthetic_cache, config, "--max-batches", "2")
    (checkpoint,) = (tmp_path / "good" / "determined").iterdir()
    before = {p: p.stat().st_mtime_ns for p in checkpoint.rglob("*") if p.is_file()}
    # An mmdet mapping with a `type` key is wrapped in const, as Determined requires.
    poison = (
        "hyperparameters.override_mmdet_config="
        "{train_dataloader.dataset.pipeline.3: {type: const, val: {type: NanImage}}}"
    )
    with pytest.raises(RuntimeError, match=r"not finite at batch 3 \(loss=nan, loss_cls=") as err:
        run(
            tmp_path / "bad",
            synthetic_cache,
            config,
            "--max-batches",
            "4",
            "--resume",
            str(checkpoint),
            "--set",
            poison,
        )
    assert "resume from the last checkpoint" in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in checkpoint.rglob("*") if p.is_file()} == before
    assert [p.name for p in (tmp_path / "bad" / "determined").iterdir()] == [checkpoint.name]


@pytest.mark.slow  # copies the set, then trains and validates: about 35 s on 2 shared cores
def test_custom_coco_with_gaps_in_category_ids(tmp_path: Path, synthetic_cache: Path) -> None:
    """Category ids 3, 7, 11, a crowd region and an image without objects: trains and validates."""
    from utils.data.synthetic import SyntheticSpec, ensure_dataset

    source = ensure_dataset(synthetic_cache, SyntheticSpec(**TINY_SYNTHETIC))
    root = tmp_path / "custom"
    ids = {1: 3, 2: 7, 3: 11}
    for split in ("train", "val"):
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "images" / split).mkdir(parents=True)
        ann = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        for category in ann["categories"]:
            category["id"] = ids[category["id"]]
        for annotation in ann["annotations"]:
            annotation["category_id"] = ids[annotation["category_id"]]
        ann["annotations"][0]["iscrowd"] = 1
        # The last image keeps its file but loses its objects.
        last = ann["images"][-1]["id"]
        ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != last]
        for image in ann["images"]:
            (root / "images" / split / image["file_name"]).write_bytes(
                (source / split / image["file_name"]).read_bytes()
            )
            image["file_name"] = f"{split}/{image['file_name']}"
        (root / "annotations" / f"{split}.json").write_text(json.dumps(ann))
    data = {
        "backend": "disk",
        "root": str(root),
        "train_ann": "annotations/train.json",
        "val_ann": "annotations/val.json",
        "train_img_prefix": "images/",
        "val_img_prefix": "images/",
    }
    config = "configs/synthetic/retinanet_r18_fpn_synthetic.py"
    records = train(tmp_path / "run", config, data, "--max-batches", "2")
    (validation,) = [r["metrics"] for r in records if r["kind"] == "validation"]
    assert validation["num_images"] == TINY_SYNTHETIC["num_val"]  # the empty image is evaluated
    assert {f"bbox_{n}" for n in COCO_NAMES} <= set(validation)
    # mmdet maps the file's ids to contiguous labels by name, and the crowd box is ignored.
    from mmdet.registry import DATASETS

    from utils.training.plan import build_config

    cfg = build_config({"config_file": config, "global_batch_size": 4}, data)
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    assert dataset.metainfo["classes"] == ("circle", "square", "triangle")
    assert dataset.cat2label == {3: 0, 7: 1, 11: 2}
    first = dataset.get_data_info(0)["instances"]
    assert first[0]["ignore_flag"] == 1 and all(i["bbox_label"] in (0, 1, 2) for i in first)


def test_load_from_reports_heads_of_another_class_count(
    tmp_path: Path, synthetic_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Weights of a 5-class model: the class heads are skipped and named, the rest loaded."""
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(REPO / "configs" / "synthetic" / "gfl_r18_fpn_synthetic.py")
    cfg.model.bbox_head.num_classes = 5
    weights = tmp_path / "five_classes.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": MODELS.build(cfg.model).state_dict()}, weights)
    with caplog.at_level("INFO"):
        run(
            tmp_path / "run",
            synthetic_cache,
            "gfl_r18_fpn_synthetic",
            "--max-batches",
            "1",
            "--set",
            f"hyperparameters.load_from={weights}",
        )
    text = caplog.text
    assert "skipped bbox_head.gfl_cls.weight: shape (5, 64, 3, 3) in the checkpoint" in text
    assert "skipped_shape=2" in text and "missing=0" in text


def test_amp_config_trains_with_bfloat16_autocast_on_the_cpu(
    tmp_path: Path, synthetic_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """AmpOptimWrapper without CUDA: bfloat16 autocast on the CPU, no loss scaler."""
    with caplog.at_level("INFO"):
        records = run(
            tmp_path,
            synthetic_cache,
            "retinanet_r18_fpn_synthetic",
            "--max-batches",
            "2",
            "--set",
            "hyperparameters.override_mmdet_config={optim_wrapper.type: AmpOptimWrapper}",
        )
    assert "Mixed precision: torch.bfloat16 autocast on cpu." in caplog.text
    training = [r["metrics"] for r in records if r["kind"] == "training"]
    assert len(training) == 2 and all(math.isfinite(m["loss"]) for m in training)
