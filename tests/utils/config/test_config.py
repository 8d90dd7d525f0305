from __future__ import annotations

import json
from pathlib import Path

import pytest
from mmengine.config import Config

from utils.base.errors import ConfigError
from utils.config.build import resolve_config_path
from utils.config.tree import drop_pretrained
from utils.data.source import DataError
from utils.experiment.load import load_experiment, local_hparams
from utils.training.plan import build_config, plan_run

REPO = Path(__file__).resolve().parents[3]
DEMO = "configs/synthetic/maskrcnn_r18_fpn_synthetic.py"


def hparams(**extra: object) -> dict:
    return {"config_file": DEMO, "global_batch_size": 4, **extra}


def test_demo_config_gets_data_batch_and_optimizer(synthetic_data: dict) -> None:
    cfg = build_config(hparams(lr=0.01, weight_decay=0.001, momentum=0.8), synthetic_data, slots=2)
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.optim_wrapper.optimizer.lr == 0.01
    assert cfg.optim_wrapper.optimizer.weight_decay == 0.001
    assert cfg.optim_wrapper.optimizer.momentum == 0.8
    dataset = cfg.train_dataloader.dataset
    assert Path(dataset.data_root, dataset.ann_file).is_file()
    assert dataset.metainfo["classes"] == ("circle", "square", "triangle")
    assert cfg.model.roi_head.bbox_head.num_classes == 3
    assert cfg.model.roi_head.mask_head.num_classes == 3
    assert Path(cfg.val_evaluator.ann_file).is_file()


def test_overrides_apply_last_and_reach_into_lists(synthetic_data: dict) -> None:
    overrides = {
        "model.backbone.depth": 34,
        "param_scheduler.1.gamma": 0.5,
        "val_dataloader.batch_size": 3,
    }
    cfg = build_config(hparams(override_mmdet_config=overrides), synthetic_data)
    assert cfg.model.backbone.depth == 34
    assert cfg.param_scheduler[1].gamma == 0.5
    assert cfg.val_dataloader.batch_size == 3


def test_batch_size_comes_from_global_batch_size_only(synthetic_data: dict) -> None:
    overrides = {"train_dataloader.batch_size": 3}
    with pytest.raises(ConfigError, match="set those instead"):
        build_config(hparams(override_mmdet_config=overrides), synthetic_data)


def test_unknown_override_key_is_named_with_suggestion(synthetic_data: dict) -> None:
    with pytest.raises(ConfigError, match=r"'model.backbone.dept'.*did you mean depth"):
        build_config(hparams(override_mmdet_config={"model.backbone.dept": 34}), synthetic_data)


def test_merge_config_is_applied_on_top(tmp_path: Path, synthetic_data: dict) -> None:
    extra = tmp_path / "extra.py"
    extra.write_text("model = dict(backbone=dict(depth=34))\n")
    cfg = build_config(hparams(merge_config=str(extra)), synthetic_data)
    assert cfg.model.backbone.depth == 34
    assert cfg.model.roi_head.mask_head.num_classes == 3


def test_mmdet_scoped_config_resolves() -> None:
    path = resolve_config_path("mmdet::retinanet/retinanet_r50_fpn_1x_coco.py")
    assert path.is_file() and path.parts[-2:] == ("retinanet", "retinanet_r50_fpn_1x_coco.py")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"config_file": "configs/missing.py"}, "configs/missing.py' not found"),
        ({"config_file": "mmdet::nope/nope.py"}, "config 'mmdet::nope/nope.py' not found"),
        ({"global_batch_size": 5}, "global_batch_size 5 does not divide by"),
        ({"global_batch_size": None}, "global_batch_size is None"),
    ],
)
def test_bad_hyperparameters_are_explained(
    changes: dict, message: str, synthetic_data: dict
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({**hparams(), **changes}, synthetic_data, slots=2)


def test_unknown_backend_is_named() -> None:
    with pytest.raises(
        DataError, match="data.backend 's4' is unknown; use one of synthetic, disk, gcs"
    ):
        build_config(hparams(), {"backend": "s4"})


def test_disk_backend_needs_root_and_annotation_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root is not set"):
        build_config(hparams(), {"backend": "disk"})
    with pytest.raises(DataError, match=r"data.train_ann: annotation file .*instances_train2017"):
        build_config(hparams(), {"backend": "disk", "root": str(tmp_path)})


def custom_layout(root: Path) -> dict:
    categories = [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}]  # not contiguous
    for split in ("train", "val"):
        (root / f"{split}_images").mkdir()
        ann = {"images": [], "annotations": [], "categories": categories}
        (root / f"{split}.json").write_text(json.dumps(ann))
    return {
        "backend": "disk",
        "root": str(root),
        "train_ann": "train.json",
        "val_ann": "val.json",
        "train_img_prefix": "train_images/",
        "val_img_prefix": "val_images/",
    }


def test_disk_backend_with_custom_layout_reads_classes(tmp_path: Path) -> None:
    cfg = build_config(hparams(), custom_layout(tmp_path))
    assert cfg.val_dataloader.dataset.data_prefix == {"img": "val_images/"}
    assert cfg.val_evaluator.ann_file == str(tmp_path / "val.json")
    assert cfg.train_dataloader.dataset.metainfo == {"classes": ("cat", "dog")}  # by category id
    assert cfg.model.roi_head.bbox_head.num_classes == 2
    assert cfg.model.roi_head.mask_head.num_classes == 2


def test_classes_must_exist_in_the_annotation_file(tmp_path: Path) -> None:
    data = {**custom_layout(tmp_path), "classes": ["dog"]}
    assert build_config(hparams(), data).model.roi_head.bbox_head.num_classes == 1
    with pytest.raises(DataError, match=r"data.classes names \['cow'\] that .*val.json does not"):
        build_config(hparams(), {**data, "classes": ["dog", "cow"]})


@pytest.mark.parametrize("name", ["maskrcnn", "retinanet", "gfl"])
def test_coco_experiments_build_on_synthetic_data_without_weights(
    name: str, synthetic_data: dict
) -> None:
    exp = load_experiment(REPO / "experiments" / f"{name}.yaml")
    hp = local_hparams(exp["hyperparameters"])
    shipped = Config.fromfile(resolve_config_path(hp["config_file"]))
    assert "Pretrained" in json.dumps(shipped.model.to_dict())  # the COCO config keeps its weights
    cfg = build_config(hp, synthetic_data)
    assert drop_pretrained(cfg.model) == 0
    assert cfg.train_dataloader.batch_size == 16
    assert cfg.train_cfg.max_epochs == 12 and cfg.train_cfg.val_interval == 1


def test_synthetic_data_drops_the_configs_detector_weights(synthetic_data: dict) -> None:
    config_file = "configs/maskrcnn_r50_fpn_finetune_small.py"
    assert Config.fromfile(resolve_config_path(config_file)).load_from.startswith("https://")
    assert "load_from" not in build_config(hparams(config_file=config_file), synthetic_data)


def test_momentum_needs_an_optimizer_that_takes_it(tmp_path: Path, synthetic_data: dict) -> None:
    adamw = tmp_path / "adamw.py"
    adamw.write_text("optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=1e-4))\n")
    cfg = build_config(hparams(merge_config=str(adamw), lr=2e-4), synthetic_data)
    assert cfg.optim_wrapper.optimizer == {"type": "AdamW", "lr": 2e-4}
    with pytest.raises(ConfigError, match="optimizer AdamW takes no momentum"):
        build_config(hparams(merge_config=str(adamw), momentum=0.9), synthetic_data)


def test_auto_scale_lr_follows_the_global_batch(synthetic_data: dict) -> None:
    # The COCO configs name base_batch_size 16 (8 GPUs x 2 images).
    coco = {"config_file": "configs/maskrcnn_r50_fpn_1x_coco.py", "lr": 0.02}
    scaled = build_config({**coco, "global_batch_size": 32, "auto_scale_lr": True}, synthetic_data)
    assert scaled.optim_wrapper.optimizer.lr == pytest.approx(0.04)
    single = build_config({**coco, "global_batch_size": 2, "auto_scale_lr": True}, synthetic_data)
    assert single.optim_wrapper.optimizer.lr == pytest.approx(0.0025)
    plain = build_config({**coco, "global_batch_size": 32}, synthetic_data)
    assert plain.optim_wrapper.optimizer.lr == 0.02


def test_gcs_layout_and_image_cache_without_network() -> None:
    data = {"backend": "gcp", "bucket": "b", "prefix": "/coco/", "image_cache_bytes": 10_000_000}
    cfg = build_config(hparams(), data, verify_paths=False)
    dataset = cfg.train_dataloader.dataset
    assert dataset.data_root == "gs://b/coco/" and dataset.data_prefix == {"img": "train2017/"}
    loads = [s for s in dataset.pipeline if s.type == "LoadImageFromFile"]
    assert loads[0].backend_args == {"backend": "gcs", "cache_bytes": 10_000_000}
    with pytest.raises(DataError, match="data.bucket is not set"):
        build_config(hparams(), {"backend": "gcs"}, verify_paths=False)


def test_missing_merge_config_is_named_as_merge_config(synthetic_data: dict) -> None:
    with pytest.raises(ConfigError, match=r"^hyperparameters.merge_config: config 'extra.py' not"):
        build_config(hparams(merge_config="extra.py"), synthetic_data)


@pytest.mark.parametrize(
    ("hp", "data", "error", "message"),
    [
        ({"lrr": 0.01}, {}, ConfigError, r"hyperparameters.lrr is not read by the trial; did you"),
        (
            {},
            {"clases": ["a"]},
            DataError,
            r"data.clases is not a data key; did you mean classes\?",
        ),
        ({}, {"val_annotation": "a"}, DataError, r"data.val_annotation .* did you mean val_ann\?"),
        ({}, {"synthetic": {"num_trian": 3}}, DataError, r"did you mean num_train\?"),
    ],
)
def test_a_run_refuses_keys_it_does_not_read(
    hp: dict, data: dict, error: type, message: str, synthetic_data: dict
) -> None:
    with pytest.raises(error, match=message):
        plan_run({**hparams(), **hp}, {**synthetic_data, **data})
