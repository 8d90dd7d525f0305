"""Tests of the synthetic COCO dataset generator."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from utils.data import synthetic
from utils.data.synthetic import CLASSES, MARKER, SyntheticSpec, ensure_dataset, generate

# pycocotools 2.0.11 decodes masks with numpy 2 in a deprecated way; not ours to fix here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = SyntheticSpec(num_train=12, num_val=4, seed=3)
TINY = SyntheticSpec(num_train=3, num_val=2, image_size=64, seed=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, SMALL)
    return root


@pytest.fixture(scope="module")
def cocos(dataset: Path) -> dict[str, COCO]:
    return {s: COCO(str(dataset / "annotations" / f"instances_{s}.json")) for s in ("train", "val")}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _count_generate(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Wrap `generate` to record every folder it is asked to fill."""
    calls: list[Path] = []
    real = synthetic.generate

    def counting(root: Path, spec: SyntheticSpec) -> None:
        calls.append(root)
        real(root, spec)

    monkeypatch.setattr(synthetic, "generate", counting)
    return calls


def test_coco_index_is_valid(cocos: dict[str, COCO]) -> None:
    for split, count in (("train", SMALL.num_train), ("val", SMALL.num_val)):
        coco = cocos[split]
        assert sorted(coco.getImgIds()) == list(range(1, count + 1))
        assert coco.loadCats(coco.getCatIds()) == [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)
        ]
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert ann_ids == list(range(1, len(ann_ids) + 1))
        for ann in coco.dataset["annotations"]:
            assert ann["image_id"] in coco.imgs
            assert ann["category_id"] in coco.cats
            assert ann["iscrowd"] == 0
            assert len(ann["segmentation"]) == 1 and len(ann["segmentation"][0]) % 2 == 0


def test_image_files_match_entries(dataset: Path, cocos: dict[str, COCO]) -> None:
    for split, coco in cocos.items():
        for img in coco.dataset["images"]:
            assert img["file_name"] == f"{img['id'] - 1:06d}.png"
            pixels = cv2.imread(str(dataset / split / img["file_name"]))
            assert pixels is not None
            assert pixels.shape == (img["height"], img["width"], 3) == (128, 128, 3)


def test_masks_lie_in_tight_bboxes_and_match_area(cocos: dict[str, COCO]) -> None:
    for coco in cocos.values():
        for ann in coco.dataset["annotations"]:
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            assert xs.size > 0
            x, y, w, h = ann["bbox"]
            # Pixel i covers [i, i + 1); the mask must lie in the box with 1 px of slack ...
            assert x - 1 <= xs.min() and xs.max() + 1 <= x + w + 1
            assert y - 1 <= ys.min() and ys.max() + 1 <= y + h + 1
            # ... and the box must be tight (a sharp triangle tip can miss ~1.3 px of pixels).
            assert xs.min() <= x + 1.5 and xs.max() + 1 >= x + w - 1.5
            assert ys.min() <= y + 1.5 and ys.max() + 1 >= y + h - 1.5
            assert abs(ann["area"] - mask.sum()) <= 1


def test_pixels_match_masks(dataset: Path, cocos: dict[str, COCO]) -> None:
    kernel = np.ones((3, 3), np.uint8)
    for split, coco in cocos.items():
        for img in coco.dataset["images"]:
            pixels = cv2.imread(str(dataset / split / img["file_name"]))
            for ann in coco.imgToAnns[img["id"]]:
                mask = coco.annToMask(ann).astype(bool)
                colours = np.unique(pixels[mask], axis=0)
                assert len(colours) == 1  # a solid shape covers exactly its mask
                ring = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool) & ~mask
                assert not (pixels[ring] == colours[0]).all(axis=1).any()


def test_instances_do_not_overlap(cocos: dict[str, COCO]) -> None:
    for coco in cocos.values():
        for img_id, anns in coco.imgToAnns.items():
            cover = sum(coco.annToMask(a).astype(int) for a in anns)
            assert cover.max() == 1, f"overlap in image {img_id}"


def test_instance_counts_per_image(cocos: dict[str, COCO]) -> None:
    for coco in cocos.values():
        for img_id in coco.getImgIds():
            assert 1 <= len(coco.getAnnIds(imgIds=[img_id])) <= SMALL.max_instances


def test_all_categories_used(cocos: dict[str, COCO]) -> None:
    used = {a["category_id"] for c in cocos.values() for a in c.dataset["annotations"]}
    assert used == {1, 2, 3}


def test_generation_is_deterministic(tmp_path: Path) -> None:
    generate(tmp_path / "a", TINY)
    generate(tmp_path / "b", TINY)
    generate(tmp_path / "c", SyntheticSpec(**{**TINY.__dict__, "seed": TINY.seed + 1}))
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) == TINY.num_train + TINY.num_val + 2
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a)
    # Train and val use different seeds.
    assert a["train/000000.png"] != a["val/000000.png"]


def test_key_is_stable_and_depends_on_every_field() -> None:
    assert SyntheticSpec().key() == SyntheticSpec().key()
    assert len(SyntheticSpec().key()) <= 16
    keys = {SyntheticSpec().key()}
    for field, value in SyntheticSpec().__dict__.items():
        keys.add(SyntheticSpec(**{field: value + 1}).key())
    assert len(keys) == 1 + len(SyntheticSpec().__dict__)


def test_ensure_dataset_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_generate(monkeypatch)
    root = ensure_dataset(tmp_path, TINY)
    assert root == tmp_path / f"synthetic-{TINY.key()}"
    assert (root / MARKER).is_file()
    assert COCO(str(root / "annotations" / "instances_train.json")).getImgIds()
    stamp = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert ensure_dataset(tmp_path, TINY) == root
    assert len(calls) == 1
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    assert os.listdir(tmp_path) == [root.name]  # no temporary folders left behind


def test_ensure_dataset_replaces_incomplete_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_generate(monkeypatch)
    stale = tmp_path / f"synthetic-{TINY.key()}"
    (stale / "annotations").mkdir(parents=True)
    (stale / "junk.txt").write_text("crashed run")
    root = ensure_dataset(tmp_path, TINY)
    assert root == stale
    assert len(calls) == 1
    assert (root / MARKER).is_file()
    assert not (root / "junk.txt").exists()
    assert len(json.loads((root / "annotations" / "instances_val.json").read_text())["images"]) == 2
    assert os.listdir(tmp_path) == [root.name]


def test_ensure_dataset_keeps_the_winner_of_a_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / f"synthetic-{TINY.key()}"
    real = synthetic.generate

    def racing(root: Path, spec: SyntheticSpec) -> None:
        # Another process publishes a complete dataset while this one is still generating.
        real(target, spec)
        (target / "winner.txt").write_text("first")
        (target / MARKER).write_text("")
        real(root, spec)

    monkeypatch.setattr(synthetic, "generate", racing)
    assert ensure_dataset(tmp_path, TINY) == target
    assert (target / "winner.txt").read_text() == "first"
    assert os.listdir(tmp_path) == [target.name]


def test_ensure_dataset_cleans_up_after_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(root: Path, spec: SyntheticSpec) -> None:
        (root / "partial.png").write_bytes(b"")
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "generate", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_dataset(tmp_path, TINY)
    assert os.listdir(tmp_path) == []


def test_ensure_dataset_with_concurrent_processes(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(3) as pool:
        roots = pool.starmap(ensure_dataset, [(tmp_path, TINY)] * 3)
    assert set(roots) == {tmp_path / f"synthetic-{TINY.key()}"}
    assert os.listdir(tmp_path) == [roots[0].name]
    reference = tmp_path / "reference"
    generate(reference, TINY)
    assert {k: v for k, v in _files(roots[0]).items() if k != MARKER} == _files(reference)
