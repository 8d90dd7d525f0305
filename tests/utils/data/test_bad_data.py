"""Bad data is loud: each case fails naming the file and what to do, or is a counted skip.

Policy (README, "Bad data"): structural problems in an annotation file and unreadable images stop
the run with an error naming the file and the entry; boxes that mmdet skips (empty, or outside
their image) are counted and reported in the log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import pytest
from mmdet.registry import DATASETS
from mmdet.utils import register_all_modules

from tests.conftest import disk_data, train
from utils.base.errors import ConfigError
from utils.data.annotations import AnnotationError
from utils.data.sampling import ImageError, LoudDataset
from utils.data.source import DataError
from utils.training.plan import build_config

CONFIG = {"config_file": "configs/synthetic/maskrcnn_r18_fpn_synthetic.py", "global_batch_size": 2}


def edit(root: Path, change: Callable[[dict], None], split: str = "train") -> None:
    path = root / "annotations" / f"instances_{split}.json"
    ann = json.loads(path.read_text())
    change(ann)
    path.write_text(json.dumps(ann))


def first_image(root: Path, split: str = "train") -> Path:
    return root / split / "000000.png"


def load_all(root: Path, split: str = "train") -> None:
    register_all_modules(init_default_scope=True)
    cfg = build_config(CONFIG, disk_data(root))
    dataset = LoudDataset(DATASETS.build(cfg[f"{split}_dataloader"].dataset))
    for index in range(len(dataset)):
        dataset[index]


def test_missing_image_names_the_file(coco: Path) -> None:
    first_image(coco).unlink()
    with pytest.raises(ImageError, match=r"train/000000.png: cannot load it \(FileNotFoundError"):
        load_all(coco)


def test_truncated_jpeg_names_the_file(coco: Path) -> None:
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(first_image(coco))))
    assert ok
    first_image(coco).write_bytes(jpeg.tobytes()[: len(jpeg) // 2])  # decoded by content
    with pytest.raises(ImageError, match=r"train/000000.png: cannot load it.*Replace the file"):
        load_all(coco)


def test_zero_byte_image_names_the_file(coco: Path) -> None:
    first_image(coco).write_bytes(b"")
    with pytest.raises(ImageError, match=r"train/000000.png: cannot load it"):
        load_all(coco)


def test_a_transform_that_fails_on_a_loaded_image_is_named_not_the_file(coco: Path) -> None:
    """A YAML list where mmcv wants a tuple (`override_mmdet_config` gives lists): the Resize is
    at fault, and the message says so instead of asking to replace a sound image."""
    register_all_modules(init_default_scope=True)
    cfg = build_config(CONFIG, disk_data(coco))
    pipeline = cfg.train_dataloader.dataset.pipeline
    (position,) = [i for i, step in enumerate(pipeline) if step.type == "Resize"]
    pipeline[position].scale = [128, 128]
    dataset = LoudDataset(DATASETS.build(cfg.train_dataloader.dataset), "train_dataloader.dataset")
    wanted = (
        rf"train_dataloader.dataset.pipeline.{position} \(Resize\) fails on \S+/train/000000.png "
        r"\(TypeError: .*\). Check that transform's settings"
    )
    with pytest.raises(ConfigError, match=wanted):
        dataset[0]


def test_malformed_annotation_json(coco: Path) -> None:
    (coco / "annotations" / "instances_val.json").write_text('{"images": [')
    with pytest.raises(AnnotationError, match=r"instances_val.json: cannot read it as JSON"):
        build_config(CONFIG, disk_data(coco))


def test_annotation_of_an_unknown_image(coco: Path) -> None:
    edit(coco, lambda ann: ann["annotations"][2].update(image_id=999))
    with pytest.raises(AnnotationError, match=r"annotation 3 names image_id 999, which is not"):
        build_config(CONFIG, disk_data(coco))


def test_unknown_category_id(coco: Path) -> None:
    edit(coco, lambda ann: ann["annotations"][0].update(category_id=42))
    with pytest.raises(AnnotationError, match=r"annotation 1 has category_id 42, not among"):
        build_config(CONFIG, disk_data(coco))


def test_polygon_with_two_points(coco: Path) -> None:
    edit(coco, lambda ann: ann["annotations"][1].update(segmentation=[[1, 1, 5, 5]]))
    with pytest.raises(AnnotationError, match=r"annotation 2: a polygon has 4 coordinates"):
        build_config(CONFIG, disk_data(coco))


def test_boxes_with_negative_size_or_outside_are_counted_skips(
    coco: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def change(ann: dict) -> None:
        ann["annotations"][0]["bbox"][2] = -5.0
        ann["annotations"][1]["bbox"][:2] = [500.0, 500.0]

    edit(coco, change)
    with caplog.at_level("WARNING"):
        build_config(CONFIG, disk_data(coco))
    assert "instances_train.json: 2 of" in caplog.text and "skipped (ids [1, 2])" in caplog.text


def test_empty_dataset_after_filtering_is_an_error(coco: Path, tmp_path: Path) -> None:
    edit(coco, lambda ann: ann.update(annotations=[]))
    with pytest.raises(DataError, match="The train dataset is empty after mmdet's filtering"):
        train(tmp_path / "run", CONFIG["config_file"], disk_data(coco), "--max-batches", "1")


def test_class_list_mismatch(coco: Path) -> None:
    with pytest.raises(DataError, match=r"data.classes names \['hexagon'\]"):
        build_config(CONFIG, disk_data(coco, classes=["circle", "hexagon"]))


def test_image_prefix_pointing_nowhere(coco: Path) -> None:
    with pytest.raises(DataError, match=r"data.val_img_prefix: image folder .*nowhere"):
        build_config(CONFIG, disk_data(coco, val_img_prefix="nowhere/"))


def test_missing_annotation_file(coco: Path) -> None:
    with pytest.raises(DataError, match=r"data.train_ann: annotation file .*missing.json"):
        build_config(CONFIG, disk_data(coco, train_ann="missing.json"))
