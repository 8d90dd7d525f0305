"""`data.format: voc`: VOCdevkit folders, one VOCDataset per year, VOC mAP as `voc_mAP`."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import pytest

from tests.conftest import TINY_SYNTHETIC, train
from utils.data.source import DataError
from utils.data.synthetic import CLASSES, SyntheticSpec, ensure_dataset
from utils.experiment.load import load_experiment, local_hparams
from utils.training.plan import build_config

REPO = Path(__file__).resolve().parents[3]
VOC_SYNTHETIC = "configs/synthetic/retinanet_r18_fpn_voc_synthetic.py"
VOC_R50 = "configs/retinanet_r50_fpn_1x_voc0712.py"
# VOC names images by id; the splits share JPEGImages/, so their ids must not collide.
ID_OFFSET = {"train": 0, "val": 100000}
SPLIT_FILE = {"train": "trainval", "val": "test"}


def write_voc_year(cache: Path, year_dir: Path) -> None:
    """The tiny generated COCO set as a VOC year: JPEGs, XML boxes, trainval/test split files."""
    source = ensure_dataset(cache, SyntheticSpec(**TINY_SYNTHETIC))
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year_dir / folder).mkdir(parents=True)
    for split in ("train", "val"):
        coco = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        ids = []
        for image in coco["images"]:
            image_id = f"{ID_OFFSET[split] + image['id']:06d}"
            ids.append(image_id)
            pixels = cv2.imread(str(source / split / image["file_name"]))
            cv2.imwrite(str(year_dir / "JPEGImages" / f"{image_id}.jpg"), pixels)
            root = ET.Element("annotation")
            ET.SubElement(root, "filename").text = f"{image_id}.jpg"
            size = ET.SubElement(root, "size")
            for key, value in (
                ("width", image["width"]),
                ("height", image["height"]),
                ("depth", 3),
            ):
                ET.SubElement(size, key).text = str(value)
            for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
                obj = ET.SubElement(root, "object")
                ET.SubElement(obj, "name").text = CLASSES[ann["category_id"] - 1]
                ET.SubElement(obj, "difficult").text = "0"
                box = ET.SubElement(obj, "bndbox")
                x, y, w, h = ann["bbox"]
                # VOC boxes are 1-based and inclusive; mmdet subtracts 1.
                corners = (round(x) + 1, round(y) + 1, round(x + w), round(y + h))
                for key, value in zip(("xmin", "ymin", "xmax", "ymax"), corners, strict=True):
                    ET.SubElement(box, key).text = str(value)
            ET.ElementTree(root).write(year_dir / "Annotations" / f"{image_id}.xml")
        (year_dir / "ImageSets" / "Main" / f"{SPLIT_FILE[split]}.txt").write_text(
            "\n".join(ids) + "\n"
        )


@pytest.fixture
def devkit(tmp_path: Path, synthetic_cache: Path) -> Path:
    """A VOCdevkit folder with VOC2007 holding the tiny generated set (about 0.1 s to write)."""
    write_voc_year(synthetic_cache, tmp_path / "VOCdevkit" / "VOC2007")
    return tmp_path / "VOCdevkit"


def voc_data(root: Path, **extra: object) -> dict:
    return {"backend": "disk", "format": "voc", "root": str(root), **extra}


def test_voc_section_points_datasets_evaluator_and_heads(devkit: Path) -> None:
    from mmdet.evaluation import VOCMetric
    from mmdet.registry import DATASETS, METRICS
    from mmdet.utils import register_all_modules

    cfg = build_config({"config_file": VOC_SYNTHETIC, "global_batch_size": 4}, voc_data(devkit))
    train, val = cfg.train_dataloader.dataset, cfg.val_dataloader.dataset
    assert train.type == val.type == "VOCDataset"
    assert train.data_root == val.data_root == str(devkit)
    assert train.ann_file == "VOC2007/ImageSets/Main/trainval.txt"
    assert val.ann_file == "VOC2007/ImageSets/Main/test.txt"
    assert train.data_prefix == val.data_prefix == {"sub_data_root": "VOC2007/"}
    assert train.metainfo == {"classes": CLASSES}  # the config's classes
    assert cfg.model.bbox_head.num_classes == 3
    assert cfg.val_evaluator.metric == "mAP" and cfg.val_evaluator.eval_mode == "11points"

    register_all_modules(init_default_scope=True)
    assert len(DATASETS.build(train)) == TINY_SYNTHETIC["num_train"]
    dataset = DATASETS.build(val)
    assert len(dataset) == TINY_SYNTHETIC["num_val"]
    assert dataset.get_data_info(0)["instances"][0]["bbox_label"] in (0, 1, 2)
    assert isinstance(METRICS.build(cfg.val_evaluator), VOCMetric)

    cfg = build_config(
        {"config_file": VOC_SYNTHETIC, "global_batch_size": 4},
        voc_data(devkit, classes=["square", "circle"]),
    )
    assert cfg.val_dataloader.dataset.metainfo == {"classes": ("square", "circle")}
    assert cfg.model.bbox_head.num_classes == 2


def test_mmdet_voc0712_recipe_concatenates_years_inside_its_repeat(devkit: Path) -> None:
    shutil.copytree(devkit / "VOC2007", devkit / "VOC2012")
    data = voc_data(devkit, years=[2007, 2012])
    cfg = build_config({"config_file": VOC_R50, "global_batch_size": 16}, data)
    repeat = cfg.train_dataloader.dataset
    assert repeat.type == "RepeatDataset" and repeat.times == 3
    concat = repeat.dataset
    assert concat.type == "ConcatDataset" and concat.ignore_keys == ["dataset_type"]
    assert [d.ann_file for d in concat.datasets] == [
        f"VOC{year}/ImageSets/Main/trainval.txt" for year in (2007, 2012)
    ]
    assert [d.data_prefix.sub_data_root for d in concat.datasets] == ["VOC2007/", "VOC2012/"]
    assert concat.datasets[1].filter_cfg.bbox_min_size == 32  # the recipe's own settings stay
    val = cfg.val_dataloader.dataset
    assert (val.type, val.ann_file) == ("VOCDataset", "VOC2007/ImageSets/Main/test.txt")
    assert len(val.metainfo["classes"]) == 20 and cfg.model.bbox_head.num_classes == 20
    assert cfg.val_evaluator.eval_mode == "11points"


def test_voc_experiment_on_generated_data_is_coco(synthetic_data: dict) -> None:
    """`--set data.backend=synthetic` keeps working: generated data are COCO, so is the metric."""
    exp = load_experiment(REPO / "experiments" / "voc.yaml")
    assert exp["searcher"]["metric"] == "voc_mAP"
    data = {**exp["data"], **synthetic_data}
    cfg = build_config(local_hparams(exp["hyperparameters"]), data)
    repeat = cfg.train_dataloader.dataset
    assert repeat.type == "RepeatDataset" and repeat.dataset.type == "CocoDataset"
    assert Path(repeat.dataset.data_root, repeat.dataset.ann_file).is_file()
    assert cfg.val_dataloader.dataset.type == "CocoDataset"
    assert cfg.val_evaluator.type == "CocoMetric" and cfg.val_evaluator.metric == "bbox"
    assert cfg.model.bbox_head.num_classes == 3


def test_trains_and_reports_voc_map(tmp_path: Path, devkit: Path) -> None:
    records = train(
        tmp_path / "run",
        VOC_SYNTHETIC,
        voc_data(devkit),
        "--max-batches",
        "2",
        experiment="voc.yaml",
    )
    (validation,) = [r["metrics"] for r in records if r["kind"] == "validation"]
    assert validation["num_images"] == TINY_SYNTHETIC["num_val"]
    for name in ("voc_mAP", "voc_AP50"):
        assert math.isfinite(validation[name]) and 0.0 <= validation[name] <= 1.0
    assert not {"mAP", "AP50"} & set(validation)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("trainval", r"data.train_split: split file .*VOC2007/ImageSets/Main/trainval.txt does"),
        ("test", r"data.val_split: split file .*VOC2007/ImageSets/Main/test.txt does not exist"),
        ("Annotations", r"data.root: folder .*VOC2007/Annotations does not exist"),
        ("JPEGImages", r"data.root: folder .*VOC2007/JPEGImages does not exist"),
        ("years", r"data.years: folder .*VOC2012 does not exist; data.root must be the VOCdevkit"),
        ("format", "data.format 'yolo' is unknown; use one of coco, voc"),
        ("gcs", "data.format voc reads from data.backend disk, not 'gcs'"),
        ("root", "data.root is not set: name the VOCdevkit folder"),
    ],
)
def test_voc_problems_name_the_key_and_path(devkit: Path, change: str, message: str) -> None:
    data = voc_data(devkit)
    main = devkit / "VOC2007" / "ImageSets" / "Main"
    if change in SPLIT_FILE.values():
        (main / f"{change}.txt").unlink()
    elif change in ("Annotations", "JPEGImages"):
        shutil.rmtree(devkit / "VOC2007" / change)
    elif change == "years":
        data["years"] = [2007, 2012]
    elif change == "format":
        data["format"] = "yolo"
    elif change == "gcs":
        data = {**data, "backend": "gcs", "bucket": "b"}
    elif change == "root":
        del data["root"]
    with pytest.raises(DataError, match=message):
        build_config({"config_file": VOC_SYNTHETIC, "global_batch_size": 4}, data)
